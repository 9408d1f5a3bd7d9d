"""lstm-export: ship a scratch PyTorch LSTM as TorchScript and ONNX, with proven parity.

Names are imported lazily so that `lstm-export --help` (and `import lstm_export`)
does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module: the library's whole public surface, one line each.
_EXPORTS = {
    "LSTM": "lstm_export.model",
    "LSTMCell": "lstm_export.model",
    "LSTMConfig": "lstm_export.config",
    "build_model": "lstm_export.checkpoints",
    "load_checkpoint": "lstm_export.checkpoints",
    "to_nn_lstm_state_dict": "lstm_export.nn_lstm",
    "export": "lstm_export.pipeline",
    "verify": "lstm_export.verification.folder",
    "Tolerance": "lstm_export.verification.parity",
    "ParityReport": "lstm_export.verification.parity",
    "inspect": "lstm_export.inspection",
    "OnnxLSTM": "lstm_export.runtime.onnx",
    "Pt2LSTM": "lstm_export.runtime.pt2",
    "bench": "lstm_export.benchmarks.latency",
    "cpp_check": "lstm_export.verification.cpp",
    "write_triton_repo": "lstm_export.serving.triton",
    "validate_triton_repo": "lstm_export.serving.triton",
    "serve": "lstm_export.serving.http",
    "LSTMExportError": "lstm_export.errors",
    "UsageError": "lstm_export.errors",
    "ParityError": "lstm_export.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lstm_export' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
