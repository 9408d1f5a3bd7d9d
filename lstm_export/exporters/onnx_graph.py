"""Build the ONNX graph of an `LSTM` directly from its weights.

We write the graph with `onnx.helper` rather than tracing the eager code: the
tracing exporters either freeze the sequence length (dynamo unrolls the time
loop) or produce Loop graphs that break at other batch sizes. Written by hand,
`seq` and `batch` are symbolic everywhere, and each layer takes the fastest
route onnxruntime has:

- layer_norm=False: ONNX's own `LSTM` operator (onnxruntime's fused kernel), with
  the gates reordered from our i, f, g, o to ONNX's i, o, f, c.
- layer_norm=True: the input projection of the whole sequence as one MatMul,
  then a `Scan` over time whose body is the cell: one MatMul for the hidden
  projection and one `LayerNormalization` over a [batch, 4, hidden] view.

Layers run one after another over the whole sequence, which computes the same
numbers as interleaving them per step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from lstm_export.artifacts import CONFIG_KEY, OPSET, ROUTE_KEY
from lstm_export.config import LSTMConfig
from lstm_export.files import write_file
from lstm_export.model import LSTM

FLOAT = TensorProto.FLOAT

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


class _Graph:
    """A small accumulator of nodes and initializers with unique names."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix  # keeps a subgraph's names apart from the outer graph's
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        name = self.prefix + name
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs: object) -> list[str]:
        self._count += 1
        outputs = [f"{self.prefix}{op_type.lower()}_{self._count}_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, **attrs))
        return outputs

    def op1(self, op_type: str, inputs: list[str], **attrs: object) -> str:
        return self.op(op_type, inputs, **attrs)[0]

    def rename(self, source: str, name: str) -> str:
        """Give a computed value a fixed name (a graph output)."""
        self.nodes.append(helper.make_node("Identity", [source], [name]))
        return name


def _plain_layer(
    g: _Graph, k: int, cell: torch.nn.Module, x: str, h0: str, c0: str, hidden: int
) -> tuple[str, str, str]:
    """One layer as the ONNX LSTM operator: ONNX's c_t and h_t are exactly ours without LN."""
    w = g.const(f"W_{k}", _reorder_gates(_numpy(cell.input_lin.weight), hidden)[None])
    r = g.const(f"R_{k}", _reorder_gates(_numpy(cell.hidden_lin.weight), hidden)[None])
    bias = _reorder_gates(_numpy(cell.hidden_lin.bias), hidden)
    b = g.const(f"B_{k}", np.concatenate([np.zeros_like(bias), bias])[None])
    y, h, c = g.op("LSTM", [x, w, r, b, "", h0, c0], n_out=3, hidden_size=hidden)
    axis1 = g.const(f"axis1_{k}", np.array([1], dtype=np.int64))
    # Y is [seq, num_directions=1, batch, hidden]; h and c are [1, batch, hidden].
    return g.op1("Squeeze", [y, axis1]), h, c


def _layer_norm_layer(
    g: _Graph, k: int, cell: torch.nn.Module, x: str, h0: str, c0: str, hidden: int
) -> tuple[str, str, str]:
    """One layer as a hoisted input projection and a Scan over time whose body is the cell.

    The body is kept lean, because onnxruntime pays per node and per step: one Gemm
    for the hidden projection, one LayerNormalization over a [batch, 4, hidden]
    view for the four gates, and c carried as [batch, 1, hidden] so the gate
    slices need no Squeeze. Weights live inside the body as its own initializers,
    where onnxruntime can pre-pack them.
    """
    norms = cell.layer_norm
    eps = float(cell.layer_norm_c.eps)
    w_x = g.const(f"WxT_{k}", _numpy(cell.input_lin.weight).T)
    bias = g.const(f"b_{k}", _numpy(cell.hidden_lin.bias))
    axis0 = g.const(f"axis0_{k}", np.array([0], dtype=np.int64))
    # input_lin(x_t) + bias for every t at once: [seq, batch, 4H].
    x_proj = g.op1("Add", [g.op1("MatMul", [x, w_x]), bias])

    b = _Graph(prefix=f"layer{k}_")
    h_prev, c_prev, x_proj_t = (b.prefix + n for n in ("h_prev", "c_prev", "x_proj_t"))
    w_h = b.const("WhT", _numpy(cell.hidden_lin.weight).T)
    gamma = b.const("gates_gamma", np.stack([_numpy(n.weight) for n in norms]))  # [4, H]
    beta = b.const("gates_beta", np.stack([_numpy(n.bias) for n in norms]))
    ones = b.const("ones", np.ones(hidden, dtype=np.float32))
    zeros = b.const("zeros", np.zeros(hidden, dtype=np.float32))
    gamma_c = b.const("c_gamma", _numpy(cell.layer_norm_c.weight))
    beta_c = b.const("c_beta", _numpy(cell.layer_norm_c.bias))
    gates_shape = b.const("gates_shape", np.array([-1, 4, hidden], dtype=np.int64))
    h_shape = b.const("h_shape", np.array([-1, hidden], dtype=np.int64))
    split = b.const("split", np.array([1, 1, 1, 1], dtype=np.int64))

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
    y_t = b.rename(h_t, b.prefix + "y_t")

    def value(name: str, *dims: int) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, FLOAT, ["batch", *dims])

    body = helper.make_graph(
        b.nodes,
        f"cell_{k}",
        [value(h_prev, hidden), value(c_prev, 1, hidden), value(x_proj_t, 4 * hidden)],
        [value(h_t, hidden), value(c_t, 1, hidden), value(y_t, hidden)],
        initializer=b.initializers,
    )
    # The Scan carries h as [batch, H] and c as [batch, 1, H]; the graph's are [1, batch, H].
    h_first = g.op1("Squeeze", [h0, axis0])
    c_first = g.op1("Transpose", [c0], perm=[1, 0, 2])
    h_last, c_last, y = g.op(
        "Scan", [h_first, c_first, x_proj], n_out=3, body=body, num_scan_inputs=1
    )
    return y, g.op1("Unsqueeze", [h_last, axis0]), g.op1("Transpose", [c_last], perm=[1, 0, 2])


