"""Run an exported `model.onnx` with onnxruntime, without importing torch.

Inputs are checked here, before onnxruntime sees them, so a caller gets one
clear sentence (a `UsageError`) instead of an onnxruntime stack trace.
`InferenceSession.run` is thread-safe and `OnnxLSTM` keeps no per-call state,
so one `OnnxLSTM` can be shared by many threads. A `Stream` holds one
sequence's state; its `step` takes a lock, so concurrent steps on one stream
serialize instead of corrupting it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from lstm_export.artifacts import (
    CONFIG_KEY,
    LAYOUT_KEY,
    ONNX_FILE,
    ONNX_INPUTS,
    ONNX_OUTPUTS,
    TIME_MAJOR,
)
from lstm_export.config import config_from_metadata, positive_int
from lstm_export.errors import UsageError, first_line
from lstm_export.files import check_regular_file, read_bytes

if TYPE_CHECKING:
    import onnx

MAX_ONNX_BYTES = (1 << 31) - 1
"""A .onnx file is one protobuf message, and protobuf cannot hold one of 2 GiB or more."""

Array = np.ndarray
State = tuple[Array, Array]

_ORT_DTYPES = {"tensor(float)": "float32"}

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def onnx_file(path: Path | str) -> Path:
    """`path`, or `path/model.onnx` when `path` is a folder; refused only if nothing is there
    (what is there, a FIFO or an empty file, is judged by `read_onnx`, which says why)."""
    path = Path(path)
    try:
        if path.is_dir():
            path = path / ONNX_FILE
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise UsageError(
            f"expected an export folder or a .onnx file, but {path} does not exist"
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
    if threads is not None:
        options.intra_op_num_threads = positive_int("threads", threads)
        options.inter_op_num_threads = 1
    return options


class OnnxLSTM:
    """An onnxruntime session over an exported LSTM, with the model's own signature.

    `threads`, `providers` and `optimization` are passed on to onnxruntime; for
    anything else build your own `options` (an `ort.SessionOptions`), which then
    replaces `threads` and `optimization`.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        threads: int | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        optimization: ort.GraphOptimizationLevel | str = "all",
        options: ort.SessionOptions | None = None,
    ) -> None:
        self.path = onnx_file(path)
        if options is None:
            options = session_options(threads, optimization)
        providers = list(providers)
        available = ort.get_available_providers()
        unknown = [p for p in providers if p not in available]
        if unknown or not providers:
            raise UsageError(
                f"providers must be some of this onnxruntime's {available}, got {providers}"
            )
        data = read_onnx(self.path)
        try:
            self.session = ort.InferenceSession(data, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            first = first_line(exc)
            raise UsageError(f"{self.path} is not a loadable ONNX model: {first}") from None
        del data
        meta = self.session.get_modelmeta().custom_metadata_map
        self.config = config_from_metadata(meta, str(self.path))
        layout = meta.get(LAYOUT_KEY, TIME_MAJOR)
        if layout != TIME_MAJOR:  # same names, other axes: it would run, silently wrong
            raise UsageError(
                f"{self.path} is the {layout} variant (for Triton); this runtime takes the "
                "time-major model.onnx of an export"
            )
        names = {"inputs": list(ONNX_INPUTS), "outputs": list(ONNX_OUTPUTS)}
        found = {
            "inputs": [i.name for i in self.session.get_inputs()],
            "outputs": [o.name for o in self.session.get_outputs()],
        }
        if found != names:
            raise UsageError(f"{self.path}: expected {names}, found {found}")
        self._check_dims()

    def _check_dims(self) -> None:
        """The graph's fixed dims must be the ones its metadata config implies: a metadata
        config that lies would pass our input checks and fail inside onnxruntime."""
        cfg = self.config
        layers, hidden = cfg.num_layers, cfg.hidden_size
        expected = {"x": [None, None, cfg.input_size], "y": [None, None, hidden]}
        expected.update({n: [layers, None, hidden] for n in (*ONNX_INPUTS[1:], *ONNX_OUTPUTS[1:])})
        for value in (*self.session.get_inputs(), *self.session.get_outputs()):
            want, got = expected[value.name], list(value.shape)
            pairs = zip(got, want, strict=False)
            fixed_ok = all(w is None or not isinstance(g, int) or g == w for g, w in pairs)
            fits = len(got) == len(want) and fixed_ok
            if not fits:
                shown = ["?" if w is None else w for w in want]
                raise UsageError(
                    f"{self.path}: its {CONFIG_KEY} metadata {cfg.to_dict()} does not fit its "
                    f"graph: {value.name} has shape {got}, the config implies {shown}"
                )

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def signature(self) -> dict:
        """Inputs and outputs as {name: {"shape": [...], "dtype": "float32"}}, as in manifests."""

        def describe(values) -> dict:
            return {
                v.name: {"shape": list(v.shape), "dtype": _ORT_DTYPES.get(v.type, v.type)}
                for v in values
            }

        return {
            "inputs": describe(self.session.get_inputs()),
            "outputs": describe(self.session.get_outputs()),
        }

    def check_state(self, state: State | None, batch: int | None = None) -> State | None:
        """Validate (h0, c0): float, finite, shape [num_layers, batch, hidden_size].

        With `batch` None, the state's own batch is taken (it must be >= 1).
        """
        if state is None:
            return None
        if isinstance(state, str | bytes) or not isinstance(state, Sequence) or len(state) != 2:
            raise UsageError("state must be a pair (h0, c0)")
        cfg = self.config
        checked = []
        for name, tensor in zip(("h0", "c0"), state, strict=True):
            tensor = _as_float32(name, tensor)
            want_batch = batch
            if want_batch is None:
                want_batch = tensor.shape[1] if tensor.ndim == 3 else 0
            expected = [cfg.num_layers, want_batch, cfg.hidden_size]
            if list(tensor.shape) != expected or want_batch < 1:
                shown = "batch>=1" if batch is None else f"batch={batch}"
                raise UsageError(
                    f"{name} must have shape [num_layers={cfg.num_layers}, {shown}, "
                    f"hidden_size={cfg.hidden_size}], got {list(tensor.shape)}"
                )
            checked.append(tensor)
        if batch is None and checked[0].shape != checked[1].shape:
            raise UsageError(
                f"h0 and c0 must have the same shape, got {list(checked[0].shape)} "
                f"and {list(checked[1].shape)}"
            )
        return checked[0], checked[1]

    def check(self, x: Array, state: State | None = None) -> tuple[Array, State]:
        """Validate and normalize inputs; raise `UsageError` naming expected vs received."""
        cfg = self.config
        x = _as_float32("x", x)
        if x.ndim != 3 or x.shape[2] != cfg.input_size or x.shape[0] < 1 or x.shape[1] < 1:
            raise UsageError(
                f"x must have shape [seq>=1, batch>=1, input_size={cfg.input_size}], "
                f"got {list(x.shape)}"
            )
        if state is None:
            zeros = np.zeros([cfg.num_layers, x.shape[1], cfg.hidden_size], dtype=np.float32)
            return x, (zeros, zeros)
        checked = self.check_state(state, batch=x.shape[1])
        assert checked is not None
        return x, checked

    def run(self, x: Array, state: State | None = None) -> tuple[Array, State]:
        """y, (h, c) for a whole sequence; state defaults to zeros."""
        x, (h0, c0) = self.check(x, state)
        y, h, c = self.session.run(["y", "hn", "cn"], {"x": x, "h0": h0, "c0": c0})
        return y, (h, c)

    def stream(self, state: State | None = None) -> Stream:
        """A stream whose successive `step` calls equal one run over the concatenated chunks."""
        return Stream(self, state)


class Stream:
    """Carries (h, c) between chunks of one sequence.

    The batch is fixed by the initial state, or else by the first chunk; a chunk
    of another batch is refused. A refused chunk leaves the state as it was.
    """

    def __init__(self, model: OnnxLSTM, state: State | None = None) -> None:
        self.model = model
        self.state = model.check_state(state)
        self.steps = 0
        self._lock = threading.Lock()

    @property
    def batch(self) -> int | None:
        return None if self.state is None else int(self.state[0].shape[1])

    def step(self, chunk: Array) -> Array:
        with self._lock:
            x = _as_float32("x", chunk)
            batch = self.batch
            if batch is not None and x.ndim == 3 and x.shape[1] != batch:
                raise UsageError(
                    f"this stream has batch {batch}, but the chunk has batch {x.shape[1]} "
                    f"(shape {list(x.shape)})"
                )
            y, state = self.model.run(x, self.state)
            self.state = state
            self.steps += int(x.shape[0])
            return y


def _as_float32(name: str, value: object) -> Array:
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise UsageError(
            f"{name} must be a rectangular array of numbers (every row the same length)"
        ) from None
    if array.dtype.kind != "f":
        raise UsageError(f"{name} must be floating point (float32), got dtype {array.dtype}")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused below
        array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise UsageError(f"{name} must hold only finite numbers, got NaN or infinity")
    return array
