"""Transitional, to be deleted: the names `lstm_export.cli` imported from here before the
server was split by concern (see this package's docstring). They now live in
`lstm_export.serving.http` (`ServerLimits`, `serve`, `create_app`, `cpu_count`) and
`lstm_export.benchmarks.load` (`load_test`, `serve_and_load_test`)."""

from __future__ import annotations

import importlib
from typing import Any

from lstm_export.serving.http import ServerLimits, cpu_count

_MOVED = {
    "create_app": "lstm_export.serving.http",
    "serve": "lstm_export.serving.http",
    "load_test": "lstm_export.benchmarks.load",
    "serve_and_load_test": "lstm_export.benchmarks.load",
}

__all__ = ["ServerLimits", "cpu_count", *_MOVED]


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
