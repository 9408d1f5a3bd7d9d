"""The backends the parity engine runs: each artifact as its users run it, numpy in and out.

Every adapter has one shape, `Backend` (float32 numpy in the model's layout, with lengths or
None, in; (y, h, c) out), so
`check_parity` holds them all to one rule. Each runs the artifact through the code users
run (`OnnxLSTM` and its `Stream`, onnxruntime on the graph Triton serves, the `lstm_run`
program), so a pass says something about what ships. `torch_backend` is defined with the
engine, whose own eager float32 row is one, and imported from here like the others.
Backend names are row labels in every report: each is defined here, once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from lstm_export.artifacts import BATCH_FIRST, CONFIG_KEY, LAYOUT_KEY, LENGTHS_INPUT, ONNX_FILE
from lstm_export.config import config_from_metadata
from lstm_export.errors import UsageError, first_line
from lstm_export.exporters.batch_first import (
    INPUT,
    OUTPUT,
    STATE_INPUTS,
    STATE_OUTPUTS,
    VERSION,
    metadata,
)
from lstm_export.runtime import cpp as cpp_runtime  # looked up per call: tests replace run
from lstm_export.runtime.onnx import OnnxLSTM, load_onnx, read_onnx
from lstm_export.runtime.sessions import register_op_library
from lstm_export.verification.parity import Backend, Outputs, State, torch_backend

__all__ = [
    "BATCH_FIRST_BACKEND",
    "CPP_BACKEND",
    "FUSED_BACKEND",
    "FUSED_CPP_BACKEND",
    "FUSED_ONNX_BACKEND",
    "ONNX_BACKEND",
    "PT2_BACKEND",
    "PT2_CPP_BACKEND",
    "TORCHSCRIPT_BACKEND",
    "batch_first_backend",
    "cpp_backend",
    "onnx_backend",
    "torch_backend",
]

TORCHSCRIPT_BACKEND = "torchscript"
FUSED_BACKEND = "torchscript (fused kernel)"
ONNX_BACKEND = "onnxruntime"
FUSED_ONNX_BACKEND = "onnxruntime (fused kernel)"
BATCH_FIRST_BACKEND = "onnxruntime batch-first"
FUSED_BATCH_FIRST_BACKEND = f"{BATCH_FIRST_BACKEND} (fused kernel)"
PT2_BACKEND = "aoti package (model.pt2)"
CPP_BACKEND = "libtorch C++"
FUSED_CPP_BACKEND = "libtorch C++ (fused kernel)"
PT2_CPP_BACKEND = "libtorch C++ (model.pt2)"

Array = np.ndarray


def onnx_backend(name: str, runtime: OnnxLSTM) -> Backend:
    """`model.onnx` (or `model.fused.onnx`, given an `OnnxLSTM(..., fused=True)`) under
    onnxruntime; streamed cases go through `OnnxLSTM.stream`."""

    time_axis = 1 if runtime.config.batch_first else 0

    def run(x: Array, state: State | None, lengths: Array | None) -> Outputs:
        if lengths is None:  # a graph exported before lengths has no such input
            y, (h, c) = runtime.run(x, state)
        else:
            y, (h, c) = runtime.run(x, state, lengths)
        return y, h, c

    def run_chunks(x: Array, state: State | None, chunks: tuple[int, ...]) -> Outputs:
        stream, ys, start = runtime.stream(state), [], 0
        for length in chunks:
            ys.append(stream.step(x.take(range(start, start + length), axis=time_axis)))
            start += length
        assert stream.state is not None
        return np.concatenate(ys, axis=time_axis), *stream.state

    return Backend(name, run, run_chunks)


def _session(
    model: Path | str | onnx.ModelProto, source: str, fused: bool = False
) -> ort.InferenceSession:
    """A session over `model`; `fused`: with our own build of the op library registered
    (the graph of model.fused.onnx), never a folder's copy."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if fused:
        register_op_library(options)
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else read_onnx(model)
    try:
        return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        first = first_line(exc)
        raise UsageError(f"{source} is not a loadable ONNX model: {first}") from None


