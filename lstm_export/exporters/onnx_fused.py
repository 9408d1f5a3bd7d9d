"""Build `model.fused.onnx`: model.onnx's graph with each LayerNorm direction one fused-kernel
node (`lstm_export.LayerNormLSTMLayer`, the onnxruntime custom op of `native.ort_kernel`).

Per layer and direction:

    x_proj = MatMul(x, W_x^T) + b             standard ONNX, the whole sequence at once
    y, h_n, c_n = LayerNormLSTMLayer(x_proj, h0, c0, W_h, gammas, betas, gamma_c, beta_c,
                                     valid, eps)

`valid` ([seq, batch] bool, `Lengths.mask`) is false past each sequence's length: the op
carries (h, c) there and outputs 0, so y, h_n and c_n come out as the eager model gives them
for a padded batch, with no gathering after. Everything around the nodes is model.onnx's own
(`onnx_graph.build_graph`): the inputs (x, h0, c0 and the optional `lengths`, empty by
default: every sequence full), each layer's slice of the states, the reverse direction of a
bidirectional layer fed each sequence reversed within its own length and its outputs put
back (`onnx_graph.per_direction`), and the Transposes of a batch_first model. The metadata is
model.onnx's (config, route, layout) plus `lstm_export.op_library`, the file name of the
library the graph needs; the opset imports add the `lstm_export` domain.

Only for LayerNorm models, as model.fused.pt: a plain model.onnx already runs onnxruntime's
own LSTM kernel. Nothing here builds or loads the library: the graph names an op, and
onnxruntime resolves it where the library was registered (`OnnxLSTM(..., fused=True)`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from lstm_export.artifacts import OP_LIBRARY_KEY, OPSET, ORT_KERNEL_LIBRARY
from lstm_export.errors import UsageError
from lstm_export.exporters.onnx_graph import build_graph, per_direction, project
from lstm_export.exporters.onnx_parts import Graph, Lengths, int64
from lstm_export.files import write_file
from lstm_export.model import LSTM
from lstm_export.native.ort_kernel import DOMAIN, DOMAIN_VERSION, OP_TYPE

ROUTE = (
    f"per layer: hoisted input MatMul + one {DOMAIN}.{OP_TYPE} (the fused kernel; "
    f"needs {ORT_KERNEL_LIBRARY})"
)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).cpu().numpy()


def _fused_direction(
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
    """One direction of a LayerNorm layer as the hoisted projection and one op node; x is
    [seq, batch, in], h0 and c0 [1, batch, H] (the op's are [batch, H])."""
    if lengths is None or reverse:  # build_fused_onnx always has lengths: per_direction
        raise ValueError("the fused graph is built with lengths")  # reverses via them
    x_proj = project(g, name, cell, x)
    norms = cell.layer_norm  # the four gates' LayerNorms, i, f, g, o
    weights = [
        g.const(f"Wh_{name}", _numpy(cell.hidden_lin.weight)),  # [4H, H]
        g.const(f"gates_gamma_{name}", np.concatenate([_numpy(n.weight) for n in norms])),
        g.const(f"gates_beta_{name}", np.concatenate([_numpy(n.bias) for n in norms])),
        g.const(f"c_gamma_{name}", _numpy(cell.layer_norm_c.weight)),
        g.const(f"c_beta_{name}", _numpy(cell.layer_norm_c.bias)),
    ]
    axis0 = g.const(f"axis0_{name}", int64(0))
    h_first, c_first = (g.op1("Squeeze", [state, axis0]) for state in (h0, c0))
    y, h_n, c_n = g.op(
        OP_TYPE,
        [x_proj, h_first, c_first, *weights, lengths.mask],
        n_out=3,
        domain=DOMAIN,
        eps=float(cell.layer_norm_c.eps),
    )
    return y, g.op1("Unsqueeze", [h_n, axis0]), g.op1("Unsqueeze", [c_n, axis0])


def build_fused_onnx(model: LSTM, opset: int = OPSET) -> onnx.ModelProto:
    """`model.fused.onnx` of a LayerNorm `model`: model.onnx's inputs, outputs, layout and
    metadata (plus the op library's name), each direction of each layer one fused node."""
    config = model.config()
    if not config.layer_norm:
        raise UsageError(
            "model.fused.onnx is for layer_norm=True models; a plain model.onnx already runs "
            "onnxruntime's own LSTM kernel"
        )
    return build_graph(
        model,
        per_direction(_fused_direction),
        opset,
        ROUTE,
        domains={DOMAIN: DOMAIN_VERSION},
        metadata={OP_LIBRARY_KEY: ORT_KERNEL_LIBRARY},
    )


def save_fused_onnx(model: LSTM, path: Path, opset: int = OPSET) -> onnx.ModelProto:
    """Build, check (full_check) and save `model.fused.onnx`."""
    onnx_model = build_fused_onnx(model, opset)
    onnx.checker.check_model(onnx_model, full_check=True)
    write_file(path, onnx_model.SerializeToString())
    return onnx_model
