"""`lstm-export serve`: an HTTP server over the onnxruntime runtime, JSON in and out.

Built on Starlette and uvicorn, with orjson writing the answers (the `serve` extra). Laid
out by concern, each module importing only those above it:

- `limits`: `ServerLimits`, the `HTTPError` a refused request raises, what is held now
  (`Load`), memory handed back to the OS; `notices`: rate-limited warnings about clients.
- `codec`: JSON bodies in as checked arrays, answers out as bytes.
- `streams`: open streams, each with its (h, c), a FIFO lock and a TTL.
- `service`: the model work (no HTTP): one shared `OnnxLSTM`, a thread pool, the streams.
- `app`: `create_app`, the routes, and the exception handlers that turn errors into answers.
- `protocol`: uvicorn's h11 protocol with deadlines, a connection cap and a byte budget.
- `run`: `serve`, which listens and runs uvicorn; `python -m lstm_export.serving.http`.

Importing this package never imports torch, starlette or uvicorn: `ServerLimits` and
`cpu_count` need nothing more, and `create_app` and `serve`, looked up here, first say which
extra to install when it is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from lstm_export.errors import UsageError
from lstm_export.serving.http.limits import ServerLimits, cpu_count

EXTRA = ("starlette", "uvicorn", "orjson")
_NEEDS_EXTRA = {
    "create_app": "lstm_export.serving.http.app",
    "serve": "lstm_export.serving.http.run",
}

__all__ = ["ServerLimits", "cpu_count", "create_app", "serve"]


def require_extra() -> None:
    """UsageError naming the `serve` extra unless its packages can be imported."""
    if any(importlib.util.find_spec(name) is None for name in EXTRA):
        raise UsageError(
            "serving needs the 'serve' extra: pip install 'lstm-export[serve]' "
            "(starlette, uvicorn and orjson)"
        )


def __getattr__(name: str) -> Any:
    module = _NEEDS_EXTRA.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require_extra()
    return getattr(importlib.import_module(module), name)