def batch_first_backend(
    model: Path | str | onnx.ModelProto, name: str = BATCH_FIRST_BACKEND, *, fused: bool = False
) -> Backend:
    """A parity `Backend` over Triton's batch-major graph: numpy in the model's layout.

    `model` is a batch-major ModelProto (`batch_first_onnx(...)`), a .onnx file, or a
    Triton model folder (`<repo>/<name>`, whose `1/model.onnx` is used). The states (and
    x and y, for a time-major model) are transposed to batch-major, run by onnxruntime,
    and transposed back, so it drops into `check_parity` beside the other backends.
    `fused`: the graph is model.fused.onnx's, run with our build of the op library.
    """
    if isinstance(model, onnx.ModelProto):
        source, meta = "the ONNX model", metadata(model)
    else:
        path = Path(model)
        if path.is_dir():
            path = path / VERSION / ONNX_FILE
        if not (path.exists() or path.is_symlink()):
            raise UsageError(f"expected a .onnx file or a Triton model folder, got {model}")
        source = str(path)
        model = load_onnx(path)  # refused before reading: not a regular file, empty, > 2 GiB
        meta = metadata(model)
    if meta.get(LAYOUT_KEY) != BATCH_FIRST or CONFIG_KEY not in meta:
        raise UsageError(f"{source} is not a batch-first graph (no {LAYOUT_KEY}={BATCH_FIRST})")
    config = config_from_metadata(meta, source)
    session = _session(model, source, fused)
    # An input with a default (lengths) is listed as an overridable initializer.
    inputs = [*session.get_inputs(), *session.get_overridable_initializers()]
    takes_lengths = LENGTHS_INPUT in {i.name for i in inputs}

    def swap(t: Array) -> Array:
        return np.ascontiguousarray(np.asarray(t, dtype=np.float32).transpose(1, 0, 2))

    def run(x: Array, state: State | None, lengths: Array | None) -> Outputs:
        x = np.asarray(x, dtype=np.float32) if config.batch_first else swap(x)
        if state is None:
            zeros = np.zeros((x.shape[0], config.state_layers, config.hidden_size), np.float32)
            h0 = c0 = zeros
        else:
            h0, c0 = (swap(s) for s in state)
        feed = dict(zip((INPUT, *STATE_INPUTS), (x, h0, c0), strict=True))
        if lengths is not None:
            if not takes_lengths:
                raise UsageError(f"{source} has no {LENGTHS_INPUT} input: it predates them")
            feed[LENGTHS_INPUT] = np.asarray(lengths, dtype=np.int64)
        y, hn, cn = session.run([OUTPUT, *STATE_OUTPUTS], feed)
        return (y if config.batch_first else swap(y)), swap(hn), swap(cn)

    return Backend(name, run)


def cpp_backend(name: str, binary: Path, model_pt: Path, kernels: Path | None = None) -> Backend:
    """`lstm_run` on `model_pt` as a parity backend; streamed cases stream inside C++.

    `lstm_run --chunk N` feeds N steps per forward call and carries (h, c) in C++, the
    way a C++ program streams, so a case's chunks must all be N long but the last.
    """

    def whole(x: Array, state: State | None, lengths: Array | None) -> Outputs:
        if lengths is None:
            y, (h, c) = cpp_runtime.run(binary, model_pt, x, state, kernels=kernels)
        else:
            y, (h, c) = cpp_runtime.run(
                binary, model_pt, x, state, kernels=kernels, lengths=lengths
            )
        return y, h, c

    def chunked(x: Array, state: State | None, chunks: tuple[int, ...]) -> Outputs:
        size = chunks[0]
        if any(c != size for c in chunks[:-1]) or chunks[-1] > size:
            raise UsageError(f"lstm_run streams in chunks of one length, not {list(chunks)}")
        y, (h, c) = cpp_runtime.run(binary, model_pt, x, state, size, kernels=kernels)
        return y, h, c

    return Backend(name, whole, chunked)
