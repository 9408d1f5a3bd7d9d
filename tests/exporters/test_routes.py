"""The deployed TorchScript routes: same parameters and signature, same numbers as the reference."""

from __future__ import annotations

import pytest
import torch

from helpers import nn_lstm_with_weights_of, small_model
from lstm_export.exporters.routes import (
    AtenLSTM,
    HoistedLayer,
    HoistedLSTM,
    KernelLSTM,
    deployable,
)
from lstm_export.exporters.torchscript import forward_signature, script
from lstm_export.model import LSTM, LayerStack


@pytest.mark.parametrize("ln,route", [(False, AtenLSTM), (True, HoistedLSTM)])
def test_route_keeps_state_dict_attributes_and_signature(ln, route):
    model = small_model(ln, 2)
    deployed = deployable(model)
    assert isinstance(deployed, route)
    assert deployed.state_dict().keys() == model.state_dict().keys()
    scripted, reference = script(deployed), script(model)
    assert forward_signature(scripted) == forward_signature(reference)
    assert (scripted.input_size, scripted.hidden_size, scripted.num_layers) == (5, 8, 2)
    assert scripted.layer_norm is ln


@pytest.mark.parametrize("ln", [False, True], ids=["plain", "layer_norm"])
@pytest.mark.parametrize("seq,batch", [(1, 1), (2, 4), (33, 3)])
def test_scripted_route_matches_the_eager_reference(ln, seq, batch):
    model = small_model(ln, 3)
    deployed = script(deployable(model))
    x = torch.randn(seq, batch, 5)
    state = tuple(torch.randn(2, 3, batch, 8).unbind(0))
    with torch.no_grad():
        for s in (None, state):
            want = model(x, s)
            got = deployed(x, s)
            torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)


def test_aten_route_matches_nn_lstm():
    model = small_model(False, 2)
    reference = nn_lstm_with_weights_of(model)
    with torch.no_grad():
        x = torch.randn(12, 2, 5)
        want = reference(x)
        got = script(deployable(model))(x)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("ln", [False, True], ids=["plain", "layer_norm"])
def test_route_refuses_bad_input_like_the_reference(ln):
    deployed = script(deployable(small_model(ln, 2)))
    with pytest.raises(torch.jit.Error, match=r"input_size=5\], got \[4, 2, 6\]"):
        deployed(torch.randn(4, 2, 6))
    with pytest.raises(torch.jit.Error, match=r"h0 must have shape"):
        deployed(torch.randn(4, 2, 5), (torch.zeros(2, 1, 8), torch.zeros(2, 1, 8)))


def test_the_layer_norm_routes_run_the_models_one_loop_over_layers():
    """Cell -> layer -> stack, once: the routes differ from the model only in their layers."""
    assert HoistedLSTM.forward is KernelLSTM.forward is LSTM.forward is LayerStack.forward
    deployed = deployable(small_model(True, 2))
    assert [type(layer) for layer in deployed.cells] == [HoistedLayer, HoistedLayer]


@pytest.mark.parametrize(
    "batch_first,bidirectional",
    [(False, True), (True, False), (True, True)],
    ids=["bidirectional", "batch_first", "batch_first-bidirectional"],
)
@pytest.mark.parametrize("ln", [False, True], ids=["plain", "layer_norm"])
def test_scripted_route_matches_the_reference_on_ragged_batches(ln, batch_first, bidirectional):
    """Every layout and ragged lengths (1 beside full): the routes against the eager model
    in float64, y zero past each length; the aten route runs the batch packed."""
    torch.manual_seed(0)
    model = LSTM(5, 8, 2, ln, batch_first, bidirectional).eval()
    deployed = script(deployable(model))
    assert deployed.state_dict().keys() == model.state_dict().keys()
    assert (deployed.batch_first, deployed.bidirectional) == (batch_first, bidirectional)
    reference = LSTM(5, 8, 2, ln, batch_first, bidirectional).double().eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 11, 5) if batch_first else torch.randn(11, 4, 5)
    layers = 4 if bidirectional else 2
    state = tuple(torch.randn(2, layers, 4, 8).unbind(0))
    lengths = torch.tensor([11, 1, 6, 11])
    with torch.no_grad():
        for s in (None, state):
            for given in (None, lengths):
                got_y, got_state = deployed(x, s, given)
                double = None if s is None else (s[0].double(), s[1].double())
                want_y, want_state = reference(x.double(), double, given)
                torch.testing.assert_close(got_y.double(), want_y, atol=1e-5, rtol=0)
                for got, want in zip(got_state, want_state, strict=True):
                    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    with pytest.raises(torch.jit.Error, match=r"lengths must each be in 1..seq=11, got 12"):
        deployed(x, None, torch.tensor([12, 1, 1, 1]))
