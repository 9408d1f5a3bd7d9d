"""The scratch LSTM: the textbook cell, optional LayerNorm, stacked into layers.

This is the reference implementation, composed as PyTorch's fastrnns composes its
custom LSTMs: a cell (one step), a layer (the cell over a sequence: `LSTMCell.scan`)
and a stack (`LayerStack`, the one loop over layers, which the TorchScript routes of
`lstm_export.exporters.routes` share). It is written so that `torch.jit.script`
accepts it as it is (typed signatures, `ModuleList` iteration, `List[Tensor]`
accumulators), and its state-dict keys are the ones the original notebook code
wrote, so old checkpoints load unchanged.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from lstm_export.config import positive_int

State = Tuple[Tensor, Tensor]


def _dtype_name(dtype: torch.dtype) -> str:
    # TorchScript formats a dtype as its enum number; spell out the usual ones.
    names = [
        (torch.float32, "float32"),
        (torch.float64, "float64"),
        (torch.float16, "float16"),
        (torch.bfloat16, "bfloat16"),
        (torch.int64, "int64"),
        (torch.int32, "int32"),
        (torch.int16, "int16"),
        (torch.int8, "int8"),
        (torch.uint8, "uint8"),
        (torch.bool, "bool"),
    ]
    for candidate, name in names:
        if dtype == candidate:
            return name
    return "another dtype"


def check_inputs(
    x: Tensor,
    state: Optional[State],
    input_size: int,
    hidden_size: int,
    num_layers: int,
    dtype: torch.dtype,
) -> None:
    """Refuse bad input with the expected and received shapes, also in TorchScript."""
    if x.dtype != dtype:
        raise ValueError(
            f"x must be a {_dtype_name(dtype)} tensor like the model's weights, "
            f"got {_dtype_name(x.dtype)}"
        )
    if x.dim() != 3 or x.size(2) != input_size or x.size(0) < 1 or x.size(1) < 1:
        raise ValueError(
            f"x must have shape [seq>=1, batch>=1, input_size={input_size}], got {list(x.shape)}"
        )
    if state is not None:
        expected = [num_layers, x.size(1), hidden_size]
        for name, tensor in (("h0", state[0]), ("c0", state[1])):
            if list(tensor.shape) != expected:
                raise ValueError(
                    f"{name} must have shape [num_layers={expected[0]}, batch={expected[1]}, "
                    f"hidden_size={expected[2]}], got {list(tensor.shape)}"
                )
            if tensor.dtype != dtype:
                raise ValueError(
                    f"{name} must be a {_dtype_name(dtype)} tensor like x, "
                    f"got {_dtype_name(tensor.dtype)}"
                )


def initial_state(x: Tensor, state: Optional[State], num_layers: int, hidden_size: int) -> State:
    """The given (h0, c0), or zeros for x's batch."""
    if state is not None:
        return state
    zeros = torch.zeros(num_layers, x.size(1), hidden_size, dtype=x.dtype, device=x.device)
    return zeros, zeros


