"""Models parity must pass, and breakages it must catch: shared by the tests and the
calibration script (scripts/calibrate_parity.py).

Sound models have weights like trained ones, harsher than PyTorch's initialization: hidden
weights up to 2/sqrt(fan_in), LayerNorm scales normal(1, 0.2) or normal(1, 0.5), and
models after a few optimizer steps. Breakages change an export folder subtly and re-hash
the manifest, so that only parity can notice.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from lstm_export.artifacts import TORCHSCRIPT_CONFIG_FILE
from lstm_export.checkpoints import build_model
from lstm_export.config import LSTMConfig
from lstm_export.exporters.torchscript import quiet_torchscript
from lstm_export.files import sha256
from lstm_export.model import LSTM


def trained_like(
    config: LSTMConfig, seed: int, *, norm_std: float = 0.2, hidden_gain: float = 2.0
) -> LSTM:
    """Input weights as PyTorch draws them; hidden weights uniform(+-gain/sqrt(hidden));
    LayerNorm scales normal(1, norm_std) and shifts normal(0, 0.2)."""
    model = build_model(config, seed)
    generator = torch.Generator().manual_seed(seed)
    bound = hidden_gain / math.sqrt(config.hidden_size)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".layer_norm" in name and name.endswith("weight"):
                param.normal_(1.0, norm_std, generator=generator)
            elif ".layer_norm" in name:
                param.normal_(0.0, 0.2, generator=generator)
            elif name.endswith("hidden_lin.weight"):
                param.uniform_(-bound, bound, generator=generator)
    return model


def after_optimizer_steps(model: LSTM, steps: int = 3, seed: int = 0, lr: float = 1e-2) -> LSTM:
    """`model` after `steps` Adam steps on a random regression target (a real checkpoint's
    weights are no longer what any init draws)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 4, model.input_size, generator=generator)
    target = torch.randn(20, 4, model.hidden_size, generator=generator).tanh()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        y, _ = model(x)
        torch.nn.functional.mse_loss(y, target).backward()
        optimizer.step()
    return model.eval()


@dataclass(frozen=True)
class Sound:
    """One model of the corpus: sizes, how its weights are drawn, and a seed."""

    input_size: int
    hidden_size: int
    num_layers: int
    layer_norm: bool
    norm_std: float = 0.2
    steps: int = 0
    seed: int = 0

    @property
    def id(self) -> str:
        kind = f"ln{self.norm_std:g}" if self.layer_norm else "plain"
        trained = f"-adam{self.steps}" if self.steps else ""
        sizes = f"{self.input_size}x{self.hidden_size}x{self.num_layers}"
        return f"{kind}-{sizes}{trained}-seed{self.seed}"

    def build(self) -> LSTM:
        config = LSTMConfig(self.input_size, self.hidden_size, self.num_layers, self.layer_norm)
        model = trained_like(config, self.seed, norm_std=self.norm_std)
        if self.steps:
            model = after_optimizer_steps(model, self.steps, seed=self.seed)
        return model


# Hidden sizes 1 to 256, one to three layers, both LayerNorm spreads, after Adam steps.
SOUND = (
    Sound(5, 1, 1, True, 0.5, seed=1),
    Sound(5, 7, 2, True, 0.2, seed=2),
    Sound(5, 7, 2, True, 0.5, seed=3),
    Sound(12, 16, 3, True, 0.5, seed=4),
    Sound(40, 128, 2, True, 0.2, steps=1, seed=5),
    Sound(40, 128, 2, True, 0.5, steps=3, seed=6),
    Sound(64, 256, 2, True, 0.2, seed=7),
    Sound(64, 256, 1, True, 0.5, seed=8),
    Sound(5, 1, 1, False, seed=9),
    Sound(40, 7, 3, False, seed=10),
    Sound(40, 128, 2, False, steps=3, seed=11),
    Sound(64, 256, 2, False, seed=12),
)


# --------------------------------------------------------------------------- breakages


