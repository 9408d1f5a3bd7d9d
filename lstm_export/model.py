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

from lstm_export.config import LSTMConfig, positive_int

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


def _layout(batch_first: bool, last: str) -> str:
    return f"[batch, seq, {last}]" if batch_first else f"[seq, batch, {last}]"


def check_inputs(
    x: Tensor,
    state: Optional[State],
    input_size: int,
    hidden_size: int,
    num_layers: int,
    dtype: torch.dtype,
    batch_first: bool = False,
    num_directions: int = 1,
) -> None:
    """Refuse bad input with the expected and received shapes, also in TorchScript.

    `x` is as the caller gave it (batch-first or not); states are [num_layers * D, batch,
    hidden_size] either way, as in nn.LSTM.
    """
    if x.dtype != dtype:
        raise ValueError(
            f"x must be a {_dtype_name(dtype)} tensor like the model's weights, "
            f"got {_dtype_name(x.dtype)}"
        )
    if x.dim() != 3 or x.size(2) != input_size or x.size(0) < 1 or x.size(1) < 1:
        expected = _layout(batch_first, f"input_size={input_size}")
        expected = expected.replace("seq", "seq>=1").replace("batch", "batch>=1")
        raise ValueError(f"x must have shape {expected}, got {list(x.shape)}")
    if state is not None:
        batch = x.size(0) if batch_first else x.size(1)
        layers = "num_layers" if num_directions == 1 else "num_layers*2"
        expected = [num_layers * num_directions, batch, hidden_size]
        for name, tensor in (("h0", state[0]), ("c0", state[1])):
            if list(tensor.shape) != expected:
                raise ValueError(
                    f"{name} must have shape [{layers}={expected[0]}, batch={expected[1]}, "
                    f"hidden_size={expected[2]}], got {list(tensor.shape)}"
                )
            if tensor.dtype != dtype:
                raise ValueError(
                    f"{name} must be a {_dtype_name(dtype)} tensor like x, "
                    f"got {_dtype_name(tensor.dtype)}"
                )


def check_lengths(lengths: Tensor, seq: int, batch: int) -> None:
    """Refuse `lengths` unless it is int64 [batch] with every value in 1..seq."""
    if not torch.jit.is_scripting() and not isinstance(lengths, Tensor):  # scripted: typed
        raise ValueError(f"lengths must be an int64 tensor, got {type(lengths).__name__}")
    if lengths.dtype != torch.int64:
        raise ValueError(f"lengths must be an int64 tensor, got {_dtype_name(lengths.dtype)}")
    if lengths.dim() != 1 or lengths.size(0) != batch:
        raise ValueError(f"lengths must have shape [batch={batch}], got {list(lengths.shape)}")
    # `not torch.jit.is_scripting()` alone in its `if`: only then does TorchScript skip the block.
    if not torch.jit.is_scripting():  # noqa: SIM102
        if torch.compiler.is_exporting():
            # torch.export: the values are known only when the compiled model runs, which
            # asserts them there (an error naming the failed bound, not this message).
            torch._check(lengths.min().item() >= 1)
            torch._check(lengths.max().item() <= seq)
            return
    shortest = int(lengths.min())
    longest = int(lengths.max())
    if shortest < 1 or longest > seq:
        bad = shortest if shortest < 1 else longest
        raise ValueError(f"lengths must each be in 1..seq={seq}, got {bad}")


def initial_state(x: Tensor, state: Optional[State], layers: int, hidden_size: int) -> State:
    """The given (h0, c0), or zeros for time-major x's batch; `layers` is num_layers * D."""
    if state is not None:
        return state
    zeros = torch.zeros(layers, x.size(1), hidden_size, dtype=x.dtype, device=x.device)
    return zeros, zeros


def valid_steps(lengths: Tensor, seq: int) -> Tensor:
    """[seq, batch, 1] bool: step t of sequence b is valid when t < lengths[b]."""
    steps = torch.arange(seq, device=lengths.device).unsqueeze(1)
    return (steps < lengths.unsqueeze(0)).unsqueeze(2)