class LSTMCell(nn.Module):
    r"""One LSTM step, with LayerNorm on every gate and on the cell state.

    With $z = W_x x_t + W_h h_{t-1} + b$ split into four chunks of `hidden_size`:

    $$i = LN_i(z_i), \quad f = LN_f(z_f), \quad g = LN_g(z_g), \quad o = LN_o(z_o)$$
    $$c_t = \sigma(f) \odot c_{t-1} + \sigma(i) \odot \tanh(g)$$
    $$h_t = \sigma(o) \odot \tanh(LN_c(c_t))$$

    Every $LN$ is the identity when `layer_norm=False`. The state carried to the
    next step is the un-normalized $c_t$.
    """

    def __init__(self, input_size: int, hidden_size: int, layer_norm: bool = False) -> None:
        super().__init__()
        positive_int("input_size", input_size)
        positive_int("hidden_size", hidden_size)
        # W_x has no bias: one bias, on the hidden projection, is enough.
        self.input_lin = nn.Linear(input_size, 4 * hidden_size, bias=False)
        self.hidden_lin = nn.Linear(hidden_size, 4 * hidden_size)
        # Identity keeps the state dict free of LayerNorm keys when it is off.
        if layer_norm:
            self.layer_norm = nn.ModuleList([nn.LayerNorm(hidden_size) for _ in range(4)])
            self.layer_norm_c: nn.Module = nn.LayerNorm(hidden_size)
        else:
            self.layer_norm = nn.ModuleList([nn.Identity() for _ in range(4)])
            self.layer_norm_c = nn.Identity()

    def forward(self, x: Tensor, state: State) -> State:
        """One step: x [batch, input_size] is x_t, state is (h_{t-1}, c_{t-1})."""
        h, c = state
        # $z = W_x x_t + W_h h_{t-1} + b$
        z = self.input_lin(x) + self.hidden_lin(h)
        # $z_i, z_f, z_g, z_o$: four chunks of hidden_size
        chunks = z.chunk(4, dim=-1)
        ifgo: List[Tensor] = []
        for k, norm in enumerate(self.layer_norm):
            # $LN_i(z_i), LN_f(z_f), LN_g(z_g), LN_o(z_o)$, in turn
            ifgo.append(norm(chunks[k]))
        # $i, f, g, o$: TorchScript unpacks a List[Tensor] too (its length checked when run),
        # so no `ifgo[0], ifgo[1], ...` is needed.
        i, f, g, o = ifgo
        # $c_t = \sigma(f) \odot c_{t-1} + \sigma(i) \odot \tanh(g)$
        c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        # $h_t = \sigma(o) \odot \tanh(LN_c(c_t))$
        h_next = torch.sigmoid(o) * torch.tanh(self.layer_norm_c(c_next))
        return h_next, c_next

    def scan(self, x: Tensor, state: State) -> Tuple[Tensor, State]:
        """The layer: this cell over x [seq, batch, input_size] from state (h0, c0); returns
        every h_t [seq, batch, hidden_size] and the last (h, c)."""
        h, c = state
        outputs: List[Tensor] = []
        for x_t in x.unbind(0):
            h, c = self(x_t, (h, c))
            outputs.append(h)
        return torch.stack(outputs), (h, c)


class LayerStack(nn.Module):
    """The one loop over layers (fastrnns' StackedLSTM): layer k runs the whole sequence and
    its h_t are layer k+1's x_t.

    The eager `LSTM` and the TorchScript routes differ only in their layers: each module of
    `cells` (the state-dict prefix) has `scan(x, (h0, c0)) -> (y, (h, c))` and an `input_lin`
    whose weight's dtype is the model's. Inputs and outputs as in `LSTM`.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        layer_norm: bool,
        cells: nn.ModuleList,
    ) -> None:
        super().__init__()
        # Plain attributes (not Final) so TorchScript keeps them readable on the
        # scripted module, from Python and from C++ alike.
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.layer_norm = bool(layer_norm)
        self.cells = cells

    def _checked_state(self, x: Tensor, state: Optional[State]) -> State:
        """The input checks, then the given or zero (h0, c0)."""
        dtype = self.cells[0].input_lin.weight.dtype
        check_inputs(x, state, self.input_size, self.hidden_size, self.num_layers, dtype)
        return initial_state(x, state, self.num_layers, self.hidden_size)

    def forward(self, x: Tensor, state: Optional[State] = None) -> Tuple[Tensor, State]:
        h0, c0 = self._checked_state(x, state)
        layer_input = x
        h_n: List[Tensor] = []
        c_n: List[Tensor] = []
        for k, layer in enumerate(self.cells):
            layer_input, (h, c) = layer.scan(layer_input, (h0[k], c0[k]))
            h_n.append(h)
            c_n.append(c)
        return layer_input, (torch.stack(h_n), torch.stack(c_n))


class LSTM(LayerStack):
    """A stack of `LSTMCell`s run over a sequence; layer k's h_t feeds layer k+1.

    `x` is [seq, batch, input_size]; `state` is (h0, c0), each
    [num_layers, batch, hidden_size], zeros when omitted. Returns
    y [seq, batch, hidden_size] (the top layer) and the final (h, c).
    """

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, layer_norm: bool = False
    ) -> None:
        positive_int("num_layers", num_layers)
        sizes = [input_size] + [hidden_size] * (num_layers - 1)
        cells = nn.ModuleList([LSTMCell(n, hidden_size, layer_norm) for n in sizes])
        super().__init__(input_size, hidden_size, num_layers, layer_norm, cells)