def rehash(folder: Path, name: str) -> None:
    """Record `name`'s new sha256 and size in the manifest, as if the export had written it."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    entry = manifest["artifacts"][name]
    entry["sha256"], entry["bytes"] = sha256(folder / name), (folder / name).stat().st_size
    path.write_text(json.dumps(manifest, indent=2))


def _edit_onnx(folder: Path, edit) -> None:
    path = folder / "model.onnx"
    proto = onnx.load(str(path))
    edit(proto)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    rehash(folder, "model.onnx")


def set_layer_norm_epsilon(folder: Path, epsilon: float) -> None:
    """Every LayerNormalization of model.onnx gets another epsilon."""

    def edit(proto: onnx.ModelProto) -> None:
        for node in proto.graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    for inner in attr.g.node:
                        for a in inner.attribute:
                            if inner.op_type == "LayerNormalization" and a.name == "epsilon":
                                a.f = epsilon

    _edit_onnx(folder, edit)


def nudge_onnx_weight(folder: Path, delta: float = 1e-3) -> None:
    """One input weight of layer 0's cell gate g (unit 0, feature 0) moves by `delta`."""

    def edit(proto: onnx.ModelProto) -> None:
        tensors = {t.name: t for t in proto.graph.initializer}
        hidden = json.loads(
            next(p.value for p in proto.metadata_props if p.key == "lstm_export.config")
        )["hidden_size"]
        if "W_0" in tensors:  # plain: ONNX's LSTM, gates i, o, f, c along dim 1
            name, index = "W_0", (0, 3 * hidden, 0)
        else:  # LayerNorm: our graph's WxT [input, 4H], gates i, f, g, o
            name, index = "WxT_layer0", (0, 2 * hidden)
        values = numpy_helper.to_array(tensors[name]).copy()
        values[index] += delta
        tensors[name].CopyFrom(numpy_helper.from_array(values, name))

    _edit_onnx(folder, edit)


def drop_state_of_last_layer(folder: Path) -> None:
    """model.onnx's last layer ignores the given h0 and c0 (x - x = zeros in their place),
    so a stream restarts that layer at every chunk."""

    def edit(proto: onnx.ModelProto) -> None:
        graph = proto.graph
        layers = json.loads(
            next(p.value for p in proto.metadata_props if p.key == "lstm_export.config")
        )["num_layers"]
        splits = [n for n in graph.node if n.op_type == "Split" and n.input[0] in ("h0", "c0")]
        last = {n.output[layers - 1] for n in splits}
        renamed = {name: f"{name}_dropped" for name in last}
        for node in graph.node:
            if node.op_type != "Split":
                node.input[:] = [renamed.get(i, i) for i in node.input]
        zeros = [helper.make_node("Sub", [n, n], [renamed[n]], name=f"drop_{n}") for n in last]
        position = max(i for i, n in enumerate(graph.node) if n in splits) + 1
        for offset, node in enumerate(zeros):
            graph.node.insert(position + offset, node)

    _edit_onnx(folder, edit)


def _edit_torchscript(folder: Path, edit) -> None:
    path = folder / "model.pt"
    extra = {TORCHSCRIPT_CONFIG_FILE: ""}
    with quiet_torchscript():
        module = torch.jit.load(str(path), _extra_files=extra)
        with torch.no_grad():
            edit(dict(module.named_parameters()))
        torch.jit.save(module, str(path), _extra_files=extra)
    rehash(folder, "model.pt")


def nudge_torchscript_weight(folder: Path, delta: float = 1e-3) -> None:
    """One input weight of layer 0's cell gate g (unit 0, feature 0) in model.pt."""

    def edit(params: dict[str, torch.Tensor]) -> None:
        weight = params["cells.0.input_lin.weight"]
        hidden = weight.shape[0] // 4
        weight[2 * hidden, 0] += delta

    _edit_torchscript(folder, edit)


def swap_gates_i_and_f(folder: Path) -> None:
    """model.pt computes with gates i and f exchanged: their weight rows, bias and LayerNorm
    swap places in every layer (the classic exporter bug of a wrong gate order)."""

    def edit(params: dict[str, torch.Tensor]) -> None:
        for name, param in params.items():
            if name.endswith(("input_lin.weight", "hidden_lin.weight", "hidden_lin.bias")):
                hidden = param.shape[0] // 4
                i, f = param[:hidden].clone(), param[hidden : 2 * hidden].clone()
                param[:hidden], param[hidden : 2 * hidden] = f, i
            elif ".layer_norm.0." in name:
                other = params[name.replace(".layer_norm.0.", ".layer_norm.1.")]
                swapped = param.clone()
                param.copy_(other)
                other.copy_(swapped)

    _edit_torchscript(folder, edit)


def reshape_state_instead_of_transposing(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A batch-first graph whose h0 edge is a Reshape where a Transpose belongs: the right
    shape, but [batch, layers, hidden] read as [layers, batch, hidden] mixes up the rows."""
    config = json.loads(
        next(p.value for p in proto.metadata_props if p.key == "lstm_export.config")
    )
    shape = np.array([config["num_layers"], -1, config["hidden_size"]], dtype=np.int64)
    graph = proto.graph
    node = next(n for n in graph.node if n.op_type == "Transpose" and n.input[0] == "h0")
    graph.initializer.append(numpy_helper.from_array(shape, "h0_wrong_shape"))
    reshape = helper.make_node("Reshape", ["h0", "h0_wrong_shape"], list(node.output))
    index = list(graph.node).index(node)
    graph.node.remove(node)
    graph.node.insert(index, reshape)
    return proto