def reverse_index(lengths: Tensor, seq: int) -> Tensor:
    """[seq, batch]: the step each step is swapped with when every sequence is reversed
    within its own length (t -> lengths[b] - 1 - t; padding steps stay where they are)."""
    steps = torch.arange(seq, device=lengths.device).unsqueeze(1)
    ends = lengths.unsqueeze(0)
    return torch.where(steps < ends, ends - 1 - steps, steps)


def reverse_steps(x: Tensor, index: Optional[Tensor]) -> Tensor:
    """Time-major x with each sequence reversed within its length (`reverse_index`), or
    wholly when every sequence is full (`index` None). Its own inverse."""
    if index is None:
        return x.flip(0)
    return x.gather(0, index.unsqueeze(2).expand(x.size(0), x.size(1), x.size(2)))


def padded_step(new: State, old: State, valid: Optional[Tensor], t: int) -> Tuple[Tensor, State]:
    """One step's output and carried state under the padding mask: where step t is padding
    (`valid[t]` false) the output is 0 and the old (h, c) is carried; without a mask, the
    new h and (h, c)."""
    h_t, c_t = new
    if valid is None:
        return h_t, (h_t, c_t)
    keep = valid[t]
    carried = (torch.where(keep, h_t, old[0]), torch.where(keep, c_t, old[1]))
    return h_t.masked_fill(~keep, 0.0), carried


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

    def scan(self, x: Tensor, state: State, valid: Optional[Tensor] = None) -> Tuple[Tensor, State]:
        """The layer: this cell over x [seq, batch, input_size] from state (h0, c0); returns
        every h_t [seq, batch, hidden_size] and the last (h, c).

        `valid` ([seq, batch, 1] bool, `valid_steps`) marks the padding: there h_t is 0 and
        (h, c) is carried unchanged, so each sequence ends with its last valid step's state.
        """
        h, c = state
        outputs: List[Tensor] = []
        for t, x_t in enumerate(x.unbind(0)):
            y_t, (h, c) = padded_step(self(x_t, (h, c)), (h, c), valid, t)
            outputs.append(y_t)
        return torch.stack(outputs), (h, c)


