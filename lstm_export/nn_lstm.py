"""torch.nn.LSTM's state-dict layout: its keys (`weight_ih_l{k}`, ..., `_reverse` for the
reverse direction), their shapes, and the translation to and from this model's layout.

Its own module so that what nn.LSTM calls its weights is said once, apart from the checks
`lstm_export.checkpoints` runs on every checkpoint, whichever layout it is in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from lstm_export.checkpoint_file import listing, shown_key
from lstm_export.config import LSTMConfig
from lstm_export.errors import UsageError
from lstm_export.model import LSTM

NN_LSTM_KEY = re.compile(r"^(weight|bias)_(ih|hh|hr)_l(\d+)(_reverse)?\Z")  # \Z: no "\n"
REVERSE_SUFFIX = "_reverse"  # nn.LSTM's reverse-direction keys: weight_ih_l0_reverse, ...
REVERSE_PREFIX = "reverse_"  # ours: reverse_cells.0.input_lin.weight beside cells.0....


def is_nn_lstm_state_dict(state: Mapping[str, Tensor]) -> bool:
    return any(NN_LSTM_KEY.match(k) for k in state)


def check_nn_lstm_keys(state: Mapping[str, Tensor], source: str) -> None:
    """Refuse nn.LSTM variants we do not run, and keys that are not nn.LSTM's."""
    bad = sorted(k for k in state if (m := NN_LSTM_KEY.match(k)) and m.group(2) == "hr")
    if bad:
        raise UsageError(
            f"{source}: only nn.LSTM with proj_size=0 is supported; "
            f"found {listing(map(shown_key, bad), 4)}"
        )
    unexpected = sorted(k for k in state if not NN_LSTM_KEY.match(k))
    if unexpected:
        raise UsageError(
            f"{source}: unexpected keys for an nn.LSTM state dict: "
            f"{listing(map(shown_key, unexpected))}"
        )


def _suffixes(config: LSTMConfig) -> tuple[str, ...]:
    return ("", REVERSE_SUFFIX) if config.bidirectional else ("",)


def nn_lstm_shapes(config: LSTMConfig) -> dict[str, tuple[int, ...]]:
    """nn.LSTM(config)'s keys and shapes (its biases may be absent: bias=False); layer k > 0
    reads the layer below's D * hidden_size outputs."""
    gates, hidden = 4 * config.hidden_size, config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {}
    for k in range(config.num_layers):
        for s in _suffixes(config):
            shapes[f"weight_ih_l{k}{s}"] = (
                gates,
                config.input_size if k == 0 else config.output_size,
            )
            shapes[f"weight_hh_l{k}{s}"] = (gates, hidden)
            shapes[f"bias_ih_l{k}{s}"] = (gates,)
            shapes[f"bias_hh_l{k}{s}"] = (gates,)
    return shapes


def nn_lstm_described(config: LSTMConfig) -> str:
    """`nn.LSTM(input_size=4, hidden_size=8, num_layers=1)`, bidirectional named when on."""
    switch = ", bidirectional=True" if config.bidirectional else ""
    return (
        f"nn.LSTM(input_size={config.input_size}, hidden_size={config.hidden_size}, "
        f"num_layers={config.num_layers}{switch})"
    )


def translate_nn_lstm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """nn.LSTM's `{name}_l{k}{suffix}` as our `{direction}cells.{k}.{name}`: the forward keys
    to `cells.{k}`, the `_reverse` ones to `reverse_cells.{k}`."""
    ours: dict[str, Tensor] = {}
    found = {m.group(3, 4) for k in state if (m := NN_LSTM_KEY.match(k))}
    for digits, reverse in sorted(found, key=lambda f: (int(f[0]), bool(f[1]))):
        k, s = int(digits), reverse or ""
        prefix = f"{REVERSE_PREFIX if reverse else ''}cells.{k}."
        for theirs, mine in (("weight_ih", "input_lin.weight"), ("weight_hh", "hidden_lin.weight")):
            if f"{theirs}_l{k}{s}" in state:
                ours[prefix + mine] = state[f"{theirs}_l{k}{s}"]
        biases = [state[b] for b in (f"bias_ih_l{k}{s}", f"bias_hh_l{k}{s}") if b in state]
        if biases:
            # Summed in float32 or wider, as the model will run: a float16 sum rounds once more.
            dtype = torch.promote_types(biases[0].dtype, torch.float32)
            ours[prefix + "hidden_lin.bias"] = sum(
                (b.to(dtype) for b in biases[1:]), biases[0].to(dtype, copy=True)
            )
        elif f"weight_hh_l{k}{s}" in state:  # nn.LSTM(bias=False): our bias is zero
            weight = state[f"weight_hh_l{k}{s}"]
            ours[prefix + "hidden_lin.bias"] = torch.zeros(weight.size(0), dtype=weight.dtype)
    return ours


def to_nn_lstm_state_dict(model: LSTM) -> dict[str, Tensor]:
    """Our weights as an `nn.LSTM` state dict, `_reverse` keys for the reverse cells
    (layer_norm=False only: nn.LSTM has no LayerNorm)."""
    if model.layer_norm:
        raise UsageError("only a layer_norm=False model can be written as an nn.LSTM state dict")
    state: dict[str, Tensor] = {}
    directions = [("", model.cells)]
    if model.bidirectional:
        directions.append((REVERSE_SUFFIX, model.reverse_cells))
    for s, cells in directions:
        for k, cell in enumerate(cells):
            bias = cell.hidden_lin.bias.detach().clone()
            state[f"weight_ih_l{k}{s}"] = cell.input_lin.weight.detach().clone()
            state[f"weight_hh_l{k}{s}"] = cell.hidden_lin.weight.detach().clone()
            state[f"bias_ih_l{k}{s}"] = torch.zeros_like(bias)
            state[f"bias_hh_l{k}{s}"] = bias
    return state
