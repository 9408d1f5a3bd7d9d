"""Serve an export with Triton Inference Server: a model repository for the onnxruntime backend.

Triton batches along the first dimension of every tensor, so Triton gets a batch-first
variant of the time-major `model.onnx`: the same graph with a Transpose at each edge.

    x  [batch, seq, input_size]            -> y      [batch, seq, hidden_size]
    h0, c0 [batch, num_layers, hidden_size] -> hn, cn [batch, num_layers, hidden_size]

`config.pbtxt` puts the model under the sequence batcher with implicit state: Triton
keeps each stream's (h, c) between its requests, feeding request i's `hn`/`cn` back as
request i+1's `h0`/`c0`, and zeros (`initial_state { zero_data: true }`) to a stream's
first request. One request is one chunk of one stream, x [1, chunk, input_size] (the
sequence batcher takes batch size 1 per request); Triton stacks up to `max_batch_size`
streams along dim 0, and rows of the LSTM never mix, so whatever fills a slot that has
no request (Triton's null request) does not touch the other streams. No START/READY
control inputs are needed: the zero initial state is the start.

We cannot run a Triton server here. `validate_triton_repo` parses the config with the
`ModelConfig` protobuf that `tritonclient` ships and checks it against the ONNX graph
the way the onnxruntime backend does when it loads a model; the tests simulate what the
sequence batcher does with the state. Before writing, the batch-first graph goes through
the parity engine against the export's eager model in float64 (`check_batch_first`). Only
writing imports torch (to load model.pt, check the export's claims as `verify` does, and run
that check); the batch-first graph and the validator do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from lstm_export.artifacts import MANIFEST_FILE, ONNX_FILE, TORCHSCRIPT_FILE, check_model_name
from lstm_export.config import LSTMConfig
from lstm_export.errors import ParityError, UsageError, first_line
from lstm_export.files import check_export_folder, read_manifest, read_text, write_file
from lstm_export.runtime.onnx import (
    CONFIG_KEY,
    LAYOUT_KEY,
    TIME_MAJOR,
    config_from_metadata,
    load_onnx,
    read_onnx,
)
from lstm_export.staging import staged_folder
from lstm_export.verification.parity import ATOL, FACTOR, Backend, ParityReport, Tolerance

BATCH_FIRST = "batch_first"
CONFIG_FILE = "config.pbtxt"
VERSION = "1"
BACKEND = "onnxruntime"
PLATFORM = "onnxruntime_onnx"  # the legacy spelling of the same backend, accepted on reading
TRITONCLIENT_REQUIREMENT = "tritonclient[grpc]>=2.68"
MAX_IDLE_SECONDS = 5.0
BATCH_FIRST_BACKEND = "onnxruntime batch-first"

INPUT = "x"
OUTPUT = "y"
# (state input, state output) pairs: request i's output is request i+1's input.
STATE_PAIRS = (("h0", "hn"), ("c0", "cn"))
_STATE_INPUTS = tuple(i for i, _ in STATE_PAIRS)
_STATE_OUTPUTS = tuple(o for _, o in STATE_PAIRS)
_TIME_MAJOR_PREFIX = "time_major/"
_ONNX_TO_TRITON = {TensorProto.FLOAT: "TYPE_FP32"}


# ---------------------------------------------------------------------------
# The batch-first graph


def _rename_in_graph(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename values in `graph`'s nodes and in their subgraphs, unless a subgraph shadows them."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        for i, name in enumerate(node.output):
            if name in mapping:
                node.output[i] = mapping[name]
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                own = {v.name for v in sub.input} | {t.name for t in sub.initializer}
                own |= {o for n in sub.node for o in n.output}
                inner = {k: v for k, v in mapping.items() if k not in own}
                if inner:
                    _rename_in_graph(sub, inner)
    for value in graph.value_info:
        if value.name in mapping:
            value.name = mapping[value.name]


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    names |= {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                names |= _all_names(sub)
    return names


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    """A value's shape: ints for fixed dims, the dim_param (or '?') for symbolic ones."""
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
        for d in value.type.tensor_type.shape.dim
    ]


def _metadata(model_proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model_proto.metadata_props}