class LayerStack(nn.Module):
    """The one loop over layers (fastrnns' StackedLSTM): layer k runs the whole sequence and
    its outputs are layer k+1's x_t.

    The eager `LSTM` and the TorchScript routes differ only in their layers: each module of
    `cells` (forward direction, the state-dict prefix) and `reverse_cells` (the reverse one,
    empty unless bidirectional) has `scan(x, (h0, c0), valid) -> (y, (h, c))` and an
    `input_lin` whose weight's dtype is the model's. Inputs and outputs as in `LSTM`.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        layer_norm: bool,
        cells: nn.ModuleList,
        reverse_cells: nn.ModuleList,
        batch_first: bool = False,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        # Plain attributes (not Final) so TorchScript keeps them readable on the
        # scripted module, from Python and from C++ alike.
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.layer_norm = bool(layer_norm)
        self.batch_first = bool(batch_first)
        self.bidirectional = bool(bidirectional)
        self.num_directions = 2 if bidirectional else 1
        self.cells = cells
        self.reverse_cells = reverse_cells

    def _checked(
        self, x: Tensor, state: Optional[State], lengths: Optional[Tensor]
    ) -> Tuple[Tensor, State]:
        """The input checks, then time-major x and the given or zero (h0, c0)."""
        dtype = self.cells[0].input_lin.weight.dtype
        check_inputs(
            x,
            state,
            self.input_size,
            self.hidden_size,
            self.num_layers,
            dtype,
            self.batch_first,
            self.num_directions,
        )
        if self.batch_first:
            x = x.transpose(0, 1)
        if lengths is not None:
            check_lengths(lengths, x.size(0), x.size(1))
        layers = self.num_layers * self.num_directions
        return x, initial_state(x, state, layers, self.hidden_size)

    def _output(self, y: Tensor) -> Tensor:
        """Time-major y in the caller's layout."""
        return y.transpose(0, 1) if self.batch_first else y

    def forward(
        self, x: Tensor, state: Optional[State] = None, lengths: Optional[Tensor] = None
    ) -> Tuple[Tensor, State]:
        x, (h0, c0) = self._checked(x, state, lengths)
        valid: Optional[Tensor] = None
        index: Optional[Tensor] = None
        if lengths is not None:
            valid = valid_steps(lengths, x.size(0))
            if self.bidirectional:
                index = reverse_index(lengths, x.size(0))
        layer_input = x
        h_n: List[Tensor] = []
        c_n: List[Tensor] = []
        if self.bidirectional:
            # State index layer*2 + direction; outputs [..., forward | reverse].
            for k, (cell, reverse) in enumerate(zip(self.cells, self.reverse_cells)):  # noqa: B905 (TorchScript has no strict=)
                y, (h, c) = cell.scan(layer_input, (h0[2 * k], c0[2 * k]), valid)
                backward = reverse_steps(layer_input, index)
                y_rev, (h_rev, c_rev) = reverse.scan(
                    backward, (h0[2 * k + 1], c0[2 * k + 1]), valid
                )
                layer_input = torch.cat([y, reverse_steps(y_rev, index)], dim=2)
                h_n += [h, h_rev]
                c_n += [c, c_rev]
        else:
            for k, layer in enumerate(self.cells):
                layer_input, (h, c) = layer.scan(layer_input, (h0[k], c0[k]), valid)
                h_n.append(h)
                c_n.append(c)
        return self._output(layer_input), (torch.stack(h_n), torch.stack(c_n))


class LSTM(LayerStack):
    """A stack of `LSTMCell`s run over a sequence; layer k's outputs feed layer k+1.

    `x` is [seq, batch, input_size] ([batch, seq, input_size] when `batch_first`);
    `state` is (h0, c0), each [num_layers * D, batch, hidden_size] (D = 2 when
    `bidirectional`, index layer*2 + direction), zeros when omitted; `lengths` (int64
    [batch], each in 1..seq) is where each padded sequence ends, all of seq when omitted.
    Returns y [seq, batch, D * hidden_size] (the top layer, forward direction first, zero
    past each length) and each sequence's (h, c) after its last valid step, as nn.LSTM
    gives on a packed sequence.

    The reverse cells' keys sit beside the forward ones: `reverse_cells.{k}.input_lin.weight`
    beside `cells.{k}.input_lin.weight`.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        layer_norm: bool = False,
        batch_first: bool = False,
        bidirectional: bool = False,
    ) -> None:
        positive_int("num_layers", num_layers)
        directions = 2 if bidirectional else 1
        sizes = [input_size] + [directions * hidden_size] * (num_layers - 1)
        cells = nn.ModuleList([LSTMCell(n, hidden_size, layer_norm) for n in sizes])
        reverse_cells = nn.ModuleList(
            [LSTMCell(n, hidden_size, layer_norm) for n in sizes] if bidirectional else []
        )
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            layer_norm,
            cells,
            reverse_cells,
            batch_first,
            bidirectional,
        )

    @classmethod
    def from_config(cls, config: LSTMConfig) -> LSTM:
        """The model a config describes, with fresh weights."""
        return cls(
            config.input_size,
            config.hidden_size,
            config.num_layers,
            config.layer_norm,
            config.batch_first,
            config.bidirectional,
        )

    def config(self) -> LSTMConfig:
        """This model's config, read off its attributes."""
        return LSTMConfig(
            self.input_size,
            self.hidden_size,
            self.num_layers,
            self.layer_norm,
            self.batch_first,
            self.bidirectional,
        )
