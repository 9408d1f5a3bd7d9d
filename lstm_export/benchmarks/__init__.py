"""`bench` (latency of every runtime, as ratios to nn.LSTM and onnxruntime's LSTM op) and the
HTTP load generator behind `serve-bench`."""

DEFAULT_SHAPES = "100x1,100x16,500x4,100x16:ragged"
"""`bench --shapes`' default (no torch here: the CLI's help reads it): seq x batch, and a
padded batch whose sequences end at lengths spread from seq down to 1."""