def _check_time_major(model_proto: onnx.ModelProto, source: str) -> LSTMConfig:
    """The config of an lstm-export time-major graph; UsageError for anything else."""
    meta = _metadata(model_proto)
    config = config_from_metadata(meta, source)
    if meta.get(LAYOUT_KEY, TIME_MAJOR) != TIME_MAJOR:
        raise UsageError(
            f"{source} is already {meta[LAYOUT_KEY]}; give the time-major model.onnx of an export"
        )
    graph = model_proto.graph
    inputs = [v.name for v in graph.input]
    outputs = [v.name for v in graph.output]
    if inputs != [INPUT, *_STATE_INPUTS] or outputs != [OUTPUT, *_STATE_OUTPUTS]:
        raise UsageError(
            f"{source} has inputs {inputs} and outputs {outputs}, "
            f"expected {[INPUT, *_STATE_INPUTS]} and {[OUTPUT, *_STATE_OUTPUTS]}"
        )
    return config


def batch_first_onnx(model_proto: onnx.ModelProto) -> onnx.ModelProto:
    """The batch-first variant of an lstm-export time-major graph, for Triton.

    The time-major graph is kept whole: its inputs and outputs are renamed
    `time_major/<name>` and a Transpose (perm 1, 0, 2) joins each to a new batch-first
    graph input or output of the original name. Opset, IR version and metadata are
    kept; metadata gains `lstm_export.layout = batch_first`.
    """
    config = _check_time_major(model_proto, "the ONNX model")
    layers, hidden = config.num_layers, config.hidden_size
    model = onnx.ModelProto()
    model.CopyFrom(model_proto)
    graph = model.graph
    names = (INPUT, *_STATE_INPUTS, OUTPUT, *_STATE_OUTPUTS)
    mapping = {name: _TIME_MAJOR_PREFIX + name for name in names}
    taken = _all_names(graph) & set(mapping.values())
    if taken:
        raise UsageError(f"the ONNX model already uses the name(s) {sorted(taken)}")
    _rename_in_graph(graph, mapping)

    def transpose(source: str, target: str) -> onnx.NodeProto:
        return helper.make_node(
            "Transpose", [source], [target], name=f"{target}_transpose", perm=[1, 0, 2]
        )

    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(transpose(n, mapping[n]) for n in (INPUT, *_STATE_INPUTS))
    graph.node.extend(body)
    graph.node.extend(transpose(mapping[n], n) for n in (OUTPUT, *_STATE_OUTPUTS))

    float_ = TensorProto.FLOAT
    del graph.input[:]
    graph.input.extend(
        [
            helper.make_tensor_value_info(INPUT, float_, ["batch", "seq", config.input_size]),
            *(
                helper.make_tensor_value_info(n, float_, ["batch", layers, hidden])
                for n in _STATE_INPUTS
            ),
        ]
    )
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(OUTPUT, float_, ["batch", "seq", hidden]),
            *(
                helper.make_tensor_value_info(n, float_, ["batch", layers, hidden])
                for n in _STATE_OUTPUTS
            ),
        ]
    )
    graph.name = f"{graph.name}_batch_first"
    helper.set_model_props(model, {**_metadata(model_proto), LAYOUT_KEY: BATCH_FIRST})
    return model


# ---------------------------------------------------------------------------
# Running the batch-first graph


