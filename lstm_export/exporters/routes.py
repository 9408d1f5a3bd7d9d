"""The deployment routes: faster modules over the same weights, for `model.pt` (TorchScript)
and `model.pt2` (torch.export + AOTInductor, `pt2_deployable`: `KernelLSTM` or `OpLSTM`).

The scratch `LSTM` stays the reference in eager mode; what is scripted and
saved is one of these modules, which share its parameters (so the state dict,
the attributes and the `forward(x, state=None)` signature are identical) but
compute the same equations faster:

- `AtenLSTM`, layer_norm=False: aten's plain LSTM kernel (`torch.lstm`, what
  `nn.LSTM` runs) over all layers at once, our weights passed as its
  (w_ih, w_hh, b_ih=0, b_hh).
- `HoistedLSTM`, layer_norm=True: per layer, the input projection of the whole
  sequence as one matmul, then a time loop doing one `addmm` and one `layer_norm`
  over a [batch, 4, hidden] view per step.
- `KernelLSTM`, layer_norm=True, opt-in (`model.fused.pt`, "the fused kernel"): the
  same hoisted projection, then the whole time loop of a layer in one custom op of
  `lstm_export.native.torch_kernel`; the saved module needs that op's library loaded
  before it can be loaded.

The LayerNorm routes are `LayerStack`s like the model: the same loop over layers,
over layers of their own that hold the cell's submodules under the cell's names.
Parity with the reference is what the verify matrix proves.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lstm_export.config import LSTMConfig
from lstm_export.model import LSTM, LayerStack, LSTMCell, State, padded_step


class _Route(LayerStack):
    """A stack over the reference model's config attributes and parameters."""

    route = ""

    def __init__(self, model: LSTM, cells: nn.ModuleList, reverse_cells: nn.ModuleList) -> None:
        super().__init__(
            model.input_size,
            model.hidden_size,
            model.num_layers,
            model.layer_norm,
            cells,
            reverse_cells,
            model.batch_first,
            model.bidirectional,
        )


def _aten_weights(w_ih: Tensor, w_hh: Tensor, bias: Tensor) -> List[Tensor]:
    """One direction of one layer as torch.lstm takes it: (w_ih, w_hh, b_ih=0, b_hh)."""
    return [w_ih, w_hh, torch.zeros_like(bias), bias]


class _AtenParams(_Route):
    """A plain stack whose weights go to aten's LSTM as one list."""

    def __init__(self, model: LSTM) -> None:
        super().__init__(model, model.cells, model.reverse_cells)

    def _params(self) -> List[Tensor]:
        """torch.lstm's flat weights: per layer, forward direction then reverse (nn.LSTM's
        order)."""
        weights: List[Tensor] = []
        if self.bidirectional:
            for cell, reverse in zip(self.cells, self.reverse_cells):  # noqa: B905 (TorchScript has no strict=)
                weights += _aten_weights(
                    cell.input_lin.weight, cell.hidden_lin.weight, cell.hidden_lin.bias
                )
                weights += _aten_weights(
                    reverse.input_lin.weight, reverse.hidden_lin.weight, reverse.hidden_lin.bias
                )
        else:
            for layer in self.cells:
                weights += _aten_weights(
                    layer.input_lin.weight, layer.hidden_lin.weight, layer.hidden_lin.bias
                )
        return weights


class AtenLSTM(_AtenParams):
    """layer_norm=False through `torch.lstm`, aten's plain kernel behind `nn.LSTM`; a ragged
    batch goes in packed, as `pack_padded_sequence` packs it for nn.LSTM."""

    route = "aten fused LSTM kernel (torch.lstm, as nn.LSTM), same weights"

    def forward(
        self, x: Tensor, state: Optional[State] = None, lengths: Optional[Tensor] = None
    ) -> Tuple[Tensor, State]:
        x, (h0, c0) = self._checked(x, state, lengths)
        weights = self._params()
        layers, bidirectional = self.num_layers, self.bidirectional
        if lengths is None:
            y, h, c = torch.lstm(
                x, [h0, c0], weights, True, layers, 0.0, False, bidirectional, False
            )
            return self._output(y), (h, c)
        # Packed: sorted longest first, run, padded back, and put back in the caller's order.
        sorted_lengths, order = torch.sort(lengths, descending=True)
        unsort = torch.argsort(order)
        data, batch_sizes = torch._pack_padded_sequence(
            x.index_select(1, order), sorted_lengths, False
        )
        hx = [h0.index_select(1, order), c0.index_select(1, order)]
        packed, h, c = torch.lstm(
            data, batch_sizes, hx, weights, True, layers, 0.0, False, bidirectional
        )
        y, _ = torch._pad_packed_sequence(packed, batch_sizes, False, 0.0, x.size(0))
        y = y.index_select(1, unsort)
        return self._output(y), (h.index_select(1, unsort), c.index_select(1, unsort))


