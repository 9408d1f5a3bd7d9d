"""Faster TorchScript routes over the same weights, for the deployed `model.pt`.

The scratch `LSTM` stays the reference in eager mode; what is scripted and
saved is one of these modules, which share its parameters (so the state dict,
the attributes and the `forward(x, state=None)` signature are identical) but
compute the same equations faster:

- layer_norm=False: aten's fused LSTM kernel (`torch.lstm`, what `nn.LSTM` runs),
  our weights passed as its (w_ih, w_hh, b_ih=0, b_hh).
- layer_norm=True: per layer, the input projection of the whole sequence as one
  matmul, then a time loop doing one `addmm` and one `layer_norm` over a
  [batch, 4, hidden] view per step.
- layer_norm=True, opt-in (`model.fused.pt`): the same hoisted projection, then the
  whole time loop of a layer in one custom op of `lstm_export.exporters.kernel`; the saved
  module needs that op's library loaded before it can be loaded.

Parity with the reference is what the verify matrix proves.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lstm_export.config import LSTMConfig
from lstm_export.model import LSTM, State, check_inputs, initial_state


class _Deployed(nn.Module):
    """Shares the reference model's cells and config attributes."""

    route = ""

    def __init__(self, model: LSTM) -> None:
        super().__init__()
        self.input_size = model.input_size
        self.hidden_size = model.hidden_size
        self.num_layers = model.num_layers
        self.layer_norm = model.layer_norm
        self.cells = model.cells

    def _checked_state(self, x: Tensor, state: Optional[State]) -> State:
        """The reference model's input checks, then the given or zero (h0, c0)."""
        dtype = self.cells[0].input_lin.weight.dtype
        check_inputs(x, state, self.input_size, self.hidden_size, self.num_layers, dtype)
        return initial_state(x, state, self.num_layers, self.hidden_size)


class FusedLSTM(_Deployed):
    """layer_norm=False through `torch.lstm`, the kernel behind `nn.LSTM`."""

    route = "aten fused LSTM kernel (torch.lstm, as nn.LSTM), same weights"

    def forward(
        self, x: Tensor, state: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[Tensor, State]:
        h0, c0 = self._checked_state(x, state)
        weights: List[Tensor] = []
        for cell in self.cells:
            bias = cell.hidden_lin.bias
            weights += [cell.input_lin.weight, cell.hidden_lin.weight, torch.zeros_like(bias), bias]
        y, h, c = torch.lstm(x, [h0, c0], weights, True, self.num_layers, 0.0, False, False, False)
        return y, (h, c)


class _LayerNormDeployed(_Deployed):
    """Routes for layer_norm=True: the gate LayerNorms' parameters gathered per layer."""

    def _gate_norms(self) -> Tuple[List[Tensor], List[Tensor]]:
        """Per layer, the four gates' LayerNorm scales and shifts stacked: [4, H] each."""
        gammas: List[Tensor] = []
        betas: List[Tensor] = []
        for cell in self.cells:
            gamma: List[Tensor] = []
            beta: List[Tensor] = []
            for norm in cell.layer_norm:
                gamma.append(norm.weight)
                beta.append(norm.bias)
            gammas.append(torch.stack(gamma))
            betas.append(torch.stack(beta))
        return gammas, betas


class HoistedLSTM(_LayerNormDeployed):
    """layer_norm=True with the input projection hoisted out of the time loop."""

    route = "hoisted input projection + one layer_norm over [batch, 4, hidden] per step"

    def forward(
        self, x: Tensor, state: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[Tensor, State]:
        h0, c0 = self._checked_state(x, state)
        hidden = self.hidden_size
        batch = x.size(1)
        gammas, betas = self._gate_norms()
        layer_input = x
        h_n: List[Tensor] = []
        c_n: List[Tensor] = []
        for k, cell in enumerate(self.cells):
            gamma, beta = gammas[k], betas[k]  # [4, H]: one scale and shift per gate
            norm_c = cell.layer_norm_c
            # input_lin(x_t) + b for every t at once: [seq, batch, 4H].
            x_proj = F.linear(layer_input, cell.input_lin.weight, cell.hidden_lin.bias)
            w_h = cell.hidden_lin.weight.t()
            h, c = h0[k], c0[k]
            outputs: List[Tensor] = []
            for x_t in x_proj.unbind(0):
                z = torch.addmm(x_t, h, w_h).view(batch, 4, hidden)
                gates = torch.addcmul(
                    beta, F.layer_norm(z, [hidden], None, None, norm_c.eps), gamma
                )
                i, f, g, o = gates.unbind(1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                c_normed = F.layer_norm(c, [hidden], norm_c.weight, norm_c.bias, norm_c.eps)
                h = torch.sigmoid(o) * torch.tanh(c_normed)
                outputs.append(h)
            layer_input = torch.stack(outputs)
            h_n.append(h)
            c_n.append(c)
        return layer_input, (torch.stack(h_n), torch.stack(c_n))


class KernelLSTM(_LayerNormDeployed):
    """layer_norm=True with each layer's time loop in the fused kernel."""

    route = (
        "hoisted input projection + fused LayerNorm-LSTM kernel per layer "
        "(lstm_export::layer_norm_lstm_layer; needs lstm_export_kernels.so)"
    )

    def forward(
        self, x: Tensor, state: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[Tensor, State]:
        h0, c0 = self._checked_state(x, state)
        gammas, betas = self._gate_norms()
        layer_input = x
        h_n: List[Tensor] = []
        c_n: List[Tensor] = []
        for k, cell in enumerate(self.cells):
            norm_c = cell.layer_norm_c
            x_proj = F.linear(layer_input, cell.input_lin.weight, cell.hidden_lin.bias)
            layer_input, h, c = torch.ops.lstm_export.layer_norm_lstm_layer(
                x_proj,
                h0[k],
                c0[k],
                cell.hidden_lin.weight,
                gammas[k].reshape(-1),
                betas[k].reshape(-1),
                norm_c.weight,
                norm_c.bias,
                norm_c.eps,
            )
            h_n.append(h)
            c_n.append(c)
        return layer_input, (torch.stack(h_n), torch.stack(c_n))


def _route_class(layer_norm: bool, fused_kernel: bool = False) -> type[_Deployed]:
    if fused_kernel and layer_norm:
        return KernelLSTM
    return HoistedLSTM if layer_norm else FusedLSTM


def deployable(model: LSTM, fused_kernel: bool = False) -> _Deployed:
    """The fastest module computing `model`'s equations on its own parameters.

    `fused_kernel` picks the custom-op route for LayerNorm models (the op must be
    loaded: `lstm_export.exporters.kernel.build_kernel`); plain models have aten's kernel already.
    """
    return _route_class(model.layer_norm, fused_kernel)(model)


def route_of(config: LSTMConfig, fused_kernel: bool = False) -> str:
    """Name the TorchScript route a config gets; recorded in the manifest."""
    return _route_class(config.layer_norm, fused_kernel).route
