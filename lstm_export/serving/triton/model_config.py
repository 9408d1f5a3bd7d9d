"""config.pbtxt: the text `write_triton_repo` writes, and reading it back as Triton does.

Writing needs nothing but the batch-first graph; reading parses with the `ModelConfig`
protobuf that `tritonclient` ships (the `triton` extra), so a config is judged by the
schema Triton itself loads, not by our own reading of the text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import onnx
from onnx import TensorProto

from lstm_export.artifacts import BATCH_FIRST, CONFIG_KEY, LAYOUT_KEY, LENGTHS_INPUT
from lstm_export.config import LSTMConfig, config_from_metadata
from lstm_export.errors import UsageError
from lstm_export.exporters.batch_first import (
    INPUT,
    OUTPUT,
    STATE_OUTPUTS,
    STATE_PAIRS,
    dims,
    metadata,
)
from lstm_export.files import read_text

CONFIG_FILE = "config.pbtxt"
BACKEND = "onnxruntime"
PLATFORM = "onnxruntime_onnx"
"""The platform Triton fills in for backend onnxruntime (its model metadata shows it); also
the legacy spelling of the same backend, accepted on reading."""
TRITONCLIENT_REQUIREMENT = "tritonclient[grpc]>=2.68"
MAX_IDLE_SECONDS = 5.0
ONNX_TO_TRITON = {TensorProto.FLOAT: "TYPE_FP32", TensorProto.INT64: "TYPE_INT64"}


def check_streamable(config: LSTMConfig, source: str) -> None:
    """Refuse a bidirectional model: the sequence batcher runs a stream chunk by chunk,
    and a reverse direction would have to start at the stream's end, not yet sent."""
    if config.bidirectional:
        raise UsageError(
            f"{source} is bidirectional, which Triton's sequence batcher cannot serve: a "
            "stream cannot run backwards from an end it has not seen; serve whole sequences "
            "with `lstm-export serve` (POST /v1/predict) or onnxruntime instead"
        )


def triton_dims(value: onnx.ValueInfoProto) -> list[int]:
    """A graph tensor's dims as a batching Triton config lists them: no batch dim, -1 symbolic."""
    return [d if isinstance(d, int) else -1 for d in dims(value)[1:]]


class TritonTensor(NamedTuple):
    """One tensor of the Triton model: its name, config data type and dims (no batch dim)."""

    name: str
    data_type: str  # the config's spelling, TYPE_FP32
    dims: list[int]


def model_signature(
    model_proto: onnx.ModelProto, *, expose_state: bool = False
) -> tuple[list[TritonTensor], list[TritonTensor]]:
    """The inputs and outputs the Triton model shows its clients, from a batch-first graph:
    x in, y out (and hn, cn with `expose_state`); the states themselves are the sequence
    batcher's, never the client's. What `config_pbtxt` writes and `serve`'s /v2 reports."""
    values = {v.name: v for v in (*model_proto.graph.input, *model_proto.graph.output)}

    def spec(name: str) -> TritonTensor:
        value = values[name]
        dtype = ONNX_TO_TRITON[value.type.tensor_type.elem_type]
        return TritonTensor(name, dtype, triton_dims(value))

    outputs = [OUTPUT, *(STATE_OUTPUTS if expose_state else ())]
    return [spec(INPUT)], [spec(name) for name in outputs]


def _dims_text(values: list[int]) -> str:
    return "[ " + ", ".join(map(str, values)) + " ]"


