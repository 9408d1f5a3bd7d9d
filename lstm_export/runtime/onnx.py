"""Run an exported `model.onnx` (or, with `fused=True`, `model.fused.onnx` and our own build
of its op library) with onnxruntime, without importing torch.

Inputs are checked here, before onnxruntime sees them, so a caller gets one
clear sentence (a `UsageError`) instead of an onnxruntime stack trace.
`InferenceSession.run` is thread-safe and `OnnxLSTM` keeps no per-call state,
so one `OnnxLSTM` can be shared by many threads. A `Stream` holds one
sequence's state; its `step` takes a lock, so concurrent steps on one stream
serialize instead of corrupting it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from numpy.typing import ArrayLike

from lstm_export.artifacts import (
    BATCH_FIRST,
    CONFIG_KEY,
    FUSED_ONNX_FILE,
    LAYOUT_KEY,
    LENGTHS_INPUT,
    ONNX_FILE,
    ONNX_INPUTS,
    ONNX_OUTPUTS,
    OP_LIBRARY_KEY,
    ORT_KERNEL_LIBRARY,
    TIME_MAJOR,
)
from lstm_export.config import config_from_metadata
from lstm_export.errors import UsageError, first_line
from lstm_export.native import ort_kernel
from lstm_export.runtime.sessions import (
    load_onnx,
    onnx_file,
    read_onnx,
    register_op_library,
    session_options,
)

__all__ = [
    "BIDIRECTIONAL_STREAM",
    "OnnxLSTM",
    "Stream",
    "load_onnx",
    "read_onnx",
    "session_options",
]
"""What other modules take from here (the last three live in `sessions`)."""

Array = np.ndarray
State = tuple[Array, Array]

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64"}
BIDIRECTIONAL_STREAM = (
    "a stream cannot run a bidirectional model: its reverse direction starts from the end "
    "of the sequence, which a stream has not seen; run the whole sequence instead"
)
"""Why `OnnxLSTM.stream` refuses a bidirectional model."""


class OnnxLSTM:
    """An onnxruntime session over an exported LSTM, with the model's own signature.

    `threads`, `providers` and `optimization` are passed on to onnxruntime; for
    anything else build your own `options` (an `ort.SessionOptions`), which then
    replaces `threads` and `optimization`.

    `fused=True` runs `model.fused.onnx` (a folder's, or the file given), whose layers are
    the fused kernel's op: our own build of its library is registered on the options first
    (`register_op_library`), never the copy beside the graph. Without it, a graph that
    needs the library is refused with a line saying so.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        threads: int | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        optimization: ort.GraphOptimizationLevel | str = "all",
        options: ort.SessionOptions | None = None,
        fused: bool = False,
    ) -> None:
        self.fused = fused
        self.path = onnx_file(path, FUSED_ONNX_FILE if fused else ONNX_FILE)
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
        if fused:
            register_op_library(options)
        try:
            self.session = ort.InferenceSession(data, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            first = first_line(exc)
            op = f"{ort_kernel.DOMAIN}:{ort_kernel.OP_TYPE}"
            if not fused and op in first:  # onnxruntime: "... is not a registered function/op"
                raise UsageError(
                    f"{self.path} runs the fused kernel's op {op}, which onnxruntime knows "
                    f"only from {ORT_KERNEL_LIBRARY}: load it with fused=True"
                ) from None
            raise UsageError(f"{self.path} is not a loadable ONNX model: {first}") from None
        del data
        meta = self.session.get_modelmeta().custom_metadata_map
        self.config = config_from_metadata(meta, str(self.path))
        if fused and meta.get(OP_LIBRARY_KEY) != ORT_KERNEL_LIBRARY:
            raise UsageError(
                f"{self.path} is not a graph of the fused kernel (its metadata names no "
                f"{OP_LIBRARY_KEY}); fused=True takes an export's {FUSED_ONNX_FILE}"
            )
        inputs = self.session.get_inputs()
        # An input with a default (lengths) is an overridable initializer, listed apart.
        optional = self.session.get_overridable_initializers()
        self._values = {v.name: v for v in (*inputs, *optional, *self.session.get_outputs())}
        layout = meta.get(LAYOUT_KEY, TIME_MAJOR)
        own = BATCH_FIRST if self.config.batch_first else TIME_MAJOR
        states_first = len(inputs) > 1 and not isinstance(inputs[1].shape[0], int)
        if layout != own or states_first:  # same names, other axes: it would run, silently wrong
            raise UsageError(
                f"{self.path} is the {layout} variant (for Triton); this runtime takes the "
                "model.onnx of an export"
            )
        names = {"inputs": list(ONNX_INPUTS), "outputs": list(ONNX_OUTPUTS)}
        found = {
            "inputs": [i.name for i in inputs] + [i.name for i in optional],
            "outputs": [o.name for o in self.session.get_outputs()],
        }
        self.has_lengths = found["inputs"] == [*ONNX_INPUTS, LENGTHS_INPUT]
        """Whether the graph takes `lengths` (exports before it existed do not)."""
        if self.has_lengths:
            names["inputs"].append(LENGTHS_INPUT)
        if found != names:
            raise UsageError(f"{self.path}: expected {names}, found {found}")
        self._check_dims()

    @property
    def batch_axis(self) -> int:
        """The axis of x and y that is the batch (0 for a batch_first model, else 1)."""
        return 0 if self.config.batch_first else 1

    @property
    def time_axis(self) -> int:
        """The axis of x and y that is time: a stream's chunks follow one another along it."""
        return 1 - self.batch_axis

    def _check_dims(self) -> None:
        """The graph's fixed dims must be the ones its metadata config implies: a metadata
        config that lies would pass our input checks and fail inside onnxruntime."""
        cfg = self.config
        layers, hidden = cfg.state_layers, cfg.hidden_size
        expected = {
            "x": [None, None, cfg.input_size],
            "y": [None, None, cfg.output_size],
            LENGTHS_INPUT: [None],
        }
        expected.update({n: [layers, None, hidden] for n in (*ONNX_INPUTS[1:], *ONNX_OUTPUTS[1:])})
        for value in self._values.values():
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

        optional = self.session.get_overridable_initializers()  # lengths, when it is there
        return {
            "inputs": describe([*self.session.get_inputs(), *optional]),
            "outputs": describe(self.session.get_outputs()),
        }

    def check_state(self, state: State | None, batch: int | None = None) -> State | None:
        """Validate (h0, c0): float, finite, shape [num_layers * D, batch, hidden_size].

        With `batch` None, the state's own batch is taken (it must be >= 1).
        """
        if state is None:
            return None
        if isinstance(state, str | bytes) or not isinstance(state, Sequence) or len(state) != 2:
            raise UsageError("state must be a pair (h0, c0)")
        cfg = self.config
        layers = "num_layers" if cfg.num_directions == 1 else "num_layers*2"
        checked = []
        for name, tensor in zip(("h0", "c0"), state, strict=True):
            tensor = _as_float32(name, tensor)
            want_batch = batch
            if want_batch is None:
                want_batch = tensor.shape[1] if tensor.ndim == 3 else 0
            expected = [cfg.state_layers, want_batch, cfg.hidden_size]
            if list(tensor.shape) != expected or want_batch < 1:
                shown = "batch>=1" if batch is None else f"batch={batch}"
                raise UsageError(
                    f"{name} must have shape [{layers}={cfg.state_layers}, {shown}, "
                    f"hidden_size={cfg.hidden_size}], got {list(tensor.shape)}"
                )
            checked.append(tensor)
        if batch is None and checked[0].shape != checked[1].shape:
            raise UsageError(
                f"h0 and c0 must have the same shape, got {list(checked[0].shape)} "
                f"and {list(checked[1].shape)}"
            )
        return checked[0], checked[1]

    def check_lengths(self, lengths: ArrayLike | None, seq: int, batch: int) -> Array | None:
        """Validate `lengths`: integers, shape [batch], each in 1..seq; int64 as the graph
        takes it. A graph exported before `lengths` existed refuses it."""
        if lengths is None:
            return None
        if not self.has_lengths:
            raise UsageError(
                f"{self.path} predates {LENGTHS_INPUT} (it has no {LENGTHS_INPUT} input); "
                "re-export the model to run padded batches"
            )
        try:
            array = np.asarray(lengths)
        except (ValueError, TypeError):
            array = np.asarray(None)  # ragged nesting: refused as not integers below
        if array.dtype.kind not in "iu":
            raise UsageError(
                f"{LENGTHS_INPUT} must be an integer array (int64), got dtype {array.dtype}"
            )
        if array.shape != (batch,):
            raise UsageError(
                f"{LENGTHS_INPUT} must be an integer array of shape [batch={batch}], "
                f"got {list(array.shape)}"
            )
        shortest, longest = int(array.min()), int(array.max())
        if shortest < 1 or longest > seq:
            bad = shortest if shortest < 1 else longest
            raise UsageError(f"{LENGTHS_INPUT} must each be in 1..seq={seq}, got {bad}")
        return np.ascontiguousarray(array, dtype=np.int64)

    def check(
        self, x: Array, state: State | None = None, lengths: ArrayLike | None = None
    ) -> tuple[Array, State, Array | None]:
        """Validate and normalize inputs; raise `UsageError` naming expected vs received.

        x is in the model's layout: [seq, batch, input_size], or [batch, seq, input_size]
        for a batch_first model.
        """
        cfg = self.config
        x = _as_float32("x", x)
        if x.ndim != 3 or x.shape[2] != cfg.input_size or x.shape[0] < 1 or x.shape[1] < 1:
            axes = ("batch>=1", "seq>=1") if cfg.batch_first else ("seq>=1", "batch>=1")
            raise UsageError(
                f"x must have shape [{axes[0]}, {axes[1]}, input_size={cfg.input_size}], "
                f"got {list(x.shape)}"
            )
        seq, batch = int(x.shape[self.time_axis]), int(x.shape[self.batch_axis])
        checked_lengths = self.check_lengths(lengths, seq, batch)
        if state is None:
            zeros = np.zeros([cfg.state_layers, batch, cfg.hidden_size], dtype=np.float32)
            return x, (zeros, zeros), checked_lengths
        checked = self.check_state(state, batch=batch)
        assert checked is not None
        return x, checked, checked_lengths

    def run(
        self, x: Array, state: State | None = None, lengths: ArrayLike | None = None
    ) -> tuple[Array, State]:
        """y, (h, c) for a whole (padded) batch; state defaults to zeros, lengths (int64
        [batch], each in 1..seq) to every sequence full. y is zero past each length and
        (h, c) is each sequence's state at its last valid step."""
        x, (h0, c0), lengths = self.check(x, state, lengths)
        feed = dict(zip(ONNX_INPUTS, (x, h0, c0), strict=True))
        if lengths is not None:
            feed[LENGTHS_INPUT] = lengths
        y, h, c = self.session.run(list(ONNX_OUTPUTS), feed)
        return y, (h, c)

    def stream(self, state: State | None = None) -> Stream:
        """A stream whose successive `step` calls equal one run over the concatenated chunks
        (along the time axis of the model's layout); refused for a bidirectional model."""
        return Stream(self, state)


class Stream:
    """Carries (h, c) between chunks of one sequence.

    Chunks follow one another along the time axis of the model's layout (axis 1 for a
    batch_first model). The batch is fixed by the initial state, or else by the first
    chunk; a chunk of another batch is refused. A refused chunk leaves the state as it was.
    A bidirectional model has no streams (`BIDIRECTIONAL_STREAM` says why).
    """

    def __init__(self, model: OnnxLSTM, state: State | None = None) -> None:
        if model.config.bidirectional:
            raise UsageError(BIDIRECTIONAL_STREAM)
        self.model = model
        self.state = model.check_state(state)
        self.steps = 0
        self._lock = threading.Lock()

    @property
    def batch(self) -> int | None:
        return None if self.state is None else int(self.state[0].shape[1])

    def step(self, chunk: Array, *, restart: bool = False) -> Array:
        """y of the chunk, run from the state the previous chunks left (`restart`: from
        zeros, as a new sequence of the chunk's batch, forgetting what came before)."""
        with self._lock:
            x = _as_float32("x", chunk)
            batch, axis = self.batch, self.model.batch_axis
            if not restart and batch is not None and x.ndim == 3 and x.shape[axis] != batch:
                raise UsageError(
                    f"this stream has batch {batch}, but the chunk has batch {x.shape[axis]} "
                    f"(shape {list(x.shape)})"
                )
            y, state = self.model.run(x, None if restart else self.state)
            self.state = state
            steps = int(x.shape[self.model.time_axis])
            self.steps = steps if restart else self.steps + steps
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