def build_onnx(model: LSTM, opset: int = OPSET) -> onnx.ModelProto:
    """The ONNX model of `model`: x [seq, batch, in], h0/c0 [layers, batch, hidden] -> y, hn, cn."""
    if opset < OPSET:
        raise ValueError(f"opset must be >= {OPSET} (LayerNormalization), got {opset}")
    config = LSTMConfig(
        model.input_size, model.hidden_size, model.num_layers, bool(model.layer_norm)
    )
    hidden, layers = config.hidden_size, config.num_layers
    g = _Graph()
    # Split the stacked initial state into one [1, batch, hidden] slice per layer.
    if layers > 1:
        ones = g.const("state_split", np.ones(layers, dtype=np.int64))
        h_parts = g.op("Split", ["h0", ones], n_out=layers, axis=0)
        c_parts = g.op("Split", ["c0", ones], n_out=layers, axis=0)
    else:
        h_parts, c_parts = ["h0"], ["c0"]
    layer = _layer_norm_layer if config.layer_norm else _plain_layer
    x = "x"
    h_out, c_out = [], []
    for k, cell in enumerate(model.cells):
        x, h, c = layer(g, k, cell, x, h_parts[k], c_parts[k], hidden)
        h_out.append(h)
        c_out.append(c)
    g.rename(x, "y")
    g.rename(g.op1("Concat", h_out, axis=0), "hn")
    g.rename(g.op1("Concat", c_out, axis=0), "cn")

    graph = helper.make_graph(
        g.nodes,
        "lstm",
        [
            helper.make_tensor_value_info("x", FLOAT, ["seq", "batch", config.input_size]),
            helper.make_tensor_value_info("h0", FLOAT, [layers, "batch", hidden]),
            helper.make_tensor_value_info("c0", FLOAT, [layers, "batch", hidden]),
        ],
        [
            helper.make_tensor_value_info("y", FLOAT, ["seq", "batch", hidden]),
            helper.make_tensor_value_info("hn", FLOAT, [layers, "batch", hidden]),
            helper.make_tensor_value_info("cn", FLOAT, [layers, "batch", hidden]),
        ],
        initializer=g.initializers,
    )
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="lstm-export",
        doc_string="Scratch LSTM exported by lstm-export",
    )
    # IR version 8 is what opset 17-era runtimes (and Triton's onnxruntime backend) accept.
    onnx_model.ir_version = 8
    helper.set_model_props(onnx_model, {CONFIG_KEY: config.to_json(), ROUTE_KEY: route_of(config)})
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