class OpLSTM(_AtenParams):
    """layer_norm=False for `model.pt2`: `AtenLSTM`'s computation (aten's LSTM, packed for a
    ragged batch) inside the op `lstm_export::aten_lstm`, which torch.export keeps whole; the
    saved package needs that op's library loaded before it runs."""

    route = (
        "aten fused LSTM kernel (at::lstm, as nn.LSTM) in the op lstm_export::aten_lstm "
        "(needs lstm_export_kernels.so)"
    )

    def forward(
        self, x: Tensor, state: Optional[State] = None, lengths: Optional[Tensor] = None
    ) -> Tuple[Tensor, State]:
        x, (h0, c0) = self._checked(x, state, lengths)
        y, h, c = torch.ops.lstm_export.aten_lstm(
            x, h0, c0, self._params(), self.num_layers, self.bidirectional, lengths
        )
        return self._output(y), (h, c)


class _LayerNormLayer(nn.Module):
    """One layer_norm=True layer: the cell's submodules, under the cell's names (so the
    state-dict keys stay `cells.{k}.input_lin.weight`, ...), run faster than step by step."""

    # A constant in the scripted code: no interpreter op per step to read it.
    __constants__ = ("hidden_size",)

    def __init__(self, cell: LSTMCell) -> None:
        super().__init__()
        self.hidden_size = cell.hidden_lin.in_features
        self.input_lin = cell.input_lin
        self.hidden_lin = cell.hidden_lin
        self.layer_norm = cell.layer_norm
        self.layer_norm_c = cell.layer_norm_c

    def _gate_norms(self) -> Tuple[Tensor, Tensor]:
        """The four gates' LayerNorm scales and shifts stacked: [4, H] each."""
        gamma: List[Tensor] = []
        beta: List[Tensor] = []
        for norm in self.layer_norm:
            gamma.append(norm.weight)
            beta.append(norm.bias)
        return torch.stack(gamma), torch.stack(beta)

    def _project(self, x: Tensor) -> Tensor:
        """$W_x x_t + b$ for every t at once: [seq, batch, 4H], the hoisted input projection."""
        return F.linear(x, self.input_lin.weight, self.hidden_lin.bias)


class HoistedLayer(_LayerNormLayer):
    """The input projection hoisted out of the time loop; one step per x_t after it."""

    def scan(self, x: Tensor, state: State, valid: Optional[Tensor] = None) -> Tuple[Tensor, State]:
        gamma, beta = self._gate_norms()
        x_proj = self._project(x)
        w_h = self.hidden_lin.weight.t()
        h, c = state
        outputs: List[Tensor] = []
        for t, xw_t in enumerate(x_proj.unbind(0)):
            new = self.step(xw_t, (h, c), w_h, gamma, beta)
            y_t, (h, c) = padded_step(new, (h, c), valid, t)  # as `LSTMCell.scan`
            outputs.append(y_t)
        return torch.stack(outputs), (h, c)

    def step(self, xw_t: Tensor, state: State, w_h: Tensor, gamma: Tensor, beta: Tensor) -> State:
        """`LSTMCell.forward`'s equations from $W_x x_t + b$ (`xw_t`), the four gates'
        LayerNorms as one over a [batch, 4, H] view: `gamma`, `beta` are [4, H]."""
        h, c = state
        hidden = self.hidden_size
        norm_c = self.layer_norm_c
        # $z = W_x x_t + W_h h_{t-1} + b$, one row per gate: $z_i, z_f, z_g, z_o$
        z = torch.addmm(xw_t, h, w_h).view(-1, 4, hidden)
        # $LN_i(z_i), LN_f(z_f), LN_g(z_g), LN_o(z_o)$: normalize each row, then its scale, shift
        gates = torch.addcmul(beta, F.layer_norm(z, [hidden], None, None, norm_c.eps), gamma)
        # $i, f, g, o$: the four rows
        i, f, g, o = gates.unbind(1)
        # $c_t = \sigma(f) \odot c_{t-1} + \sigma(i) \odot \tanh(g)$
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        # $LN_c(c_t)$
        c_normed = F.layer_norm(c, [hidden], norm_c.weight, norm_c.bias, norm_c.eps)
        # $h_t = \sigma(o) \odot \tanh(LN_c(c_t))$
        h = torch.sigmoid(o) * torch.tanh(c_normed)
        return h, c


