"""The files of an export folder and the defaults they are checked with, named once.

No torch here, nor anything heavy: the runtime, the Triton writer, the server and the CLI's
help text read these.
"""

from __future__ import annotations

TORCHSCRIPT_FILE = "model.pt"
"""TorchScript for libtorch (plain aten ops)."""
FUSED_TORCHSCRIPT_FILE = "model.fused.pt"
"""TorchScript whose layers run the fused LayerNorm-LSTM kernel (export --fused-kernel)."""
ONNX_FILE = "model.onnx"
"""The time-major ONNX graph for onnxruntime."""
MANIFEST_FILE = "manifest.json"
"""What the export wrote and vouches for: hashes, config, versions, the parity report."""
PARITY_REPORT_FILE = "parity.json"
"""The report `export --keep-failed DIR` writes beside artifacts that failed parity."""

ATOL = 1e-5
"""Parity: the absolute error every backend may have against the float64 reference."""
FACTOR = 8.0
"""Parity: how many times a case's float32 floor a backend may be off (lstm_export.parity)."""