def config_pbtxt(
    model_proto: onnx.ModelProto,
    name: str,
    *,
    max_batch_size: int = 64,
    max_idle_seconds: float = MAX_IDLE_SECONDS,
    expose_state: bool = False,
    op_library: str | None = None,
) -> str:
    """The Triton config of a batch-first graph; `expose_state` also lists hn/cn as outputs.

    `op_library`, for the batch-first graph of model.fused.onnx: the path of the fused
    kernel's op library, as `model_operations { op_library_filename }` (Triton's onnxruntime
    backend registers it on the session options as it is given: an absolute path, since a
    relative one would be taken from Triton's working directory)."""
    meta = metadata(model_proto)
    if meta.get(LAYOUT_KEY) != BATCH_FIRST or CONFIG_KEY not in meta:
        raise UsageError("config_pbtxt needs the batch-first graph of batch_first_onnx(...)")
    config = config_from_metadata(meta, "the batch-first graph")
    check_streamable(config, "the model")
    values = {v.name: v for v in (*model_proto.graph.input, *model_proto.graph.output)}
    has_lengths = LENGTHS_INPUT in {v.name for v in model_proto.graph.input}
    inputs, outputs = model_signature(model_proto, expose_state=expose_state)

    def tensor(spec: TritonTensor) -> str:
        return (
            f'  {{\n    name: "{spec.name}"\n    data_type: {spec.data_type}\n'
            f"    dims: {_dims_text(spec.dims)}\n  }}"
        )

    def state(input_name: str, output_name: str) -> str:
        shape = _dims_text(triton_dims(values[input_name]))
        return (
            f'    {{\n      input_name: "{input_name}"\n      output_name: "{output_name}"\n'
            f"      data_type: TYPE_FP32\n      dims: {shape}\n"
            f"      initial_state {{\n        data_type: TYPE_FP32\n        dims: {shape}\n"
            f'        zero_data: true\n        name: "zeros"\n      }}\n    }}'
        )

    lines = [
        "# Written by lstm-export for Triton's onnxruntime backend; 1/model.onnx is batch-first.",
        f"# Model: input_size={config.input_size} hidden_size={config.hidden_size}"
        f" num_layers={config.num_layers} layer_norm={str(config.layer_norm).lower()}.",
        "# One request is one chunk of one stream (correlation id): x [1, chunk, input_size]",
        "# -> y [1, chunk, hidden_size]. The sequence batcher keeps each stream's h and c",
        "# (implicit state), zeros at the stream's first request; up to max_batch_size",
        "# streams run together, stacked along dim 0.",
        *(
            [
                f"# The graph's optional {LENGTHS_INPUT} is not listed: Triton's onnxruntime "
                "backend refuses",
                "# optional inputs on a model that batches, so every chunk runs all its steps",
                "# (its default: the graph's empty initializer).",
            ]
            if has_lengths
            else []
        ),
        f'name: "{name}"',
        f'backend: "{BACKEND}"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        ",\n".join(tensor(i) for i in inputs),
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
    if op_library is not None:
        quoted = json.dumps(op_library, ensure_ascii=False)  # a protobuf text string
        lines += [
            "# The fused kernel's op library, beside config.pbtxt: if this folder is moved",
            "# (a container's /models), give its new absolute path here.",
            f"model_operations {{ op_library_filename: {quoted} }}",
        ]
    return "\n".join(lines) + "\n"


def model_config_module() -> Any:
    """tritonclient's `model_config_pb2`; a UsageError saying how to install it if missing."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise UsageError(
            f"validating a Triton config needs tritonclient ({exc}); "
            f"install it with pip install '{TRITONCLIENT_REQUIREMENT}'"
        ) from None
    return model_config_pb2


def read_model_config(model_dir: Path) -> tuple[Path, Any]:
    """`<model_dir>/config.pbtxt` and its parsed `ModelConfig`; UsageError if it is not one."""
    pb2 = model_config_module()
    from google.protobuf import text_format

    config_path = model_dir / CONFIG_FILE
    if not (config_path.exists() or config_path.is_symlink()):  # what is there: read_text says
        raise UsageError(f"{model_dir} has no {CONFIG_FILE}: not a Triton model folder")
    text = read_text(config_path, "Triton config")  # a regular file, at most 1 MiB
    try:
        config = text_format.Parse(text, pb2.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise UsageError(f"{config_path} is not a valid Triton ModelConfig: {exc}") from None
    return config_path, config
