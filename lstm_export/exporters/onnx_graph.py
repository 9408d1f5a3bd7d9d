"""Build the ONNX graph of an `LSTM` directly from its weights.

We write the graph with `onnx.helper` rather than tracing the eager code: the
tracing exporters either freeze the sequence length (dynamo unrolls the time
loop) or produce Loop graphs that break at other batch sizes. Written by hand,
`seq` and `batch` are symbolic everywhere, and each layer takes the fastest
route onnxruntime has:

- layer_norm=False: ONNX's own `LSTM` operator (onnxruntime's fused kernel), with
  the gates reordered from our i, f, g, o to ONNX's i, o, f, c, `direction`
  "bidirectional" for D = 2 and `sequence_lens` for padded batches (the kernel zeros
  Y past each length and returns the state at each sequence's last valid step).
- layer_norm=True: the input projection of the whole sequence as one MatMul,
  then a `Scan` over time whose body is the cell: one MatMul for the hidden
  projection and one `LayerNormalization` over a [batch, 4, hidden] view. Padding
  runs through the Scan unmasked (no step before a sequence's end depends on it); after
  it, y is zeroed past each length and (h, c) gathered at each sequence's last valid
  step: once per sequence, where masking in the body cost every step three more nodes
  (+8-10% for a graph given no lengths, against +3%). The reverse direction reverses
  each sequence within its own length (`ReverseSequence`) before the Scan and its
  outputs back after it.

Layers run one after another over the whole sequence, which computes the same
numbers as interleaving them per step.

`lengths` (int64 [batch]) is an input with an initializer of shape [0] as its default,
so callers may leave it out (`lstm_export.exporters.onnx_parts.Lengths` says how).

`build_graph` is this frame around any layer builder (`per_direction` makes one from a
builder of one direction): `onnx_fused` builds `model.fused.onnx` on it, with the same
inputs, padding machinery, reversal and batch-first Transposes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from lstm_export.artifacts import (
    CONFIG_KEY,
    LENGTHS_INPUT,
    ONNX_INPUTS,
    ONNX_OUTPUTS,
    OPSET,
    ROUTE_KEY,
)
from lstm_export.config import LSTMConfig
from lstm_export.exporters.batch_first import batch_first_io
from lstm_export.exporters.onnx_parts import Graph, Lengths, int64
from lstm_export.files import write_file
from lstm_export.model import LSTM

FLOAT = TensorProto.FLOAT
X, H0, C0 = ONNX_INPUTS
Y, HN, CN = ONNX_OUTPUTS

# Rows of our [4H, ...] weights for ONNX's gate order i, o, f, c (ours: i, f, g, o).
_ONNX_GATE_ORDER = (0, 3, 1, 2)


def route_of(config: LSTMConfig) -> str:
    """Name the graph shape a config gets; recorded in the manifest."""
    if config.layer_norm:
        return "per layer: hoisted input MatMul + Scan over time with LayerNormalization"
    return "per layer: ONNX LSTM operator (onnxruntime fused kernel)"


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).cpu().numpy()


def _reorder_gates(weight: np.ndarray, hidden: int) -> np.ndarray:
    chunks = [weight[g * hidden : (g + 1) * hidden] for g in _ONNX_GATE_ORDER]
    return np.concatenate(chunks, axis=0)


def _plain_layer(
    g: Graph,
    k: int,
    cells: list[torch.nn.Module],
    x: str,
    h0: str,
    c0: str,
    hidden: int,
    lengths: Lengths | None,
) -> tuple[str, str, str]:
    """One layer as the ONNX LSTM operator: ONNX's c_t and h_t are exactly ours without LN.

    W, R and B stack the directions ([D, ...], forward first); h0 and c0 are the layer's
    [D, batch, H] slice, which is also what Y_h and Y_c are.
    """
    stack = lambda name, rows: g.const(f"{name}_{k}", np.stack(rows))  # noqa: E731
    w = stack("W", [_reorder_gates(_numpy(c.input_lin.weight), hidden) for c in cells])
    r = stack("R", [_reorder_gates(_numpy(c.hidden_lin.weight), hidden) for c in cells])
    biases = [_reorder_gates(_numpy(c.hidden_lin.bias), hidden) for c in cells]
    b = stack("B", [np.concatenate([np.zeros_like(bias), bias]) for bias in biases])
    direction = "bidirectional" if len(cells) == 2 else "forward"
    seq_lens = "" if lengths is None else lengths.sequence_lens
    y, h, c = g.op(
        "LSTM", [x, w, r, b, seq_lens, h0, c0], n_out=3, hidden_size=hidden, direction=direction
    )
    # Y is [seq, D, batch, H]: y is [seq, batch, D * H], forward first.
    if len(cells) == 1:
        return g.op1("Squeeze", [y, g.const(f"axis1_{k}", int64(1))]), h, c
    y = g.op1("Transpose", [y], perm=[0, 2, 1, 3])
    return g.op1("Reshape", [y, g.const(f"merge_directions_{k}", int64(0, 0, -1))]), h, c


def project(g: Graph, name: str, cell: torch.nn.Module, x: str) -> str:
    """The hoisted input projection of one direction of a LayerNorm layer: input_lin(x_t) +
    bias for every t at once, one MatMul and one Add over x [seq, batch, in] -> [seq, batch,
    4H] (the cell's bias is hidden_lin's; input_lin has none)."""
    w_x = g.const(f"WxT_{name}", _numpy(cell.input_lin.weight).T)
    bias = g.const(f"b_{name}", _numpy(cell.hidden_lin.bias))
    return g.op1("Add", [g.op1("MatMul", [x, w_x]), bias])


def _scan(
    g: Graph,
    name: str,
    cell: torch.nn.Module,
    x: str,
    h0: str,
    c0: str,
    hidden: int,
    lengths: Lengths | None,
    reverse: bool = False,
) -> tuple[str, str, str]:
    """One direction of a LayerNorm layer: a hoisted input projection and a Scan over time
    whose body is the cell. x is [seq, batch, in], h0 and c0 [1, batch, H].

    The body is kept lean, because onnxruntime pays per node and per step: one Gemm
    for the hidden projection, one LayerNormalization over a [batch, 4, hidden]
    view for the four gates, and c carried as [batch, 1, hidden] so the gate
    slices need no Squeeze. Weights live inside the body as its own initializers,
    where onnxruntime can pre-pack them. The body has no masking: with `lengths`, y is
    zeroed and (h, c) picked at each sequence's last valid step after the Scan, once per
    sequence instead of per step. `reverse` scans from the last step (only for graphs
    without lengths; with lengths the caller reverses each sequence within its length).
    """
    norms = cell.layer_norm
    eps = float(cell.layer_norm_c.eps)
    x_proj = project(g, name, cell, x)

    b = Graph(prefix=f"{name}_")
    h_prev, c_prev, x_proj_t = (b.prefix + n for n in ("h_prev", "c_prev", "x_proj_t"))
    w_h = b.const("WhT", _numpy(cell.hidden_lin.weight).T)
    gamma = b.const("gates_gamma", np.stack([_numpy(n.weight) for n in norms]))  # [4, H]
    beta = b.const("gates_beta", np.stack([_numpy(n.bias) for n in norms]))
    ones = b.const("ones", np.ones(hidden, dtype=np.float32))
    zeros = b.const("zeros", np.zeros(hidden, dtype=np.float32))
    gamma_c = b.const("c_gamma", _numpy(cell.layer_norm_c.weight))
    beta_c = b.const("c_beta", _numpy(cell.layer_norm_c.bias))
    gates_shape = b.const("gates_shape", int64(-1, 4, hidden))
    h_shape = b.const("h_shape", int64(-1, hidden))
    split = b.const("split", int64(1, 1, 1, 1))

    # z = input_lin(x_t) + hidden_lin(h_{t-1}); i, f, g, o = LN(z) per gate.
    z = b.op1("Gemm", [h_prev, w_h, x_proj_t])
    z = b.op1("Reshape", [z, gates_shape])
    normed = b.op1("LayerNormalization", [z, ones, zeros], axis=-1, epsilon=eps)
    gates = b.op1("Add", [b.op1("Mul", [normed, gamma]), beta])
    i, f, g_, o = b.op("Split", [gates, split], n_out=4, axis=1)  # each [batch, 1, H]
    # c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    forget = b.op1("Mul", [b.op1("Sigmoid", [f]), c_prev])
    c_t = b.op1("Add", [forget, b.op1("Mul", [b.op1("Sigmoid", [i]), b.op1("Tanh", [g_])])])
    # h_t = sigmoid(o) * tanh(LN_c(c_t))
    c_norm = b.op1("LayerNormalization", [c_t, gamma_c, beta_c], axis=-1, epsilon=eps)
    h_t = b.op1("Mul", [b.op1("Sigmoid", [o]), b.op1("Tanh", [c_norm])])
    h_t = b.op1("Reshape", [h_t, h_shape])
    # y_t is h_t; with lengths every c_t is a scan output too, to pick each sequence's last.
    outputs = {"h_t": (h_t, hidden), "c_t": (c_t, 1, hidden), "y_t": (h_t, hidden)}
    if lengths is not None:
        outputs["c_seq_t"] = (c_t, 1, hidden)

    def value(name: str, *dims: int) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, FLOAT, ["batch", *dims])

    for out, (source, *_) in outputs.items():
        b.rename(source, b.prefix + out)
    body = helper.make_graph(
        b.nodes,
        f"cell_{name}",
        [value(h_prev, hidden), value(c_prev, 1, hidden), value(x_proj_t, 4 * hidden)],
        [value(b.prefix + out, *shape) for out, (_, *shape) in outputs.items()],
        initializer=b.initializers,
    )
    # The Scan carries h as [batch, H] and c as [batch, 1, H]; the graph's are [1, batch, H].
    axis0 = g.const(f"axis0_{name}", int64(0))
    h_first = g.op1("Squeeze", [h0, axis0])
    c_first = g.op1("Transpose", [c0], perm=[1, 0, 2])
    directions = {}
    if reverse:
        directions = {"scan_input_directions": [1], "scan_output_directions": [1]}
    h_last, c_last, y, *c_steps = g.op(
        "Scan",
        [h_first, c_first, x_proj],
        n_out=len(outputs),
        body=body,
        num_scan_inputs=1,
        **directions,
    )
    if lengths is None:
        h_last = g.op1("Unsqueeze", [h_last, axis0])
        return y, h_last, g.op1("Transpose", [c_last], perm=[1, 0, 2])
    # Padding runs through the Scan (nothing before a sequence's end depends on it); then
    # (h, c) is each sequence's state at step lengths - 1 and y is 0 past its end.
    h_index, c_index = lengths.last_step(hidden)
    h_n = g.op1("GatherElements", [y, h_index], axis=0)  # [1, batch, H]
    c_n = g.op1("GatherElements", [c_steps[0], c_index], axis=0)  # [1, batch, 1, H]
    c_n = g.op1("Squeeze", [c_n, g.const(f"axis2_{name}", int64(2))])
    y = g.op1("Where", [lengths.valid, y, g.const(f"padding_{name}", np.zeros(1, np.float32))])
    return y, h_n, c_n


Direction = Callable[..., tuple[str, str, str]]
"""One direction of a layer: (g, name, cell, x, h0, c0, hidden, lengths, reverse=False) ->
(y [seq, batch, H], h_n, c_n [1, batch, H]); x is [seq, batch, in], h0 and c0 [1, batch, H].
`reverse` (scan from the last step) is asked only of a graph without lengths."""
Layer = Callable[
    [Graph, int, list[torch.nn.Module], str, str, str, int, "Lengths | None"], tuple[str, str, str]
]
"""One layer: (g, k, cells (forward, and reverse for D = 2), x, h0, c0 [D, batch, H], hidden,
lengths) -> (y [seq, batch, D * H], h_n, c_n [D, batch, H])."""


def per_direction(direction: Direction) -> Layer:
    """A layer of one `direction` per cell: for D = 2 the reverse one's input is each
    sequence reversed within its own length, and its outputs are put back in time order the
    same way (pack_padded_sequence's reverse direction); y is [forward | reverse]."""

    def layer(
        g: Graph,
        k: int,
        cells: list[torch.nn.Module],
        x: str,
        h0: str,
        c0: str,
        hidden: int,
        lengths: Lengths | None,
    ) -> tuple[str, str, str]:
        if len(cells) == 1:
            return direction(g, f"layer{k}", cells[0], x, h0, c0, hidden, lengths)
        ones = g.const(f"directions_split_{k}", int64(1, 1))
        (h_f, h_r), (c_f, c_r) = (g.op("Split", [s, ones], n_out=2, axis=0) for s in (h0, c0))
        y_f, h_f, c_f = direction(g, f"layer{k}", cells[0], x, h_f, c_f, hidden, lengths)
        name, reverse = f"layer{k}_reverse", cells[1]
        if lengths is None:
            y_r, h_r, c_r = direction(g, name, reverse, x, h_r, c_r, hidden, None, True)
        else:
            within = {"batch_axis": 1, "time_axis": 0}
            backward = g.op1("ReverseSequence", [x, lengths.lengths], **within)
            y_r, h_r, c_r = direction(g, name, reverse, backward, h_r, c_r, hidden, lengths)
            y_r = g.op1("ReverseSequence", [y_r, lengths.lengths], **within)
        y = g.op1("Concat", [y_f, y_r], axis=2)
        return y, g.op1("Concat", [h_f, h_r], axis=0), g.op1("Concat", [c_f, c_r], axis=0)

    return layer


_layer_norm_layer = per_direction(_scan)
"""One LayerNorm layer: the forward Scan, and for D = 2 the reverse one."""


def build_onnx(model: LSTM, opset: int = OPSET, *, lengths: bool = True) -> onnx.ModelProto:
    """The ONNX model of `model`: x, h0/c0 [num_layers * D, batch, hidden] and the optional
    `lengths` (int64 [batch]) -> y, hn, cn. x and y are in the model's layout ([seq, batch,
    ...], or [batch, seq, ...] when batch_first); states are layer-major either way.

    `lengths=False` builds the graph without the lengths input (as exports before it were),
    to measure what the padding machinery costs.
    """
    config = model.config()
    layer = _layer_norm_layer if config.layer_norm else _plain_layer
    return build_graph(model, layer, opset, route_of(config), lengths=lengths)


def build_graph(
    model: LSTM,
    layer: Layer,
    opset: int,
    route: str,
    *,
    lengths: bool = True,
    domains: dict[str, int] | None = None,
    metadata: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """model.onnx's frame around `layer`, called once per layer: the inputs (x, h0, c0 and
    the optional `lengths` with its empty default), each layer's slice of the states, the
    outputs, the config and `route` in the metadata (with `metadata`), the batch-first
    Transposes for a batch_first model. `domains` adds operator sets beyond ONNX's own
    (custom ops), {domain: version}."""
    if opset < OPSET:
        raise ValueError(f"opset must be >= {OPSET} (LayerNormalization), got {opset}")
    config = model.config()
    hidden, layers, directions = config.hidden_size, config.num_layers, config.num_directions
    g = Graph()
    padding = Lengths(g, X) if lengths else None
    # Each layer's initial state: its [D, batch, hidden] slice (index layer * D + direction).
    if layers > 1:
        sizes = g.const("state_split", np.full(layers, directions, dtype=np.int64))
        h_parts = g.op("Split", [H0, sizes], n_out=layers, axis=0)
        c_parts = g.op("Split", [C0, sizes], n_out=layers, axis=0)
    else:
        h_parts, c_parts = [H0], [C0]
    x = X
    h_out, c_out = [], []
    for k, cell in enumerate(model.cells):
        cells = [cell, *([model.reverse_cells[k]] if config.bidirectional else [])]
        x, h, c = layer(g, k, cells, x, h_parts[k], c_parts[k], hidden, padding)
        h_out.append(h)
        c_out.append(c)
    g.rename(x, Y)
    g.rename(g.op1("Concat", h_out, axis=0), HN)
    g.rename(g.op1("Concat", c_out, axis=0), CN)

    states = [config.state_layers, "batch", hidden]
    inputs = [
        helper.make_tensor_value_info(X, FLOAT, ["seq", "batch", config.input_size]),
        helper.make_tensor_value_info(H0, FLOAT, states),
        helper.make_tensor_value_info(C0, FLOAT, states),
    ]
    initializers = g.initializers
    if lengths:
        inputs.append(helper.make_tensor_value_info(LENGTHS_INPUT, TensorProto.INT64, ["batch"]))
        # The default a caller may override: empty, every sequence full.
        initializers = [numpy_helper.from_array(int64(), LENGTHS_INPUT), *initializers]
    graph = helper.make_graph(
        g.nodes,
        "lstm",
        inputs,
        [
            helper.make_tensor_value_info(Y, FLOAT, ["seq", "batch", config.output_size]),
            helper.make_tensor_value_info(HN, FLOAT, states),
            helper.make_tensor_value_info(CN, FLOAT, states),
        ],
        initializer=initializers,
    )
    opsets = [helper.make_opsetid("", opset)]
    opsets += [helper.make_opsetid(domain, v) for domain, v in (domains or {}).items()]
    onnx_model = helper.make_model(
        graph,
        opset_imports=opsets,
        producer_name="lstm-export",
        doc_string="Scratch LSTM exported by lstm-export",
    )
    # IR version 8 is what opset 17-era runtimes (and Triton's onnxruntime backend) accept.
    onnx_model.ir_version = 8
    props = {CONFIG_KEY: config.to_json(), ROUTE_KEY: route, **(metadata or {})}
    helper.set_model_props(onnx_model, props)
    if config.batch_first:
        return batch_first_io(onnx_model)
    return onnx_model


def save_onnx(model: LSTM, path: Path, opset: int = OPSET) -> onnx.ModelProto:
    """Build, check (full_check) and save the ONNX graph of `model`."""
    onnx_model = build_onnx(model, opset)
    onnx.checker.check_model(onnx_model, full_check=True)
    write_file(path, onnx_model.SerializeToString())  # onnx.save, with the file named
    return onnx_model


def onnx_signature(onnx_model: onnx.ModelProto) -> dict:
    """Inputs and outputs with symbolic dims by name, read off the graph itself."""

    def describe(values) -> dict:
        described = {}
        for value in values:
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            described[value.name] = {"shape": dims, "dtype": str(dtype)}
        return described

    return {
        "inputs": describe(onnx_model.graph.input),
        "outputs": describe(onnx_model.graph.output),
    }