def _session(model: Path | str | onnx.ModelProto, source: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else read_onnx(model)
    try:
        return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        first = first_line(exc)
        raise UsageError(f"{source} is not a loadable ONNX model: {first}") from None


def batch_first_backend(
    model: Path | str | onnx.ModelProto, name: str = BATCH_FIRST_BACKEND
) -> Backend:
    """A parity `Backend` over a batch-first graph: time-major numpy in and out.

    `model` is a batch-first ModelProto (`batch_first_onnx(...)`), a .onnx file, or a
    Triton model folder (`<repo>/<name>`, whose `1/model.onnx` is used). The inputs are
    transposed to batch-first, run by onnxruntime, and the outputs transposed back, so
    it drops into `check_parity` beside the other backends.
    """
    if isinstance(model, onnx.ModelProto):
        source, meta = "the ONNX model", _metadata(model)
    else:
        path = Path(model)
        if path.is_dir():
            path = path / VERSION / ONNX_FILE
        if not (path.exists() or path.is_symlink()):
            raise UsageError(f"expected a .onnx file or a Triton model folder, got {model}")
        source = str(path)
        model = load_onnx(path)  # refused before reading: not a regular file, empty, > 2 GiB
        meta = _metadata(model)
    if meta.get(LAYOUT_KEY) != BATCH_FIRST or CONFIG_KEY not in meta:
        raise UsageError(f"{source} is not a batch-first graph (no {LAYOUT_KEY}={BATCH_FIRST})")
    config = config_from_metadata(meta, source)
    session = _session(model, source)

    def run(x: np.ndarray, state: tuple[np.ndarray, np.ndarray] | None):
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32).transpose(1, 0, 2))
        if state is None:
            zeros = np.zeros((x.shape[0], config.num_layers, config.hidden_size), np.float32)
            h0 = c0 = zeros
        else:
            h0, c0 = (
                np.ascontiguousarray(np.asarray(s, np.float32).transpose(1, 0, 2)) for s in state
            )
        y, hn, cn = session.run([OUTPUT, *_STATE_OUTPUTS], {INPUT: x, "h0": h0, "c0": c0})
        y, hn, cn = (np.ascontiguousarray(t.transpose(1, 0, 2)) for t in (y, hn, cn))
        return y, hn, cn

    return Backend(name, run)


def check_batch_first(
    export_dir: Path,
    time_major: onnx.ModelProto,
    batch_first: onnx.ModelProto,
    tolerance: Tolerance | None = None,
    *,
    scripted: Any = None,
) -> ParityReport:
    """The batch-first graph on the parity matrix against the export's eager model in float64.

    The reference is rebuilt from the export's `model.pt` (or `scripted`, its already loaded
    (module, config)), so the graph Triton will serve is held to the same rule as every other
    artifact. Raises ParityError (exit 1) naming the worst case when it fails, and when
    model.onnx and model.pt hold different configs (a failed proof, as in `verify`).
    """
    from lstm_export.exporters.torchscript import load_torchscript
    from lstm_export.verification.parity import Reference, check_parity

    module, config = scripted or load_torchscript(export_dir / TORCHSCRIPT_FILE)
    graph_config = _check_time_major(time_major, "the ONNX model")
    if graph_config != config:
        raise ParityError(
            f"{export_dir / ONNX_FILE} holds config {graph_config.to_dict()}, but "
            f"{TORCHSCRIPT_FILE} holds {config.to_dict()}; re-export the folder"
        )
    reference = Reference.from_scripted(module, config)
    report = check_parity(reference, [batch_first_backend(batch_first)], tolerance=tolerance)
    return report.raise_if_failed(f"the batch-first graph of {export_dir / ONNX_FILE}")


# ---------------------------------------------------------------------------
# config.pbtxt


def _triton_dims(value: onnx.ValueInfoProto) -> list[int]:
    """A graph tensor's dims as a batching Triton config lists them: no batch dim, -1 symbolic."""
    return [d if isinstance(d, int) else -1 for d in _dims(value)[1:]]


def _dims_text(dims: list[int]) -> str:
    return "[ " + ", ".join(map(str, dims)) + " ]"


