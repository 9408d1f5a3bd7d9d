"""Batch-first graphs derived from a time-major one: Transposes at the edges, no torch.

Two graphs are batch-first:

- the `model.onnx` of a `batch_first=True` model: x [batch, seq, input_size] and
  y [batch, seq, D * hidden_size], states layer-major [num_layers * D, batch, hidden_size]
  as in nn.LSTM (`batch_first_io`, which `build_onnx` applies);
- the variant Triton serves (`batch_first_onnx`): Triton batches along the first dimension
  of every tensor, so its states are batch-major too:

    x  [batch, seq, input_size]                 -> y      [batch, seq, D * hidden_size]
    h0, c0 [batch, num_layers * D, hidden_size] -> hn, cn [batch, num_layers * D, hidden_size]

Both carry metadata `lstm_export.layout = batch_first`; which one a graph is shows in its
state inputs (their first dim is the batch only in Triton's). An optional `lengths` input
([batch] already) passes through untouched.

An export step like the others (model.onnx in, a ModelProto out), but with no torch: the
Triton writer and `verify` both derive it, and a reader that never exports can too.
"""

from __future__ import annotations

import onnx
from onnx import helper

from lstm_export.artifacts import (
    BATCH_FIRST,
    LAYOUT_KEY,
    LENGTHS_INPUT,
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


def states_batch_major(model_proto: onnx.ModelProto) -> bool:
    """Whether the graph's states are [batch, num_layers * D, hidden] (Triton's variant)
    rather than layer-major: their first dim is symbolic instead of the layer count."""
    h0 = next((v for v in model_proto.graph.input if v.name == STATE_INPUTS[0]), None)
    return h0 is not None and bool(dims(h0)) and not isinstance(dims(h0)[0], int)


def check_export_graph(model_proto: onnx.ModelProto, source: str) -> LSTMConfig:
    """The config of an export's model.onnx (time-major, or batch-first x and y for a
    batch_first model); UsageError for anything else, Triton's variant included."""
    meta = metadata(model_proto)
    config = config_from_metadata(meta, source)
    layout = meta.get(LAYOUT_KEY, TIME_MAJOR)
    own = BATCH_FIRST if config.batch_first else TIME_MAJOR
    if layout != own or states_batch_major(model_proto):
        raise UsageError(
            f"{source} is the {layout} variant (for Triton); give the model.onnx of an export"
        )
    graph = model_proto.graph
    inputs = [v.name for v in graph.input]
    outputs = [v.name for v in graph.output]
    expected = [INPUT, *STATE_INPUTS]
    if inputs not in (expected, [*expected, LENGTHS_INPUT]) or outputs != [OUTPUT, *STATE_OUTPUTS]:
        raise UsageError(
            f"{source} has inputs {inputs} and outputs {outputs}, expected {expected} "
            f"(and optionally {LENGTHS_INPUT}) and {[OUTPUT, *STATE_OUTPUTS]}"
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


def _transposed_edges(model_proto: onnx.ModelProto, names: tuple[str, ...]) -> onnx.ModelProto:
    """`model_proto` with the graph inputs and outputs `names` swapped in their first two
    axes: each is renamed `time_major/<name>` inside, and a Transpose (perm 1, 0, 2) joins
    it to a new input or output of the original name and the swapped dims. Other inputs
    and outputs (lengths) keep their place. Metadata gains `lstm_export.layout = batch_first`.
    """
    model = onnx.ModelProto()
    model.CopyFrom(model_proto)
    graph = model.graph
    mapping = {name: _TIME_MAJOR_PREFIX + name for name in names}
    taken = _all_names(graph) & set(mapping.values())
    if taken:
        raise UsageError(f"the ONNX model already uses the name(s) {sorted(taken)}")
    _rename_in_graph(graph, mapping)

    def transpose(source: str, target: str) -> onnx.NodeProto:
        return helper.make_node(
            "Transpose", [source], [target], name=f"{target}_transpose", perm=[1, 0, 2]
        )

    def swapped(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
        if value.name not in mapping:
            return value
        first, second, *rest = dims(value)
        elem_type = value.type.tensor_type.elem_type
        return helper.make_tensor_value_info(value.name, elem_type, [second, first, *rest])

    inputs = [v.name for v in graph.input if v.name in mapping]
    outputs = [v.name for v in graph.output if v.name in mapping]
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(transpose(n, mapping[n]) for n in inputs)
    graph.node.extend(body)
    graph.node.extend(transpose(mapping[n], n) for n in outputs)
    for values in (graph.input, graph.output):
        replaced = [swapped(v) for v in values]
        del values[:]
        values.extend(replaced)
    if not graph.name.endswith("_batch_first"):
        graph.name = f"{graph.name}_batch_first"
    helper.set_model_props(model, {**metadata(model_proto), LAYOUT_KEY: BATCH_FIRST})
    return model


def batch_first_io(model_proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model.onnx of a batch_first model from its time-major graph: x and y swapped
    to [batch, seq, ...], states left layer-major (as nn.LSTM's)."""
    return _transposed_edges(model_proto, (INPUT, OUTPUT))


def batch_first_onnx(model_proto: onnx.ModelProto) -> onnx.ModelProto:
    """The batch-first variant of an export's model.onnx, for Triton: x, y and the states
    all batch-major.

    Whatever is still time-major or layer-major gets a Transpose at its edge (x and y only
    in a time-major graph; the states in both); a graph that is already Triton's variant
    is returned as it is. Opset, IR version and metadata are kept; metadata gains
    `lstm_export.layout = batch_first`.
    """
    meta = metadata(model_proto)
    config = config_from_metadata(meta, "the ONNX model")
    if meta.get(LAYOUT_KEY) == BATCH_FIRST and states_batch_major(model_proto):
        return model_proto
    check_export_graph(model_proto, "the ONNX model")
    states = (*STATE_INPUTS, *STATE_OUTPUTS)
    edges = states if config.batch_first else (INPUT, OUTPUT, *states)
    return _transposed_edges(model_proto, edges)
