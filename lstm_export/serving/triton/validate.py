"""Check a Triton model folder the way the onnxruntime backend does when it loads a model.

We cannot run a Triton server here. This parses config.pbtxt with tritonclient's
`ModelConfig` and checks it against each version's ONNX graph: the backend, batching,
every input, output and state against the graph's tensors, and the implicit state that
makes streaming work (h0<-hn and c0<-cn, each starting from zeros). Every mismatch is
collected, so one run lists them all.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from lstm_export.artifacts import (
    BATCH_FIRST,
    CONFIG_KEY,
    LAYOUT_KEY,
    ONNX_FILE,
    OP_LIBRARY_KEY,
    ORT_KERNEL_LIBRARY,
)
from lstm_export.config import config_from_metadata
from lstm_export.errors import UsageError, first_line
from lstm_export.exporters.batch_first import STATE_PAIRS, VERSION, dims, metadata
from lstm_export.files import sha256
from lstm_export.runtime.onnx import load_onnx
from lstm_export.serving.triton.model_config import (
    BACKEND,
    ONNX_TO_TRITON,
    PLATFORM,
    check_streamable,
    model_config_module,
    read_model_config,
    triton_dims,
)


@dataclass
class _Checker:
    """Collects every mismatch between a parsed ModelConfig and its graphs, in order."""

    data_type_name: Any
    problems: list[str] = field(default_factory=list)

    def tensor(self, kind: str, entry: Any, value: onnx.ValueInfoProto) -> None:
        """A config input/output/state against its graph tensor: type and non-batch dims."""
        expected_type = ONNX_TO_TRITON.get(value.type.tensor_type.elem_type, "TYPE_INVALID")
        got_type = self.data_type_name(entry.data_type)
        if got_type != expected_type:
            self.problems.append(
                f"{kind} has data_type {got_type}, the graph's {value.name} is {expected_type}"
            )
        graph_dims = dims(value)
        if not graph_dims or isinstance(graph_dims[0], int):
            self.problems.append(
                f"graph tensor {value.name} {graph_dims} has no symbolic batch dim for Triton"
            )
            return
        expected = triton_dims(value)
        reshaped = "reshape" in entry.DESCRIPTOR.fields_by_name and entry.HasField("reshape")
        if not expected:  # only the batch dim (lengths): Triton's rule is [1] reshaped to []
            if list(entry.dims) != [1] or not reshaped or list(entry.reshape.shape):
                self.problems.append(
                    f"{kind} must have dims [ 1 ] and reshape {{ shape: [ ] }} (the graph's "
                    f"{value.name} {graph_dims} is only its batch dim)"
                )
            return
        if reshaped:
            self.problems.append(f"{kind} has a reshape; the graph needs none")
        if list(entry.dims) != expected:
            self.problems.append(
                f"{kind} has dims {list(entry.dims)}, expected {expected} "
                f"(the graph's {value.name} {graph_dims} without its batch dim)"
            )

    def header(self, config: Any, expected_name: str) -> None:
        """Name, backend, batching: what Triton checks before it looks at any graph."""
        problems = self.problems
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

    def entries(
        self,
        role: str,
        entries: Any,
        values: dict[str, onnx.ValueInfoProto],
        where: str,
        states: set[str] | None = None,
    ) -> set[str]:
        """Config inputs (or outputs) against the graph's: each one of them, not one of
        `states` (listed only under state), without a reshape, of the right type and dims.
        Returns the names listed."""
        listed = set()
        for entry in entries:
            label = f"{role} {entry.name!r}"
            listed.add(entry.name)
            if entry.name not in values:
                self.problems.append(f"{label} is not an {role} of the graph{where}")
                continue
            if entry.name in (states or ()):
                self.problems.append(f"{label} is a state; list it only under state")
            self.tensor(label, entry, values[entry.name])
        return listed

    def graph(self, config: Any, model: onnx.ModelProto, where: str) -> None:
        """Every config input, output and state against one version's graph, and back."""
        problems, batching = self.problems, config.sequence_batching
        graph_inputs = {v.name: v for v in model.graph.input}
        graph_outputs = {v.name: v for v in model.graph.output}

        state_inputs = {s.input_name for s in batching.state}
        controls = {c.name for c in batching.control_input}
        for control in sorted(controls - set(graph_inputs)):
            problems.append(f"control input {control!r} is not an input of the graph{where}")
        listed = self.entries("input", config.input, graph_inputs, where, state_inputs)
        for entry in config.input:
            if entry.optional and config.max_batch_size != 0:  # the backend's own rule
                problems.append(
                    f"input {entry.name!r} is optional, which Triton's onnxruntime backend "
                    f"refuses for a model that batches{where}"
                )
        # An input with a default (an initializer: lengths) may go unlisted: the graph runs it.
        defaults = {t.name for t in model.graph.initializer}
        for missing in sorted(set(graph_inputs) - listed - state_inputs - controls - defaults):
            problems.append(f"graph input {missing!r} is neither a config input nor a state{where}")

        state_outputs = {s.output_name for s in batching.state}
        listed = self.entries("output", config.output, graph_outputs, where)
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
                    self.tensor(f"{label} ({role} {tensor_name!r})", state, values[tensor_name])

    def states(self, batching: Any) -> None:
        """The implicit state: exactly h0<-hn and c0<-cn, each starting from named zeros."""
        problems = self.problems
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


def _version_dirs(model_dir: Path) -> list[Path]:
    return sorted(
        (p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()),
        key=lambda p: int(p.name),
    )


