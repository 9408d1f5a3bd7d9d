"""`bench` (latency of every runtime, as ratios to nn.LSTM and onnxruntime's LSTM op) and the
HTTP load generator behind `serve-bench`."""
