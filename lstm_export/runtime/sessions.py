"""From a .onnx file to an onnxruntime session: the file checked before it is read, the
session options users need, and our op library registered for `model.fused.onnx`.

No torch (the runtime runs without it); `lstm_export.runtime.onnx` runs the sessions.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import onnxruntime as ort

from lstm_export.artifacts import FUSED_ONNX_FILE, ONNX_FILE, ORT_KERNEL_LIBRARY
from lstm_export.config import positive_int
from lstm_export.errors import UsageError, first_line
from lstm_export.files import check_regular_file, read_bytes
from lstm_export.native import ort_kernel

if TYPE_CHECKING:
    import onnx

MAX_ONNX_BYTES = (1 << 31) - 1
"""A .onnx file is one protobuf message, and protobuf cannot hold one of 2 GiB or more."""

WITH_LIBRARY = f"{ORT_KERNEL_LIBRARY} can be built ({ort_kernel.INCLUDE_ENV}, or npm)"
"""Where model.fused.onnx is written: said when it is asked for and is not there."""

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def onnx_file(path: Path | str, name: str = ONNX_FILE) -> Path:
    """`path`, or `path/<name>` (model.onnx) when `path` is a folder; refused only if nothing
    is there (what is there, a FIFO or an empty file, is judged by `read_onnx`, which says
    why)."""
    path = Path(path)
    try:
        if path.is_dir():
            path = path / name
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        hint = ""
        if name == FUSED_ONNX_FILE and path.name == name:
            hint = f" (export --fused-kernel writes it for a LayerNorm model, where {WITH_LIBRARY})"
        raise UsageError(
            f"expected an export folder or a .onnx file, but {path} does not exist{hint}"
        ) from None
    except OSError as exc:  # a name too long, no permission
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    return path


def read_onnx(path: Path) -> bytes:
    """The bytes of a .onnx file, refused before anything is read unless it is a regular,
    non-empty file protobuf can hold: /dev/zero, a FIFO or a sparse 3 GB file is one line,
    not a hang or gigabytes read for nothing."""
    info = check_regular_file(path, "ONNX model")
    if info.st_size > MAX_ONNX_BYTES:
        raise UsageError(
            f"ONNX model {path} is {info.st_size:,} bytes; an ONNX model is one protobuf "
            f"message, which holds at most {MAX_ONNX_BYTES:,} bytes (2 GiB)"
        )
    data = read_bytes(path, "ONNX model", MAX_ONNX_BYTES)  # checked again on the open file
    if not data:  # emptied since
        raise UsageError(f"ONNX model {path} is empty (0 bytes)")
    return data


def load_onnx(path: Path) -> onnx.ModelProto:
    """`read_onnx`, parsed; external data is never followed (an export has none)."""
    import onnx

    data = read_onnx(path)
    try:
        return onnx.load_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and friends
        first = first_line(exc)
        raise UsageError(f"{path} is not an ONNX file: {first}") from None


_registered: weakref.WeakSet[ort.SessionOptions] = weakref.WeakSet()
"""Options our op library is registered on: onnxruntime refuses a second registration."""


def register_op_library(options: ort.SessionOptions) -> None:
    """Register our own build of the fused kernel's op library (`native.ort_kernel`, compiled
    from the packaged source on first use) on `options`; never an export folder's copy.
    One line (`UsageError`) when it cannot be built or loaded."""
    if options in _registered:
        return
    library = ort_kernel.build_ort_kernel()
    try:
        options.register_custom_ops_library(str(library))
    except Exception as exc:  # onnxruntime's Fail: not loadable, an older runtime
        first = first_line(exc)
        raise UsageError(f"cannot register {library} with onnxruntime: {first}") from None
    _registered.add(options)


def session_options(
    threads: int | None = None,
    optimization: ort.GraphOptimizationLevel | str = "all",
) -> ort.SessionOptions:
    """SessionOptions from the knobs users need: intra-op threads and graph optimization level.

    `optimization` is an `ort.GraphOptimizationLevel` or one of "disable", "basic",
    "extended", "all".
    """
    if isinstance(optimization, str):
        if optimization not in OPTIMIZATION_LEVELS:
            raise UsageError(
                f"optimization must be one of {sorted(OPTIMIZATION_LEVELS)}, got {optimization!r}"
            )
        optimization = OPTIMIZATION_LEVELS[optimization]
    options = ort.SessionOptions()
    options.graph_optimization_level = optimization
    # Errors only: onnxruntime warns at every load that `lengths`, an initializer that is
    # also an input, "will not be treated as constant", which is what makes it optional.
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = positive_int("threads", threads)
        options.inter_op_num_threads = 1
    return options
