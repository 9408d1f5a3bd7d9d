"""The batch-first graph Triton serves, derived from an export's time-major `model.onnx`.

Triton batches along the first dimension of every tensor, so Triton gets a batch-first
variant of the time-major graph: the same graph with a Transpose at each edge.

    x  [batch, seq, input_size]            -> y      [batch, seq, hidden_size]
    h0, c0 [batch, num_layers, hidden_size] -> hn, cn [batch, num_layers, hidden_size]

An export step like the others (model.onnx in, a ModelProto out), but with no torch: the
Triton writer and `verify` both derive it, and a reader that never exports can too.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from lstm_export.artifacts import (
    BATCH_FIRST,
    LAYOUT_KEY,
    ONNX_INPUTS,
    ONNX_OUTPUTS,
    TIME_MAJOR,
)
from lstm_export.config import LSTMConfig, config_from_metadata
from lstm_export.errors import UsageError

VERSION = "1"
"""The Triton version folder that holds the batch-first graph: `<repo>/<name>/1/model.onnx`."""
INPUT, OUTPUT = ONNX_INPUTS[0], ONNX_OUTPUTS[0]
STATE_PAIRS = tuple(zip(ONNX_INPUTS[1:], ONNX_OUTPUTS[1:], strict=True))
"""(state input, state output) pairs: request i's output is request i+1's input."""
STATE_INPUTS = tuple(i for i, _ in STATE_PAIRS)
STATE_OUTPUTS = tuple(o for _, o in STATE_PAIRS)
_TIME_MAJOR_PREFIX = "time_major/"


def metadata(model_proto: onnx.ModelProto) -> dict[str, str]:
    """A graph's metadata_props as a dict (the config, the layout)."""
    return {p.key: p.value for p in model_proto.metadata_props}


def dims(value: onnx.ValueInfoProto) -> list[int | str]:
    """A value's shape: ints for fixed dims, the dim_param (or '?') for symbolic ones."""
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
        for d in value.type.tensor_type.shape.dim
    ]


def check_time_major(model_proto: onnx.ModelProto, source: str) -> LSTMConfig:
    """The config of an lstm-export time-major graph; UsageError for anything else."""
    meta = metadata(model_proto)
    config = config_from_metadata(meta, source)
    if meta.get(LAYOUT_KEY, TIME_MAJOR) != TIME_MAJOR:
        raise UsageError(
            f"{source} is already {meta[LAYOUT_KEY]}; give the time-major model.onnx of an export"
        )
    graph = model_proto.graph
    inputs = [v.name for v in graph.input]
    outputs = [v.name for v in graph.output]
    if inputs != [INPUT, *STATE_INPUTS] or outputs != [OUTPUT, *STATE_OUTPUTS]:
        raise UsageError(
            f"{source} has inputs {inputs} and outputs {outputs}, "
            f"expected {[INPUT, *STATE_INPUTS]} and {[OUTPUT, *STATE_OUTPUTS]}"
        )
    return config


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


def batch_first_onnx(model_proto: onnx.ModelProto) -> onnx.ModelProto:
    """The batch-first variant of an lstm-export time-major graph, for Triton.

    The time-major graph is kept whole: its inputs and outputs are renamed
    `time_major/<name>` and a Transpose (perm 1, 0, 2) joins each to a new batch-first
    graph input or output of the original name. Opset, IR version and metadata are
    kept; metadata gains `lstm_export.layout = batch_first`.
    """
    config = check_time_major(model_proto, "the ONNX model")
    layers, hidden = config.num_layers, config.hidden_size
    model = onnx.ModelProto()
    model.CopyFrom(model_proto)
    graph = model.graph
    names = (INPUT, *STATE_INPUTS, OUTPUT, *STATE_OUTPUTS)
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
    graph.node.extend(transpose(n, mapping[n]) for n in (INPUT, *STATE_INPUTS))
    graph.node.extend(body)
    graph.node.extend(transpose(mapping[n], n) for n in (OUTPUT, *STATE_OUTPUTS))

    float_ = TensorProto.FLOAT
    del graph.input[:]
    graph.input.extend(
        [
            helper.make_tensor_value_info(INPUT, float_, ["batch", "seq", config.input_size]),
            *(
                helper.make_tensor_value_info(n, float_, ["batch", layers, hidden])
                for n in STATE_INPUTS
            ),
        ]
    )
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(OUTPUT, float_, ["batch", "seq", hidden]),
            *(
                helper.make_tensor_value_info(n, float_, ["batch", layers, hidden])
                for n in STATE_OUTPUTS
            ),
        ]
    )
    graph.name = f"{graph.name}_batch_first"
    helper.set_model_props(model, {**metadata(model_proto), LAYOUT_KEY: BATCH_FIRST})
    return model