def config_pbtxt(
    model_proto: onnx.ModelProto,
    name: str,
    *,
    max_batch_size: int = 64,
    max_idle_seconds: float = MAX_IDLE_SECONDS,
    expose_state: bool = False,
) -> str:
    """The Triton config of a batch-first graph; `expose_state` also lists hn/cn as outputs."""
    meta = _metadata(model_proto)
    if meta.get(LAYOUT_KEY) != BATCH_FIRST or CONFIG_KEY not in meta:
        raise UsageError("config_pbtxt needs the batch-first graph of batch_first_onnx(...)")
    config = config_from_metadata(meta, "the batch-first graph")
    values = {v.name: v for v in (*model_proto.graph.input, *model_proto.graph.output)}

    def tensor(tensor_name: str) -> str:
        value = values[tensor_name]
        dtype = _ONNX_TO_TRITON[value.type.tensor_type.elem_type]
        return (
            f'  {{\n    name: "{tensor_name}"\n    data_type: {dtype}\n'
            f"    dims: {_dims_text(_triton_dims(value))}\n  }}"
        )

    def state(input_name: str, output_name: str) -> str:
        dims = _dims_text(_triton_dims(values[input_name]))
        return (
            f'    {{\n      input_name: "{input_name}"\n      output_name: "{output_name}"\n'
            f"      data_type: TYPE_FP32\n      dims: {dims}\n"
            f"      initial_state {{\n        data_type: TYPE_FP32\n        dims: {dims}\n"
            f'        zero_data: true\n        name: "zeros"\n      }}\n    }}'
        )

    outputs = [OUTPUT, *(_STATE_OUTPUTS if expose_state else ())]
    lines = [
        "# Written by lstm-export for Triton's onnxruntime backend; 1/model.onnx is batch-first.",
        f"# Model: input_size={config.input_size} hidden_size={config.hidden_size}"
        f" num_layers={config.num_layers} layer_norm={str(config.layer_norm).lower()}.",
        "# One request is one chunk of one stream (correlation id): x [1, chunk, input_size]",
        "# -> y [1, chunk, hidden_size]. The sequence batcher keeps each stream's h and c",
        "# (implicit state), zeros at the stream's first request; up to max_batch_size",
        "# streams run together, stacked along dim 0.",
        f'name: "{name}"',
        f'backend: "{BACKEND}"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        tensor(INPUT),
        "]",
        "output [",
        ",\n".join(tensor(o) for o in outputs),
        "]",
        "sequence_batching {",
        f"  max_sequence_idle_microseconds: {round(max_idle_seconds * 1e6)}",
        "  direct { }",
        "  state [",
        ",\n".join(state(i, o) for i, o in STATE_PAIRS),
        "  ]",
        "}",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Validation


def _model_config_class() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise UsageError(
            f"validating a Triton config needs tritonclient ({exc}); "
            f"install it with pip install '{TRITONCLIENT_REQUIREMENT}'"
        ) from None
    return model_config_pb2


@dataclass
class _Checker:
    problems: list[str]
    data_type_name: Any

    def tensor(self, kind: str, entry: Any, value: onnx.ValueInfoProto) -> None:
        """A config input/output/state against its graph tensor: type and non-batch dims."""
        expected_type = _ONNX_TO_TRITON.get(value.type.tensor_type.elem_type, "TYPE_INVALID")
        got_type = self.data_type_name(entry.data_type)
        if got_type != expected_type:
            self.problems.append(
                f"{kind} has data_type {got_type}, the graph's {value.name} is {expected_type}"
            )
        graph_dims = _dims(value)
        if not graph_dims or isinstance(graph_dims[0], int):
            self.problems.append(
                f"graph tensor {value.name} {graph_dims} has no symbolic batch dim for Triton"
            )
            return
        expected = _triton_dims(value)
        if list(entry.dims) != expected:
            self.problems.append(
                f"{kind} has dims {list(entry.dims)}, expected {expected} "
                f"(the graph's {value.name} {graph_dims} without its batch dim)"
            )


def _version_dirs(model_dir: Path) -> list[Path]:
    return sorted(
        (p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()),
        key=lambda p: int(p.name),
    )


def _validate(model_dir: Path, expected_name: str) -> dict:
    pb2 = _model_config_class()
    from google.protobuf import text_format

    config_path = model_dir / CONFIG_FILE
    if not (config_path.exists() or config_path.is_symlink()):  # what is there: read_text says
        raise UsageError(f"{model_dir} has no {CONFIG_FILE}: not a Triton model folder")
    text = read_text(config_path, "Triton config")  # a regular file, at most 1 MiB
    try:
        config = text_format.Parse(text, pb2.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise UsageError(f"{config_path} is not a valid Triton ModelConfig: {exc}") from None
    filename = config.default_model_filename or ONNX_FILE
    versions = _version_dirs(model_dir)
    if not versions:
        raise UsageError(f"{model_dir} has no version folder (such as {VERSION}/{filename})")
    problems: list[str] = []
    check = _Checker(problems, pb2.DataType.Name)

    if config.name and config.name != expected_name:
        problems.append(f"name is {config.name!r} but the folder is {expected_name!r}")
    backend_ok = config.backend in ("", BACKEND) and config.platform in ("", PLATFORM)
    if not backend_ok or not (config.backend or config.platform):
        problems.append(
            f"backend {config.backend!r} / platform {config.platform!r} is not the "
            f"onnxruntime backend (backend: {BACKEND!r})"
        )
    if config.max_batch_size < 1:
        problems.append(
            f"max_batch_size is {config.max_batch_size}; it must be >= 1 so that dim 0 is "
            "the batch of streams"
        )
    if config.WhichOneof("scheduling_choice") != "sequence_batching":
        problems.append("there is no sequence_batching section (implicit state needs it)")
    batching = config.sequence_batching

    onnx_files = []
    graph_config: dict | None = None
    for version in versions:
        onnx_path = version / filename
        if not (onnx_path.exists() or onnx_path.is_symlink()):  # a FIFO: load_onnx says so
            problems.append(f"version folder {version.name} has no {filename}")
            continue
        onnx_files.append(str(onnx_path))
        try:
            model = load_onnx(onnx_path)
            onnx.checker.check_model(model, full_check=True)
        except Exception as exc:
            first = first_line(exc)
            problems.append(f"{version.name}/{filename} is not a valid ONNX model: {first}")
            continue
        meta = _metadata(model)
        if meta.get(LAYOUT_KEY) != BATCH_FIRST:
            problems.append(
                f"{version.name}/{filename} is not the batch-first graph "
                f"({LAYOUT_KEY} is {meta.get(LAYOUT_KEY)!r})"
            )
        if CONFIG_KEY in meta:
            try:
                graph_config = config_from_metadata(meta, f"{version.name}/{filename}").to_dict()
            except UsageError as exc:
                problems.append(str(exc))
        graph_inputs = {v.name: v for v in model.graph.input}
        graph_outputs = {v.name: v for v in model.graph.output}
        where = f" ({version.name}/{filename})" if len(versions) > 1 else ""

        state_inputs = {s.input_name for s in batching.state}
        controls = {c.name for c in batching.control_input}
        for control in sorted(controls - set(graph_inputs)):
            problems.append(f"control input {control!r} is not an input of the graph{where}")
        listed = set()
        for entry in config.input:
            listed.add(entry.name)
            if entry.name not in graph_inputs:
                problems.append(f"input {entry.name!r} is not an input of the graph{where}")
                continue
            if entry.name in state_inputs:
                problems.append(f"input {entry.name!r} is a state; list it only under state")
            if entry.HasField("reshape"):
                problems.append(f"input {entry.name!r} has a reshape; the graph needs none")
            check.tensor(f"input {entry.name!r}", entry, graph_inputs[entry.name])
        for missing in sorted(set(graph_inputs) - listed - state_inputs - controls):
            problems.append(f"graph input {missing!r} is neither a config input nor a state{where}")

        state_outputs = {s.output_name for s in batching.state}
        listed = set()
        for entry in config.output:
            listed.add(entry.name)
            if entry.name not in graph_outputs:
                problems.append(f"output {entry.name!r} is not an output of the graph{where}")
                continue
            if entry.HasField("reshape"):
                problems.append(f"output {entry.name!r} has a reshape; the graph needs none")
            check.tensor(f"output {entry.name!r}", entry, graph_outputs[entry.name])
        for missing in sorted(set(graph_outputs) - listed - state_outputs):
            problems.append(f"graph output {missing!r} is neither a config output nor a state")

        for state in batching.state:
            for tensor_name, values, role in (
                (state.input_name, graph_inputs, "input"),
                (state.output_name, graph_outputs, "output"),
            ):
                label = f"state {state.input_name!r}"
                if tensor_name not in values:
                    problems.append(
                        f"{label}: {tensor_name!r} is not an {role} of the graph{where}"
                    )
                else:
                    check.tensor(f"{label} ({role} {tensor_name!r})", state, values[tensor_name])

    pairs = {(s.input_name, s.output_name) for s in batching.state}
    if pairs != set(STATE_PAIRS) or len(batching.state) != len(STATE_PAIRS):
        got = [f"{s.input_name}<-{s.output_name}" for s in batching.state]
        want = [f"{i}<-{o}" for i, o in STATE_PAIRS]
        problems.append(f"state entries are {got}, expected {want}")
    for state in batching.state:
        label = f"state {state.input_name!r}"
        if len(state.initial_state) != 1:
            problems.append(
                f"{label} needs exactly one initial_state (zeros), has "
                f"{len(state.initial_state)}: without it a stream starts from garbage"
            )
            continue
        initial = state.initial_state[0]
        if initial.WhichOneof("state_data") != "zero_data" or not initial.zero_data:
            problems.append(f"{label}: initial_state must be zero_data: true")
        if list(initial.dims) != list(state.dims) or any(d < 1 for d in initial.dims):
            problems.append(
                f"{label}: initial_state dims {list(initial.dims)} must equal the state "
                f"dims {list(state.dims)}, all fixed"
            )
        if initial.data_type != state.data_type:
            problems.append(f"{label}: initial_state data_type differs from the state's")
        if not initial.name:
            problems.append(f"{label}: initial_state needs a name")

    if problems:
        raise UsageError(f"{config_path} does not match its ONNX model: " + "; ".join(problems))
    return {
        "model_dir": str(model_dir),
        "config": str(config_path),
        "onnx": onnx_files,
        "name": config.name or expected_name,
        "backend": config.backend or config.platform,
        "max_batch_size": config.max_batch_size,
        "inputs": {e.name: _entry(e, pb2) for e in config.input},
        "outputs": {e.name: _entry(e, pb2) for e in config.output},
        "states": [
            {
                "input": s.input_name,
                "output": s.output_name,
                "data_type": pb2.DataType.Name(s.data_type),
                "dims": list(s.dims),
                "initial_state": "zeros",
            }
            for s in batching.state
        ],
        "max_sequence_idle_microseconds": batching.max_sequence_idle_microseconds,
        "model_config": graph_config,
    }


def _entry(entry: Any, pb2: Any) -> dict:
    return {"data_type": pb2.DataType.Name(entry.data_type), "dims": list(entry.dims)}


def validate_triton_repo(model_dir: Path | str) -> dict:
    """Check `<repo>/<name>` (config.pbtxt and each version's model.onnx) as Triton would.

    Parses config.pbtxt into tritonclient's `ModelConfig` and checks it against the
    graph: onnxruntime backend, max_batch_size >= 1, every graph input either a config
    input or a state input, each input/output/state of the graph's data type with the
    graph's dims less the batch dim (-1 where the graph's dim is symbolic), the state
    pairs h0<-hn and c0<-cn each starting from zeros, and a batch-first graph that
    passes onnx.checker's full check. Returns a summary; raises UsageError listing
    every mismatch.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UsageError(f"expected a Triton model folder (<repo>/<name>), got {model_dir}")
    return _validate(model_dir, model_dir.name)


# ---------------------------------------------------------------------------
# Writing the repository


def _read_export(export_dir: Path, manifest: dict | None) -> tuple[onnx.ModelProto, Any]:
    """The export's time-major graph and its loaded model.pt (module, config), checked
    against what its manifest (if it has one) claims, the way `verify` checks them.

    An artifact that cannot be read as ours is bad input (UsageError, exit 2), whatever the
    manifest says; then a claim that does not hold (model.pt's or model.onnx's sha256, the
    config of either) is a failed proof (ParityError, exit 1), as in `verify`.
    """
    from lstm_export.exporters.torchscript import load_torchscript
    from lstm_export.verification.folder import artifact_table, config_problems, hash_problems

    check_export_folder(export_dir)  # model.pt too: it holds the float64 reference's weights
    onnx_path = export_dir / ONNX_FILE
    model = load_onnx(onnx_path)
    config = _check_time_major(model, str(onnx_path))
    scripted = load_torchscript(export_dir / TORCHSCRIPT_FILE)
    if manifest is not None:
        names = [TORCHSCRIPT_FILE, ONNX_FILE]
        problems = hash_problems(export_dir, artifact_table(export_dir, manifest), names)
        problems += config_problems(manifest, {ONNX_FILE: config})  # model.pt's: below
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ParityError(
                f"{export_dir} is not the export its manifest describes: {problems[0]}{more}; "
                f"re-export it, or run `lstm-export verify {export_dir}` for every problem"
            )
    return model, scripted


def _holds_an_export(folder: Path) -> bool:
    return any((folder / n).exists() for n in (MANIFEST_FILE, TORCHSCRIPT_FILE, ONNX_FILE))


def _check_destination(export_dir: Path, repo: Path, final: Path, force: bool) -> None:
    """Never write into an export folder, and replace only a Triton model folder (or an
    empty one), and only with `force`: nothing else of the user's is ever deleted."""
    for where in (final, repo):
        if where.resolve() == export_dir.resolve() or _holds_an_export(where):
            raise UsageError(
                f"{where} is an lstm-export export folder; Triton models go in a repository "
                "of their own (--repo, default triton_models)"
            )
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise UsageError(f"{final} exists and is not a folder; choose another --repo or --name")
    if final.exists():
        if not force:
            raise UsageError(f"{final} already exists; pass --force to replace it")
        if any(final.iterdir()) and not (final / CONFIG_FILE).is_file():
            raise UsageError(
                f"{final} is not a Triton model folder (no {CONFIG_FILE}) and not empty; "
                "--force replaces only those, so nothing of yours is deleted"
            )


def write_triton_repo(
    export_dir: Path | str,
    repo: Path | str,
    name: str | None = None,
    *,
    max_batch_size: int = 64,
    force: bool = False,
    max_idle_seconds: float = MAX_IDLE_SECONDS,
    expose_state: bool = False,
    validate: bool = True,
    atol: float = ATOL,
    factor: float = FACTOR,
) -> Path:
    """Write `<repo>/<name>/config.pbtxt` and `<repo>/<name>/1/model.onnx` from an export.

    `name` defaults to the manifest's name (else the export folder's). The batch-first
    graph is checked (onnx full_check, and on the parity matrix against the export's
    eager model in float64 within `max(atol, factor x float32 floor)`), then the folder
    is built beside its destination, validated with `validate_triton_repo` (needs
    tritonclient; `validate=False` skips that) and moved into place, so a failure leaves
    nothing behind and an existing folder is replaced only with `force`. Returns `<repo>/<name>`.
    """
    export_dir, repo = Path(export_dir), Path(repo)
    tolerance = Tolerance(atol, factor)
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int):
        raise UsageError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
    if max_batch_size < 1:
        raise UsageError(f"max_batch_size must be >= 1 (dim 0 is the batch), got {max_batch_size}")
    if not max_idle_seconds > 0:
        raise UsageError(f"max_idle_seconds must be > 0, got {max_idle_seconds!r}")
    if repo.exists() and not repo.is_dir():
        raise UsageError(f"{repo} exists and is not a folder; choose another --repo")
    check_export_folder(export_dir)
    manifest = read_manifest(export_dir)  # bounded and depth-limited; None if there is none
    if name is None:
        recorded = (manifest or {}).get("name")
        name = check_model_name(
            recorded or export_dir.resolve().name,
            f"the name {MANIFEST_FILE} records (pass --name)"
            if recorded
            else f"the model name (from the folder {export_dir}; pass --name)",
        )
    else:
        check_model_name(name)
    final = repo / name
    _check_destination(export_dir, repo, final, force)
    if validate:
        _model_config_class()  # fail before any work if tritonclient is missing

    time_major, scripted = _read_export(export_dir, manifest)
    batch_first = batch_first_onnx(time_major)
    onnx.checker.check_model(batch_first, full_check=True)
    check_batch_first(export_dir, time_major, batch_first, tolerance, scripted=scripted)
    text = config_pbtxt(
        batch_first,
        name,
        max_batch_size=max_batch_size,
        max_idle_seconds=max_idle_seconds,
        expose_state=expose_state,
    )

    def replaceable(folder: Path) -> None:  # checked again at the swap, under the lock
        _check_destination(export_dir, repo, folder, force)

    with staged_folder(final, replaceable) as staging:
        (staging / VERSION).mkdir()
        write_file(staging / VERSION / ONNX_FILE, batch_first.SerializeToString())
        write_file(staging / CONFIG_FILE, text)
        if validate:
            _validate(staging, name)
    return final
