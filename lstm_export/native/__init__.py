"""Native code compiled on this machine: the fused LayerNorm-LSTM kernel's C++ sources and
their builds.

- `csrc/`: the kernel's arithmetic (`layer_norm_lstm_core.h`, neither torch nor onnxruntime
  in sight) and its two bindings, torch (`layer_norm_lstm.cpp`, with `aten_lstm.cpp`, the
  plain stack model.pt2 runs) and onnxruntime (`ort_layer_norm_lstm.cpp`).
- `torch_kernel`: the torch op library (lstm_export_kernels.so), built against torch's
  headers and loaded into this process; the only module here that imports torch.
- `build`: what every build shares: the compiler command, the route (AVX-512, AVX2/FMA or
  portable, from /proc/cpuinfo and LSTM_EXPORT_KERNEL_ISA) and its flags, the cache
  (folder, key, lock, sha256 stamp) and the compiler call in its own process group.
- `ort_kernel`: onnxruntime's headers (found or fetched) and the onnxruntime op library.

Core layer: the runtime (`OnnxLSTM(..., fused=True)`, `Pt2LSTM`) builds the libraries
through it as the exporters do, and neither imports the other.
"""