class KernelLayer(_LayerNormLayer):
    """The hoisted input projection, then the whole time loop in the fused kernel's one op.

    `valid` goes to the op as its [seq, batch] mask: padding steps carry (h, c) and output
    0 inside the kernel, as `LSTMCell.scan` masks them; without it the op runs unmasked.
    """

    def scan(self, x: Tensor, state: State, valid: Optional[Tensor] = None) -> Tuple[Tensor, State]:
        gamma, beta = self._gate_norms()
        norm_c = self.layer_norm_c
        mask: Optional[Tensor] = None
        if valid is not None:
            mask = valid.squeeze(2)  # [seq, batch, 1] -> [seq, batch]
        y, h, c = torch.ops.lstm_export.layer_norm_lstm_layer(
            self._project(x),
            state[0],
            state[1],
            self.hidden_lin.weight,
            gamma.reshape(-1),
            beta.reshape(-1),
            norm_c.weight,
            norm_c.bias,
            norm_c.eps,
            mask,
        )
        return y, (h, c)


def _layers(kind: type[_LayerNormLayer], model: LSTM) -> Tuple[nn.ModuleList, nn.ModuleList]:
    """`kind` over each forward and each reverse cell of `model`."""
    return (
        nn.ModuleList([kind(cell) for cell in model.cells]),
        nn.ModuleList([kind(cell) for cell in model.reverse_cells]),
    )


class HoistedLSTM(_Route):
    """layer_norm=True with the input projection hoisted out of the time loop."""

    route = "hoisted input projection + one layer_norm over [batch, 4, hidden] per step"

    def __init__(self, model: LSTM) -> None:
        super().__init__(model, *_layers(HoistedLayer, model))


class KernelLSTM(_Route):
    """layer_norm=True with each layer's time loop in the fused kernel."""

    route = (
        "hoisted input projection + fused LayerNorm-LSTM kernel per layer "
        "(lstm_export::layer_norm_lstm_layer; needs lstm_export_kernels.so)"
    )

    def __init__(self, model: LSTM) -> None:
        super().__init__(model, *_layers(KernelLayer, model))


def _route_class(layer_norm: bool, fused_kernel: bool = False) -> type[_Route]:
    if fused_kernel and layer_norm:
        return KernelLSTM
    return HoistedLSTM if layer_norm else AtenLSTM


def deployable(model: LSTM, fused_kernel: bool = False) -> _Route:
    """The fastest module computing `model`'s equations on its own parameters.

    `fused_kernel` picks the custom-op route for LayerNorm models (the op must be
    loaded: `lstm_export.native.torch_kernel.build_kernel`); plain models have aten's kernel
    already.
    """
    return _route_class(model.layer_norm, fused_kernel)(model)


def route_of(config: LSTMConfig, fused_kernel: bool = False) -> str:
    """Name the TorchScript route a config gets; recorded in the manifest."""
    return _route_class(config.layer_norm, fused_kernel).route


def _pt2_route_class(layer_norm: bool) -> type[_Route]:
    return KernelLSTM if layer_norm else OpLSTM


def pt2_deployable(model: LSTM) -> _Route:
    """The module `model.pt2` compiles: each layer (LayerNorm) or the whole stack (plain) in
    one op of our kernel library, which torch.export keeps opaque and AOTInductor calls, so
    the package runs any length. The ops must be loaded
    (`lstm_export.native.torch_kernel.build_kernel`)."""
    return _pt2_route_class(model.layer_norm)(model)


def pt2_route_of(config: LSTMConfig) -> str:
    """Name `model.pt2`'s route; recorded in the manifest and the package's metadata."""
    return _pt2_route_class(config.layer_norm).route