def _op_library_problems(
    model_dir: Path, config: Any, needs_library: bool, library_sha256: str | None
) -> list[str]:
    """The op libraries config.pbtxt names (`model_operations`): each an absolute path whose
    file name is the fused kernel's library, present in the model folder as a regular file
    (a link could point anywhere), of the export manifest's sha256 when it is given; and
    one named exactly when a graph needs it."""
    named = list(config.model_operations.op_library_filename)
    if not named:
        if needs_library:
            return [
                f"the graph runs the fused kernel's op, but config.pbtxt names no "
                f"model_operations {{ op_library_filename }} ({ORT_KERNEL_LIBRARY})"
            ]
        return []
    if not needs_library:
        return [f"config.pbtxt names op libraries {named}, but no graph needs one"]
    problems = []
    for name in named:
        if not os.path.isabs(name):
            problems.append(
                f"op_library_filename {name!r} is not an absolute path (Triton loads it as "
                "given, from its own working directory)"
            )
        if Path(name).name != ORT_KERNEL_LIBRARY:
            problems.append(f"op_library_filename {name!r} is not {ORT_KERNEL_LIBRARY}")
            continue
        local = model_dir / ORT_KERNEL_LIBRARY
        try:
            info = os.lstat(local)
        except FileNotFoundError:
            problems.append(f"{ORT_KERNEL_LIBRARY} is not in the model folder {model_dir}")
            continue
        if not stat.S_ISREG(info.st_mode):
            problems.append(f"{local} is not a regular file")
        elif library_sha256 is not None and sha256(local) != library_sha256:
            problems.append(
                f"{local} is not the export's library (its sha256 differs from the manifest's)"
            )
    return problems


def validate_model_folder(
    model_dir: Path, expected_name: str, *, library_sha256: str | None = None
) -> dict:
    """`validate_triton_repo` on a folder whose name may differ from the model's: the writer
    validates its staging folder under the name it will have once moved into place."""
    pb2 = model_config_module()
    config_path, config = read_model_config(model_dir)
    filename = config.default_model_filename or ONNX_FILE
    versions = _version_dirs(model_dir)
    if not versions:
        raise UsageError(f"{model_dir} has no version folder (such as {VERSION}/{filename})")
    check = _Checker(pb2.DataType.Name)
    check.header(config, expected_name)

    onnx_files = []
    graph_config: dict | None = None
    needs_library = False
    for version in versions:
        onnx_path = version / filename
        if not (onnx_path.exists() or onnx_path.is_symlink()):  # a FIFO: load_onnx says so
            check.problems.append(f"version folder {version.name} has no {filename}")
            continue
        onnx_files.append(str(onnx_path))
        try:
            model = load_onnx(onnx_path)
            onnx.checker.check_model(model, full_check=True)
        except Exception as exc:
            first = first_line(exc)
            check.problems.append(f"{version.name}/{filename} is not a valid ONNX model: {first}")
            continue
        meta = metadata(model)
        needs_library |= meta.get(OP_LIBRARY_KEY) == ORT_KERNEL_LIBRARY
        if meta.get(LAYOUT_KEY) != BATCH_FIRST:
            check.problems.append(
                f"{version.name}/{filename} is not the batch-first graph "
                f"({LAYOUT_KEY} is {meta.get(LAYOUT_KEY)!r})"
            )
        if CONFIG_KEY in meta:
            try:
                read = config_from_metadata(meta, f"{version.name}/{filename}")
                graph_config = read.to_dict()
                check_streamable(read, f"{version.name}/{filename}")
            except UsageError as exc:
                check.problems.append(str(exc))
        where = f" ({version.name}/{filename})" if len(versions) > 1 else ""
        check.graph(config, model, where)
    batching = config.sequence_batching
    check.states(batching)
    check.problems += _op_library_problems(model_dir, config, needs_library, library_sha256)

    if check.problems:
        raise UsageError(
            f"{config_path} does not match its ONNX model: " + "; ".join(check.problems)
        )
    return {
        "model_dir": str(model_dir),
        "config": str(config_path),
        "onnx": onnx_files,
        "name": config.name or expected_name,
        "backend": config.backend or config.platform,
        "max_batch_size": config.max_batch_size,
        "inputs": {e.name: {**_entry(e, pb2), "optional": e.optional} for e in config.input},
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
        "op_libraries": list(config.model_operations.op_library_filename),
    }


def _entry(entry: Any, pb2: Any) -> dict:
    return {"data_type": pb2.DataType.Name(entry.data_type), "dims": list(entry.dims)}


def validate_triton_repo(model_dir: Path | str, *, library_sha256: str | None = None) -> dict:
    """Check `<repo>/<name>` (config.pbtxt and each version's model.onnx) as Triton would.

    Parses config.pbtxt into tritonclient's `ModelConfig` and checks it against the
    graph: onnxruntime backend, max_batch_size >= 1, every graph input either a config
    input or a state input, each input/output/state of the graph's data type with the
    graph's dims less the batch dim (-1 where the graph's dim is symbolic), the state
    pairs h0<-hn and c0<-cn each starting from zeros, and a batch-first graph that
    passes onnx.checker's full check. A graph of the fused kernel (model.fused.onnx's) needs
    `model_operations { op_library_filename }` naming the absolute path of
    liblstm_export_ort_ops.so, which must be a regular file in the model folder (of
    `library_sha256`, the export manifest's, when given). Returns a summary; raises
    UsageError listing every mismatch.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UsageError(f"expected a Triton model folder (<repo>/<name>), got {model_dir}")
    return validate_model_folder(model_dir, model_dir.name, library_sha256=library_sha256)
