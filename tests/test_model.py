"""The scratch LSTM against the equations written out, and against torch.nn.LSTM."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from helpers import nn_lstm_with_weights_of, run_packed, small_model
from lstm_export.exporters.torchscript import script
from lstm_export.model import LSTM, LSTMCell


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight + bias


def reference_lstm(state: dict, x, h0, c0, num_layers: int, hidden: int, ln: bool):
    """The issue's equations, step by step and layer by layer, from raw weights."""
    h = [h0[k] for k in range(num_layers)]
    c = [c0[k] for k in range(num_layers)]
    ys = []
    for t in range(x.shape[0]):
        inp = x[t]
        for k in range(num_layers):
            p = f"cells.{k}."
            z = inp @ state[p + "input_lin.weight"].T + h[k] @ state[p + "hidden_lin.weight"].T
            z = z + state[p + "hidden_lin.bias"]
            gates = [z[:, n * hidden : (n + 1) * hidden] for n in range(4)]
            if ln:
                gates = [
                    layer_norm(
                        g, state[p + f"layer_norm.{n}.weight"], state[p + f"layer_norm.{n}.bias"]
                    )
                    for n, g in enumerate(gates)
                ]
            i, f, g, o = gates
            c[k] = torch.sigmoid(f) * c[k] + torch.sigmoid(i) * torch.tanh(g)
            c_out = c[k]
            if ln:
                c_out = layer_norm(
                    c[k], state[p + "layer_norm_c.weight"], state[p + "layer_norm_c.bias"]
                )
            h[k] = torch.sigmoid(o) * torch.tanh(c_out)
            inp = h[k]
        ys.append(inp)
    return torch.stack(ys), torch.stack(h), torch.stack(c)


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("seq,batch", [(1, 1), (2, 3), (17, 2)])
@pytest.mark.parametrize("ln", [False, True], ids=["plain", "layer_norm"])
def test_eager_and_scripted_follow_the_equations(num_layers, seq, batch, ln):
    model = small_model(ln, num_layers)
    scripted = script(model)
    x = torch.randn(seq, batch, 5)
    h0, c0 = torch.randn(2, num_layers, batch, 8).unbind(0)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    expected = reference_lstm(state, x, h0, c0, num_layers, 8, ln)
    for module in (model, scripted):
        with torch.no_grad():
            y, (h, c) = module(x, (h0, c0))
        for got, want in zip((y, h, c), expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_zero_state_is_the_default(model):
    x = torch.randn(4, 2, 5)
    zeros = torch.zeros(2, 2, 8)
    with torch.no_grad():
        y1, (h1, c1) = model(x)
        y2, (h2, c2) = model(x, (zeros, zeros))
    assert torch.equal(y1, y2) and torch.equal(h1, h2) and torch.equal(c1, c2)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_plain_model_matches_nn_lstm_with_the_same_weights(num_layers):
    model = small_model(False, num_layers)
    reference = nn_lstm_with_weights_of(model)
    x = torch.randn(23, 3, 5)
    h0, c0 = torch.randn(2, num_layers, 3, 8).unbind(0)
    with torch.no_grad():
        want_y, (want_h, want_c) = reference(x, (h0, c0))
        for module in (model, script(model)):
            y, (h, c) = module(x, (h0, c0))
            torch.testing.assert_close(y, want_y, atol=1e-5, rtol=0)
            torch.testing.assert_close(h, want_h, atol=1e-5, rtol=0)
            torch.testing.assert_close(c, want_c, atol=1e-5, rtol=0)


def test_state_dict_keys_are_the_notebook_ones():
    plain = small_model(False, 2).state_dict()
    assert {k: list(v.shape) for k, v in plain.items()} == {
        "cells.0.input_lin.weight": [32, 5],
        "cells.0.hidden_lin.weight": [32, 8],
        "cells.0.hidden_lin.bias": [32],
        "cells.1.input_lin.weight": [32, 8],
        "cells.1.hidden_lin.weight": [32, 8],
        "cells.1.hidden_lin.bias": [32],
    }
    normed = small_model(True, 1).state_dict()
    expected = {"cells.0.input_lin.weight", "cells.0.hidden_lin.weight", "cells.0.hidden_lin.bias"}
    for n in range(4):
        expected |= {f"cells.0.layer_norm.{n}.weight", f"cells.0.layer_norm.{n}.bias"}
    expected |= {"cells.0.layer_norm_c.weight", "cells.0.layer_norm_c.bias"}
    assert set(normed) == expected
    assert all(list(normed[k].shape) == [8] for k in expected if "layer_norm" in k)


def test_streaming_in_chunks_equals_the_whole_sequence(model):
    x = torch.randn(17, 2, 5)
    with torch.no_grad():
        whole, (h, c) = model(x)
        state = None
        parts = []
        for chunk in (x[:1], x[1:8], x[8:]):
            y, state = model(chunk, state)
            parts.append(y)
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(state[0], h, atol=1e-6, rtol=0)
    torch.testing.assert_close(state[1], c, atol=1e-6, rtol=0)


def test_scripted_module_exposes_its_config():
    scripted = script(small_model(True, 3))
    assert (scripted.input_size, scripted.hidden_size, scripted.num_layers) == (5, 8, 3)
    assert scripted.layer_norm is True


def test_scripting_does_not_print_the_deprecation_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        script(small_model(False, 1))
    assert not [w for w in caught if "deprecated" in str(w.message)]


BAD_INPUTS = [
    ("rank", lambda: (torch.randn(4, 5), None), "got [4, 5]"),
    ("features", lambda: (torch.randn(4, 2, 6), None), "input_size=5], got [4, 2, 6]"),
    ("empty seq", lambda: (torch.randn(0, 2, 5), None), "got [0, 2, 5]"),
    ("integer", lambda: (torch.ones(4, 2, 5, dtype=torch.long), None), "float32 tensor"),
    ("float64", lambda: (torch.randn(4, 2, 5, dtype=torch.float64), None), "got float64"),
    (
        "state batch",
        lambda: (torch.randn(4, 2, 5), (torch.zeros(2, 3, 8), torch.zeros(2, 3, 8))),
        "h0 must have shape [num_layers=2, batch=2, hidden_size=8], got [2, 3, 8]",
    ),
    (
        "state layers",
        lambda: (torch.randn(4, 2, 5), (torch.zeros(2, 2, 8), torch.zeros(1, 2, 8))),
        "c0 must have shape [num_layers=2, batch=2, hidden_size=8], got [1, 2, 8]",
    ),
    (
        "state dtype",
        lambda: (torch.randn(4, 2, 5), (torch.zeros(2, 2, 8), torch.zeros(2, 2, 8).double())),
        "c0 must be a float32 tensor like x, got float64",
    ),
]


@pytest.mark.parametrize(
    "make,message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_names_expected_and_received_in_eager_and_scripted(make, message):
    model = small_model(False, 2)
    x, state = make()
    with pytest.raises(ValueError, match=None) as eager_error:
        model(x, state)
    assert message in str(eager_error.value)
    with pytest.raises(torch.jit.Error) as scripted_error:
        script(model)(x, state)
    assert message in str(scripted_error.value)


@pytest.mark.parametrize("args", [(0, 8), (5, 0), (5, 8, 0), (-1, 8), (5, 8, True)], ids=str)
def test_sizes_below_one_are_refused_at_construction(args):
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        LSTM(*args)


def test_cell_refuses_bad_sizes():
    with pytest.raises(ValueError, match="hidden_size"):
        LSTMCell(3, 0)


def test_a_cell_is_one_step_of_its_layer(model):
    """`model.cells[k]` is an LSTMCell whose forward is one step: layer 0 over one x_t."""
    x = torch.randn(1, 2, 5)
    h0, c0 = torch.randn(2, model.num_layers, 2, 8).unbind(0)
    cell = model.cells[0]
    assert isinstance(cell, LSTMCell)
    with torch.no_grad():
        h, c = cell(x[0], (h0[0], c0[0]))
        y, (h_n, c_n) = cell.scan(x, (h0[0], c0[0]))
    assert torch.equal(y[0], h) and torch.equal(h_n, h) and torch.equal(c_n, c)


# --- padded batches, batch-first and bidirectional layers -------------------------------

LAYOUTS = [
    pytest.param(False, False, id="time_major"),
    pytest.param(True, False, id="batch_first"),
    pytest.param(False, True, id="bidirectional"),
    pytest.param(True, True, id="batch_first-bidirectional"),
]


def layout_model(ln: bool, batch_first: bool, bidirectional: bool, layers: int = 2) -> LSTM:
    torch.manual_seed(3)
    model = LSTM(5, 8, layers, ln, batch_first, bidirectional)
    with torch.no_grad():  # weights of a trained model's scale, not init's gentle ones
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model.eval()


def reference_direction(state, prefix, x, h0, c0, hidden, ln):
    """One direction of one layer from raw weights: the equations over x [seq, 1, in]."""
    h, c, ys = h0, c0, []
    for t in range(x.shape[0]):
        z = x[t] @ state[prefix + "input_lin.weight"].T + h @ state[prefix + "hidden_lin.weight"].T
        gates = list((z + state[prefix + "hidden_lin.bias"]).split(hidden, dim=-1))
        if ln:
            gates = [
                layer_norm(
                    g,
                    state[f"{prefix}layer_norm.{n}.weight"],
                    state[f"{prefix}layer_norm.{n}.bias"],
                )
                for n, g in enumerate(gates)
            ]
        i, f, g, o = gates
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        c_out = (
            layer_norm(
                c, state[prefix + "layer_norm_c.weight"], state[prefix + "layer_norm_c.bias"]
            )
            if ln
            else c
        )
        h = torch.sigmoid(o) * torch.tanh(c_out)
        ys.append(h)
    return torch.stack(ys), h, c


def reference_sequence(model: LSTM, x, h0, c0):
    """One unpadded time-major sequence x [L, 1, in] through every layer and direction."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    directions = [("cells", False)] + ([("reverse_cells", True)] if model.bidirectional else [])
    hs, cs, inp = [], [], x
    for k in range(model.num_layers):
        outs = []
        for d, (name, backwards) in enumerate(directions):
            s = k * len(directions) + d
            seq = inp.flip(0) if backwards else inp
            y, h, c = reference_direction(
                state, f"{name}.{k}.", seq, h0[s], c0[s], 8, model.layer_norm
            )
            outs.append(y.flip(0) if backwards else y)
            hs.append(h)
            cs.append(c)
        inp = torch.cat(outs, dim=-1)
    return inp, torch.stack(hs), torch.stack(cs)


@pytest.mark.parametrize("batch_first,bidirectional", LAYOUTS)
@pytest.mark.parametrize("ln", [False, True], ids=["plain", "layer_norm"])
def test_ragged_batches_give_each_sequence_its_own_answer(ln, batch_first, bidirectional):
    """Each padded sequence gets what it gets alone, unpadded (the equations written out);
    y is zero past its length. Lengths 1 and full sit in one batch."""
    model = layout_model(ln, batch_first, bidirectional).double()
    seq, lengths = 7, torch.tensor([7, 1, 4])
    x = torch.randn(seq, 3, 5, dtype=torch.float64)
    D = 2 if bidirectional else 1
    h0, c0 = torch.randn(2, 2 * D, 3, 8, dtype=torch.float64).unbind(0)
    given = x.transpose(0, 1) if batch_first else x
    for module in (model, script(model)):
        with torch.no_grad():
            y, (h, c) = module(given, (h0, c0), lengths)
        y = y.transpose(0, 1) if batch_first else y
        assert y.shape == (seq, 3, D * 8)
        for b, length in enumerate(lengths.tolist()):
            want_y, want_h, want_c = reference_sequence(
                model, x[:length, b : b + 1], h0[:, b : b + 1], c0[:, b : b + 1]
            )
            torch.testing.assert_close(y[:length, b : b + 1], want_y, atol=1e-10, rtol=0)
            assert torch.count_nonzero(y[length:, b]) == 0
            torch.testing.assert_close(h[:, b : b + 1], want_h, atol=1e-10, rtol=0)
            torch.testing.assert_close(c[:, b : b + 1], want_c, atol=1e-10, rtol=0)


@pytest.mark.parametrize("batch_first,bidirectional", LAYOUTS)
def test_plain_layouts_match_nn_lstm_on_packed_sequences(batch_first, bidirectional):
    model = layout_model(False, batch_first, bidirectional, layers=3)
    reference = nn_lstm_with_weights_of(model, ih_share=0.25)
    lengths = torch.tensor([1, 9, 5, 9])
    x = torch.randn(4, 9, 5) if batch_first else torch.randn(9, 4, 5)
    D = 2 if bidirectional else 1
    state = tuple(torch.randn(2, 3 * D, 4, 8).unbind(0))
    with torch.no_grad():
        want_y, (want_h, want_c) = run_packed(reference, x, state, lengths)
        want_full = reference(x, state)
        for module in (model, script(model)):
            y, (h, c) = module(x, state, lengths)
            for got, want in zip((y, h, c), (want_y, want_h, want_c), strict=True):
                torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
            y, (h, c) = module(x, state)  # no lengths: every sequence is full
            for got, want in zip((y, h, c), (want_full[0], *want_full[1]), strict=True):
                torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


def test_lengths_all_full_equals_no_lengths():
    model = layout_model(True, False, True)
    x = torch.randn(6, 2, 5)
    with torch.no_grad():
        plain = model(x)
        full = model(x, None, torch.tensor([6, 6]))
    for got, want in zip((plain[0], *plain[1]), (full[0], *full[1]), strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_reverse_keys_sit_beside_the_forward_ones():
    uni = set(LSTM(5, 8, 2, True).state_dict())
    bi = set(LSTM(5, 8, 2, True, bidirectional=True).state_dict())
    assert uni < bi  # the forward keys stay exactly as they are
    assert bi - uni == {"reverse_" + key for key in uni}
    assert LSTM(5, 8, 2, bidirectional=True).reverse_cells[1].input_lin.in_features == 16


LAYOUT_BAD_INPUTS = [
    (
        "lengths dtype",
        dict(lengths=torch.tensor([3, 2], dtype=torch.int32)),
        "lengths must be an int64 tensor, got int32",
    ),
    (
        "lengths float",
        dict(lengths=torch.tensor([3.0, 2.0])),
        "lengths must be an int64 tensor, got float32",
    ),
    (
        "lengths shape",
        dict(lengths=torch.tensor([3, 2, 1])),
        "lengths must have shape [batch=2], got [3]",
    ),
    (
        "lengths rank",
        dict(lengths=torch.tensor([[3, 2]])),
        "lengths must have shape [batch=2], got [1, 2]",
    ),
    ("length zero", dict(lengths=torch.tensor([3, 0])), "lengths must each be in 1..seq=4, got 0"),
    (
        "length past seq",
        dict(lengths=torch.tensor([5, 2])),
        "lengths must each be in 1..seq=4, got 5",
    ),
    (
        "bidirectional state",
        dict(state=(torch.zeros(2, 2, 8), torch.zeros(2, 2, 8))),
        "h0 must have shape [num_layers*2=4, batch=2, hidden_size=8], got [2, 2, 8]",
    ),
]


@pytest.mark.parametrize(
    "given,message", [b[1:] for b in LAYOUT_BAD_INPUTS], ids=[b[0] for b in LAYOUT_BAD_INPUTS]
)
def test_bad_lengths_and_states_name_expected_and_received(given, message):
    model = layout_model(False, False, True)
    x = torch.randn(4, 2, 5)
    args = (x, given.get("state"), given.get("lengths"))
    with pytest.raises(ValueError) as eager_error:
        model(*args)
    assert message in str(eager_error.value)
    with pytest.raises(torch.jit.Error) as scripted_error:
        script(model)(*args)
    assert message in str(scripted_error.value)


def test_batch_first_x_is_described_batch_first():
    model = layout_model(False, True, False)
    with pytest.raises(ValueError, match=r"x must have shape \[batch>=1, seq>=1, input_size=5\]"):
        model(torch.randn(2, 4, 6))
    x = torch.randn(3, 4, 5)  # batch 3: a state for batch 4 (the time-major reading) is refused
    with pytest.raises(ValueError, match=r"batch=3"):
        model(x, (torch.zeros(2, 4, 8), torch.zeros(2, 4, 8)))


@pytest.mark.parametrize(
    "given", [[4, 2], (4, 2), np.array([4, 2])], ids=["list", "tuple", "ndarray"]
)
def test_eager_lengths_that_are_not_a_tensor_are_named(given):
    model = layout_model(False, False, False)
    with pytest.raises(
        ValueError, match=r"lengths must be an int64 tensor, got (list|tuple|ndarray)$"
    ):
        model(torch.randn(4, 2, 5), None, given)
