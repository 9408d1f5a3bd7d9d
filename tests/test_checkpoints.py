"""Checkpoints: safe loading, key layouts, nn.LSTM interop, and checkpoint -> export parity.

The parity references here are independent of the export: `torch.nn.LSTM` itself for an
nn.LSTM checkpoint, and the eager `lstm_export.LSTM` that was saved for a scratch one.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from helpers import not_regular_files, run_cli, run_packed
from lstm_export import LSTM, UsageError
from lstm_export.checkpoint_file import read_state_dict
from lstm_export.checkpoints import (
    MAX_ABS_WEIGHT,
    expected_shapes,
    from_nn_lstm_state_dict,
    infer_config,
    load_checkpoint,
    model_from_state_dict,
    read_checkpoint,
)
from lstm_export.cli import app
from lstm_export.config import LSTMConfig, SizeLimits
from lstm_export.nn_lstm import nn_lstm_shapes, to_nn_lstm_state_dict

ATOL = 1e-5
ONE = torch.zeros(1)  # one tensor under many keys: a quick torch.save of a huge state dict

# torch.jit.load warns that TorchScript is deprecated; that is torch's business, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:DeprecationWarning")


def _seeded_lstm(seed: int, *args, **kwargs) -> LSTM:
    """A scratch LSTM with every parameter (LayerNorm too) drawn at random from `seed`."""
    torch.manual_seed(seed)
    model = LSTM(*args, **kwargs)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".layer_norm" in name and name.endswith("weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.uniform_(-0.5, 0.5)
    return model.eval()


def _seeded_nn_lstm(seed: int, *args, **kwargs) -> nn.LSTM:
    torch.manual_seed(seed)
    return nn.LSTM(*args, **kwargs).eval()


def _inputs(seq: int, batch: int, input_size: int, layers: int, hidden: int, seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(seq, batch, input_size, generator=gen)
    h0 = 0.5 * torch.randn(layers, batch, hidden, generator=gen)
    c0 = torch.randn(layers, batch, hidden, generator=gen)
    return x, h0, c0


def _run(module: nn.Module, x, h0=None, c0=None):
    with torch.no_grad():
        y, (h, c) = module(x) if h0 is None else module(x, (h0, c0))
    return y, h, c


def _assert_close(got, expected, atol: float = ATOL) -> None:
    for name, g, e in zip(("y", "h", "c"), got, expected, strict=True):
        g = g.detach().numpy() if isinstance(g, torch.Tensor) else g
        e = e.detach().numpy() if isinstance(e, torch.Tensor) else e
        assert g.shape == e.shape, f"{name}: shape {g.shape} != {e.shape}"
        err = float(np.max(np.abs(g - e)))
        assert err <= atol, f"{name}: max abs error {err:.3g} > {atol}"


def _export(*args: str) -> None:
    result = CliRunner().invoke(app, ["export", *args])
    assert result.exit_code == 0, (result.output, result.exception)


def _run_exported(folder: Path, x, h0, c0):
    """(onnxruntime outputs, torch.jit.load outputs) of an export folder."""
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"x": x.numpy(), "h0": h0.numpy(), "c0": c0.numpy()}
    onnx_out = session.run(["y", "hn", "cn"], feeds)
    scripted = torch.jit.load(str(folder / "model.pt"), map_location="cpu")
    return onnx_out, _run(scripted, x, h0, c0)


# --------------------------------------------------------------------------- key layout


def test_state_dict_keys_and_shapes_are_exactly_the_documented_ones():
    inp, hid = 5, 6
    plain = LSTM(inp, hid, num_layers=2, layer_norm=False).state_dict()
    expected = {}
    for k, n_in in enumerate((inp, hid)):
        expected[f"cells.{k}.input_lin.weight"] = [4 * hid, n_in]
        expected[f"cells.{k}.hidden_lin.weight"] = [4 * hid, hid]
        expected[f"cells.{k}.hidden_lin.bias"] = [4 * hid]
    assert {k: list(v.shape) for k, v in plain.items()} == expected

    normed = LSTM(inp, hid, num_layers=2, layer_norm=True).state_dict()
    for k in range(2):
        for part in ("weight", "bias"):
            for gate in range(4):
                expected[f"cells.{k}.layer_norm.{gate}.{part}"] = [hid]
            expected[f"cells.{k}.layer_norm_c.{part}"] = [hid]
    assert {k: list(v.shape) for k, v in normed.items()} == expected


# --------------------------------------------------------------------------- own layout


@pytest.mark.parametrize("layer_norm", [False, True])
def test_own_checkpoint_round_trips_with_sizes_inferred(tmp_path, layer_norm):
    model = _seeded_lstm(1, 5, 6, num_layers=2, layer_norm=layer_norm)
    path = tmp_path / "ck.pt"
    torch.save(model.state_dict(), path)

    loaded = load_checkpoint(path)

    assert (loaded.input_size, loaded.hidden_size, loaded.num_layers) == (5, 6, 2)
    assert loaded.layer_norm is layer_norm
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x, h0, c0 = _inputs(9, 2, 5, 2, 6)
    _assert_close(_run(loaded, x, h0, c0), _run(model, x, h0, c0), atol=0)


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: {"state_dict": sd}, id="state_dict"),
        pytest.param(lambda sd: {"model_state_dict": sd, "epoch": 3, "lr": 0.1}, id="with-extras"),
        pytest.param(lambda sd: {"model": sd}, id="model"),
        pytest.param(lambda sd: {f"module.{k}": v for k, v in sd.items()}, id="module-prefix"),
        pytest.param(lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()}, id="compile-prefix"),
        pytest.param(
            lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "step": 10},
            id="wrapped-and-prefixed",
        ),
    ],
)
def test_wrapped_and_prefixed_checkpoints_load(tmp_path, wrap):
    model = _seeded_lstm(2, 4, 8, num_layers=1, layer_norm=True)
    path = tmp_path / "ck.pt"
    torch.save(wrap(model.state_dict()), path)

    loaded = load_checkpoint(path)

    assert set(loaded.state_dict()) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_float64_checkpoint_is_loaded_as_float32(tmp_path):
    model = _seeded_lstm(3, 4, 8, num_layers=1).double()
    path = tmp_path / "ck.pt"
    torch.save(model.state_dict(), path)

    loaded = load_checkpoint(path)

    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x, h0, c0 = _inputs(6, 2, 4, 1, 8)
    expected = _run(model, x.double(), h0.double(), c0.double())
    _assert_close(_run(loaded, x, h0, c0), [t.float() for t in expected])


# --------------------------------------------------------------------------- misfits


def test_mismatch_lists_missing_unexpected_and_wrongly_shaped_keys(tmp_path):
    state = _seeded_lstm(4, 4, 8, num_layers=1).state_dict()
    del state["cells.0.hidden_lin.bias"]
    state["cells.0.extra.weight"] = torch.zeros(3)
    state["cells.0.hidden_lin.weight"] = torch.zeros(32, 7)
    path = tmp_path / "ck.pt"
    torch.save(state, path)

    with pytest.raises(UsageError) as info:
        load_checkpoint(path, LSTMConfig(4, 8, 1, False))

    message = str(info.value)
    assert "missing: cells.0.hidden_lin.bias" in message
    assert "unexpected: cells.0.extra.weight" in message
    assert "wrongly shaped: cells.0.hidden_lin.weight (expected [32, 8], got [32, 7])" in message
    assert "\n" not in message


@pytest.mark.parametrize("saved_with_norms", [False, True])
def test_a_layer_norm_misfit_names_the_first_keys_counts_the_rest_and_says_why(
    tmp_path, saved_with_norms
):
    path = tmp_path / "ck.pt"
    torch.save(_seeded_lstm(5, 4, 8, num_layers=1, layer_norm=saved_with_norms).state_dict(), path)

    with pytest.raises(UsageError) as info:
        load_checkpoint(path, LSTMConfig(4, 8, 1, not saved_with_norms))

    keys = ", ".join(f"cells.0.layer_norm.{n // 2}.{('bias', 'weight')[n % 2]}" for n in range(5))
    label = "unexpected" if saved_with_norms else "missing"
    has = "has" if saved_with_norms else "has no"
    assert str(info.value).endswith(
        f"{label}: {keys} and 5 more; "
        f"the state dict {has} LayerNorm weights (a layer_norm={saved_with_norms} model?)"
    )


def test_integer_tensors_are_refused(tmp_path):
    state = _seeded_lstm(6, 4, 8, num_layers=1).state_dict()
    state["cells.0.hidden_lin.bias"] = torch.zeros(32, dtype=torch.int64)
    path = tmp_path / "ck.pt"
    torch.save(state, path)

    with pytest.raises(UsageError, match=r"cells\.0\.hidden_lin\.bias"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(torch.zeros(3), "state dict", id="a-tensor"),
        pytest.param([torch.zeros(3)], "state dict", id="a-list"),
        pytest.param({}, "state dict", id="empty"),
        pytest.param({"epoch": 3, "name": "x"}, "state dict", id="no-tensors"),
    ],
)
def test_files_that_hold_no_state_dict_are_refused(tmp_path, payload, expected):
    path = tmp_path / "ck.pt"
    torch.save(payload, path)
    with pytest.raises(UsageError, match=expected):
        read_state_dict(path)


def test_missing_garbage_and_directory_checkpoints_are_refused(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch.save file")
    for path in (tmp_path / "missing.pt", garbage, tmp_path):
        with pytest.raises(UsageError, match="checkpoint"):
            read_state_dict(path)


def test_infer_config_needs_the_first_input_weight():
    with pytest.raises(UsageError, match=r"cells\.0\.input_lin\.weight"):
        infer_config({"cells.0.hidden_lin.weight": torch.zeros(32, 8)})
    with pytest.raises(UsageError, match="cannot infer"):
        infer_config({"cells.0.input_lin.weight": torch.zeros(30, 4)})  # 30 is not 4*H


@pytest.mark.parametrize(
    ("stray", "shown"),
    [
        ("cells.1000000.input_lin.weight", "0, 1000000"),
        ("weight_hh_l999999", "0, 999999"),
        ("cells.2.hidden_lin.bias", "0, 2"),
    ],
)
def test_layer_indices_with_a_gap_are_refused_before_any_model_is_built(
    tmp_path, monkeypatch, stray, shown
):
    """One stray key once built a million-layer model before the keys were checked."""
    if stray.startswith("cells."):
        state = LSTM(4, 8, 1).state_dict()
    else:
        state = nn.LSTM(4, 8, 1).state_dict()
    state[stray] = torch.zeros(32, 8)
    torch.save(state, tmp_path / "stray.pt")
    built = []
    monkeypatch.setattr(LSTM, "__init__", lambda *a, **k: built.append(a))
    with pytest.raises(UsageError) as error:
        load_checkpoint(tmp_path / "stray.pt")
    assert built == []
    message = str(error.value)
    assert "layer indices must run 0.." in message and f"got {shown}" in message, message
    assert len(message) < 300


# --------------------------------------------------------------------------- safety


class _Payload:
    """Unpickling this runs `open(marker, "w")`: it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_malicious(path: Path, marker: Path, fmt: str) -> None:
    data = {"cells.0.input_lin.weight": torch.zeros(32, 4), "evil": _Payload(marker)}
    if fmt == "zip":
        torch.save(data, path)
    else:  # a bare pickle, as torch.save(_use_new_zipfile_serialization=False) or pickle.dump
        with open(path, "wb") as handle:
            pickle.dump(data, handle)


def test_the_malicious_payload_is_live_when_unpickled_unsafely(tmp_path):
    """Sanity check for the tests below: the payload really does create its marker."""
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    _write_malicious(path, marker, "raw")
    with open(path, "rb") as handle:
        loaded = pickle.load(handle)
    loaded["evil"].close()
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["zip", "raw"])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, fmt):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    _write_malicious(path, marker, fmt)

    with pytest.raises(UsageError, match="checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["zip", "raw"])
def test_cli_refuses_malicious_pickle_with_one_line_and_exit_2(tmp_path, fmt):
    marker = tmp_path / "marker"
    _write_malicious(tmp_path / "evil.pt", marker, fmt)

    proc = run_cli("export", "--checkpoint", "evil.pt", cwd=tmp_path, timeout=300)

    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "models").exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "evil.pt" in lines[0] and "model.state_dict()" in lines[0]
    _assert_no_advice_to_unpickle(lines[0])
    assert "\x1b" not in proc.stderr  # no raw terminal escapes in a piped error line


def _assert_no_advice_to_unpickle(message: str) -> None:
    """torch's own error advises loading the file as code anyway; ours must never repeat that."""
    for advice in ("weights_only", "safe_globals", "trust"):
        assert advice not in message, message


class _Shell:
    """Unpickling this would run a shell command (it is never unpickled in these tests)."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_malicious_checkpoint_message_names_file_and_global_and_advises_state_dict(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"cells.0.input_lin.weight": torch.zeros(32, 4), "evil": _Shell()}, path)

    with pytest.raises(UsageError) as error:
        read_state_dict(path)

    message = str(error.value)
    assert str(path) in message
    assert "not a plain state dict" in message
    assert f"pickled object ({os.system.__module__}.system)" in message  # posix.system
    assert "save model.state_dict() instead" in message
    _assert_no_advice_to_unpickle(message)


@pytest.mark.parametrize(
    ("make", "global_name"),
    [
        pytest.param(lambda: LSTM(4, 8, 1), "lstm_export.model.LSTM", id="scratch-lstm"),
        pytest.param(lambda: nn.LSTM(4, 8), "torch.nn.modules.rnn.LSTM", id="nn-lstm"),
    ],
)
def test_a_whole_saved_module_is_refused_with_save_the_state_dict_instead(
    tmp_path, make, global_name
):
    path = tmp_path / "whole.pt"
    torch.save(make(), path)

    with pytest.raises(UsageError) as error:
        read_state_dict(path)

    message = str(error.value)
    assert str(path) in message
    assert f"whole pickled model ({global_name})" in message
    assert "save model.state_dict() instead" in message
    _assert_no_advice_to_unpickle(message)


@pytest.mark.parametrize(
    ("content", "what"),
    [
        pytest.param(b"epoch,loss\n1,0.5\n", "neither a zip archive nor a pickle", id="text"),
        pytest.param(b"", "it is empty", id="empty"),
    ],
)
def test_a_file_that_is_not_a_torch_save_file_gets_a_clear_line(tmp_path, content, what):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)

    with pytest.raises(UsageError) as error:
        read_state_dict(path)

    assert str(error.value) == (
        f"checkpoint {path} is not a torch.save file ({what}); "
        "save one with torch.save(model.state_dict(), path)"
    )


def test_a_bare_pickle_is_refused_without_torch_advice(tmp_path):
    marker = tmp_path / "marker"
    _write_malicious(tmp_path / "evil.pt", marker, "raw")

    with pytest.raises(UsageError) as error:
        read_state_dict(tmp_path / "evil.pt")

    message = str(error.value)
    assert "not a plain state dict" in message and "model.state_dict()" in message
    _assert_no_advice_to_unpickle(message)
    assert not marker.exists()


# --------------------------------------------------------------------------- nn.LSTM interop


def test_nn_lstm_state_dict_is_recognized_and_matches_nn_lstm(tmp_path):
    reference = _seeded_nn_lstm(8, 5, 6, num_layers=2)
    path = tmp_path / "nn.pt"
    torch.save(reference.state_dict(), path)

    state, config = read_checkpoint(path)
    model = load_checkpoint(path)

    assert config == LSTMConfig(5, 6, 2, False)
    ref_state = reference.state_dict()
    for k in range(2):
        # Same gate order (i, f, g, o): weights copied as they are, the two biases summed.
        assert torch.equal(state[f"cells.{k}.input_lin.weight"], ref_state[f"weight_ih_l{k}"])
        assert torch.equal(state[f"cells.{k}.hidden_lin.weight"], ref_state[f"weight_hh_l{k}"])
        summed = ref_state[f"bias_ih_l{k}"] + ref_state[f"bias_hh_l{k}"]
        torch.testing.assert_close(state[f"cells.{k}.hidden_lin.bias"], summed)
    x, h0, c0 = _inputs(11, 3, 5, 2, 6)
    _assert_close(_run(model, x, h0, c0), _run(reference, x, h0, c0))
    _assert_close(_run(model, x), _run(reference, x))


def test_nn_lstm_without_bias_loads_with_zero_bias(tmp_path):
    reference = _seeded_nn_lstm(9, 4, 8, num_layers=1, bias=False)
    path = tmp_path / "nn.pt"
    torch.save(reference.state_dict(), path)

    model = load_checkpoint(path)

    assert torch.count_nonzero(model.cells[0].hidden_lin.bias) == 0
    x, h0, c0 = _inputs(7, 2, 4, 1, 8)
    _assert_close(_run(model, x, h0, c0), _run(reference, x, h0, c0))


def test_projected_nn_lstm_is_refused(tmp_path):
    path = tmp_path / "nn.pt"
    torch.save(_seeded_nn_lstm(10, 4, 8, proj_size=3).state_dict(), path)
    with pytest.raises(UsageError, match=r"only nn\.LSTM with proj_size=0 is supported"):
        load_checkpoint(path)


def test_bidirectional_nn_lstm_maps_reverse_keys_to_reverse_cells_and_matches(tmp_path):
    reference = _seeded_nn_lstm(10, 5, 6, num_layers=2, bidirectional=True)
    path = tmp_path / "bi.pt"
    torch.save(reference.state_dict(), path)

    state, config = read_checkpoint(path)
    model = load_checkpoint(path)

    assert config == LSTMConfig(5, 6, 2, False, bidirectional=True)  # the keys say so
    theirs = reference.state_dict()
    for k in range(2):
        mine = f"reverse_cells.{k}."
        assert torch.equal(state[mine + "input_lin.weight"], theirs[f"weight_ih_l{k}_reverse"])
        assert torch.equal(state[mine + "hidden_lin.weight"], theirs[f"weight_hh_l{k}_reverse"])
        summed = theirs[f"bias_ih_l{k}_reverse"] + theirs[f"bias_hh_l{k}_reverse"]
        torch.testing.assert_close(state[mine + "hidden_lin.bias"], summed)
        assert torch.equal(state[f"cells.{k}.input_lin.weight"], theirs[f"weight_ih_l{k}"])
    x, h0, c0 = _inputs(9, 3, 5, 4, 6)
    _assert_close(_run(model, x, h0, c0), _run(reference, x, h0, c0))
    lengths = torch.tensor([9, 1, 5])
    with torch.no_grad():
        got = model(x, (h0, c0), lengths)
        expected = run_packed(reference, x, (h0, c0), lengths)
    _assert_close((got[0], *got[1]), (expected[0], *expected[1]))


def test_our_own_bidirectional_state_dict_is_read_as_bidirectional(tmp_path):
    model = _seeded_lstm(10, 5, 6, num_layers=2, layer_norm=True, bidirectional=True)
    path = tmp_path / "ours.pt"
    torch.save(model.state_dict(), path)

    _state, config = read_checkpoint(path)

    assert config == LSTMConfig(5, 6, 2, True, bidirectional=True)
    assert config.parameter_count() == sum(p.numel() for p in model.parameters())
    loaded = load_checkpoint(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def _half(state: dict, *dropped: str) -> dict:
    return {k: v for k, v in state.items() if k not in dropped}


@pytest.mark.parametrize(
    ("make", "missing"),
    [
        pytest.param(
            lambda: _half(
                nn.LSTM(4, 8, 2, bidirectional=True).state_dict(),
                "weight_hh_l1_reverse",
                "bias_ih_l0_reverse",
            ),
            "missing: bias_ih_l0_reverse, weight_hh_l1_reverse",
            id="nn.LSTM-reverse-keys-missing",
        ),
        pytest.param(
            lambda: _half(nn.LSTM(4, 8, 2, bidirectional=True).state_dict(), "weight_ih_l0"),
            "missing: weight_ih_l0",
            id="nn.LSTM-forward-key-missing",
        ),
        pytest.param(
            lambda: {
                **nn.LSTM(4, 8, 2).state_dict(),
                "weight_ih_l0_reverse": torch.zeros(32, 4),
            },
            "missing: bias_hh_l0_reverse, bias_hh_l1_reverse, bias_ih_l0_reverse, "
            "bias_ih_l1_reverse, weight_hh_l0_reverse and 2 more",
            id="nn.LSTM-one-reverse-key",
        ),
        pytest.param(
            lambda: _half(
                LSTM(4, 8, 2, bidirectional=True).state_dict(), "reverse_cells.1.hidden_lin.bias"
            ),
            "missing: reverse_cells.1.hidden_lin.bias",
            id="ours",
        ),
        pytest.param(
            lambda: {**LSTM(4, 8, 1).state_dict(), "reverse_cells.0.\x1b[31m": torch.zeros(1)},
            "missing: cells.0.\\x1b[31m, reverse_cells.0.hidden_lin.bias, ",
            id="ours-escaped",
        ),
    ],
)
def test_a_half_bidirectional_state_dict_is_refused_naming_the_missing_keys(
    tmp_path, make, missing
):
    path = _saved(tmp_path, make())
    with pytest.raises(UsageError) as error:
        read_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"checkpoint {path} is bidirectional (it has reverse-direction ")
    assert missing in message, message
    assert "\x1b" not in message


def test_cli_refuses_a_half_bidirectional_nn_lstm_in_one_line(tmp_path, call_main):
    state = _half(nn.LSTM(4, 8, bidirectional=True).state_dict(), "weight_hh_l0_reverse")
    out = tmp_path / "out"

    code, _, err = call_main("export", "--checkpoint", _saved(tmp_path, state), "--out", out)

    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "is bidirectional" in lines[0] and "missing: weight_hh_l0_reverse" in lines[0]
    assert not out.exists()


def test_a_bidirectional_layer_reads_both_directions_outputs(tmp_path):
    """Layer 1 of a bidirectional nn.LSTM takes 2 * hidden_size inputs, not hidden_size."""
    state = dict(nn.LSTM(4, 8, 2, bidirectional=True).state_dict())
    for key in ("weight_ih_l1", "weight_ih_l1_reverse"):
        state[key] = torch.zeros(32, 8)
    with pytest.raises(UsageError) as error:
        read_checkpoint(_saved(tmp_path, state))
    assert str(error.value).endswith(
        "does not fit nn.LSTM(input_size=4, hidden_size=8, num_layers=2, bidirectional=True): "
        "wrongly shaped: weight_ih_l1 (expected [32, 16], got [32, 8]), "
        "weight_ih_l1_reverse (expected [32, 16], got [32, 8])"
    )


def test_size_limits_count_both_directions(tmp_path):
    one_way = LSTMConfig(4, 8, 1, False).parameter_count()
    path = _saved(tmp_path, nn.LSTM(4, 8, bidirectional=True).state_dict())
    with pytest.raises(UsageError, match=rf"has {2 * one_way:,} parameters"):
        read_checkpoint(path, SizeLimits(max_parameters=2 * one_way - 1))
    assert read_checkpoint(path, SizeLimits(max_parameters=2 * one_way))[1].bidirectional


def test_a_model_config_that_disagrees_on_direction_says_which_weights_are_there(tmp_path):
    path = _saved(tmp_path, LSTM(4, 8, 1).state_dict())
    with pytest.raises(UsageError) as error:
        load_checkpoint(path, LSTMConfig(4, 8, 1, False, bidirectional=True))
    assert str(error.value).endswith(
        "the state dict has no reverse-direction weights (a bidirectional=False model?)"
    )


def test_nn_lstm_keys_mixed_with_foreign_keys_are_refused():
    state = dict(_seeded_nn_lstm(11, 4, 8).state_dict())
    state["fc.weight"] = torch.zeros(2, 8)
    with pytest.raises(UsageError, match=r"fc\.weight"):
        from_nn_lstm_state_dict(state)


def test_to_nn_lstm_state_dict_loads_into_nn_lstm_and_matches():
    model = _seeded_lstm(12, 5, 6, num_layers=2, layer_norm=False)
    state = to_nn_lstm_state_dict(model)

    reference = nn.LSTM(5, 6, num_layers=2)
    reference.load_state_dict(state, strict=True)  # exactly nn.LSTM's keys and shapes

    x, h0, c0 = _inputs(10, 2, 5, 2, 6)
    _assert_close(_run(reference.eval(), x, h0, c0), _run(model, x, h0, c0))
    # ... and back again: the same weights.
    back = from_nn_lstm_state_dict(reference.state_dict())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=0)


def test_to_nn_lstm_state_dict_writes_reverse_keys_for_a_bidirectional_model():
    model = _seeded_lstm(12, 5, 6, num_layers=2, layer_norm=False, bidirectional=True)
    state = to_nn_lstm_state_dict(model)

    reference = nn.LSTM(5, 6, num_layers=2, bidirectional=True)
    reference.load_state_dict(state, strict=True)  # exactly nn.LSTM's keys and shapes

    x, h0, c0 = _inputs(10, 2, 5, 4, 6)
    _assert_close(_run(reference.eval(), x, h0, c0), _run(model, x, h0, c0))
    back = from_nn_lstm_state_dict(reference.state_dict())
    assert set(back) == set(model.state_dict())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=0)


def test_to_nn_lstm_state_dict_refuses_layer_norm():
    with pytest.raises(UsageError, match="layer_norm"):
        to_nn_lstm_state_dict(_seeded_lstm(13, 4, 8, num_layers=1, layer_norm=True))


# --------------------------------------------------------------------------- checkpoint -> export


def test_exported_nn_lstm_checkpoint_matches_torch_nn_lstm(tmp_path):
    reference = _seeded_nn_lstm(14, 6, 10, num_layers=2)
    # Wrapped and DataParallel-prefixed, as a training script might have saved it.
    wrapped = {
        "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()},
        "epoch": 5,
    }
    checkpoint = tmp_path / "lstm.pt"
    torch.save(wrapped, checkpoint)
    out = tmp_path / "exported"

    result = CliRunner().invoke(
        app, ["export", "--checkpoint", str(checkpoint), "--out", str(out), "--name", "nnlstm"]
    )

    assert result.exit_code == 0, (result.output, result.exception)
    # The state dict cannot say how nn.LSTM was fed: the export says what it takes, once.
    note = (
        "note: nn.LSTM checkpoints do not record batch_first; this export takes time-major x "
        "[seq, batch, input] (pass --batch-first for [batch, seq, input])"
    )
    assert result.stderr.splitlines().count(note) == 1, result.stderr
    assert note not in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"] == LSTMConfig(6, 10, 2, False).to_dict()
    assert manifest["name"] == "nnlstm"
    for seq, batch in ((1, 1), (13, 3)):
        x, h0, c0 = _inputs(seq, batch, 6, 2, 10, seed=seq)
        expected = _run(reference, x, h0, c0)
        onnx_out, ts_out = _run_exported(out, x, h0, c0)
        _assert_close(onnx_out, expected)
        _assert_close(ts_out, expected)


@pytest.mark.parametrize("layer_norm", [True, False])
def test_exported_scratch_checkpoint_matches_the_saved_eager_model(tmp_path, layer_norm):
    model = _seeded_lstm(15, 5, 8, num_layers=2, layer_norm=layer_norm)
    checkpoint = tmp_path / "scratch.pt"
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / "exported"

    _export("--checkpoint", str(checkpoint), "--out", str(out))

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"] == LSTMConfig(5, 8, 2, layer_norm).to_dict()
    x, h0, c0 = _inputs(17, 2, 5, 2, 8)
    expected = _run(model, x, h0, c0)
    onnx_out, ts_out = _run_exported(out, x, h0, c0)
    _assert_close(onnx_out, expected)
    _assert_close(ts_out, expected)


@pytest.fixture(scope="module")
def bidirectional_batch_first_export(tmp_path_factory) -> tuple[nn.LSTM, Path, str]:
    """The issue's case: an nn.LSTM(batch_first=True, bidirectional=True) checkpoint, with
    weights of a trained model's magnitude, exported with --batch-first: (the nn.LSTM, the
    export folder, what the export printed on stderr)."""
    reference = _seeded_nn_lstm(21, 5, 8, num_layers=2, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for param in reference.parameters():
            param.mul_(3.0)  # uniform(-0.35, 0.35) at init; trained weights are O(1)
    folder = tmp_path_factory.mktemp("bi-batch-first")
    torch.save(reference.state_dict(), folder / "encoder.pt")
    out = folder / "exported"
    args = [
        "export",
        "--checkpoint",
        str(folder / "encoder.pt"),
        "--batch-first",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    return reference, out, result.stderr


def test_a_batch_first_export_of_an_nn_lstm_checkpoint_says_so_once(
    bidirectional_batch_first_export,
):
    _reference, out, stderr = bidirectional_batch_first_export
    notes = [line for line in stderr.splitlines() if "do not record batch_first" in line]
    assert notes == [
        "note: nn.LSTM checkpoints do not record batch_first; this export takes batch-first x "
        "[batch, seq, input] (as --batch-first asks; --no-batch-first for time-major "
        "[seq, batch, input])"
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"] == LSTMConfig(5, 8, 2, False, True, True).to_dict()


@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
def test_a_bidirectional_batch_first_nn_lstm_export_gives_its_numbers(
    bidirectional_batch_first_export, ragged
):
    """model.pt and model.onnx against nn.LSTM itself on batch-first x, through
    pack_padded_sequence when the batch is ragged (one sequence of length 1)."""
    reference, out, _stderr = bidirectional_batch_first_export
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 5, generator=gen)  # [batch, seq, input]
    h0, c0 = (0.5 * torch.randn(4, 3, 8, generator=gen) for _ in range(2))
    lengths = torch.tensor([7, 1, 4]) if ragged else None
    with torch.no_grad():
        if ragged:
            y, (h, c) = run_packed(reference, x, (h0, c0), lengths)
        else:
            y, (h, c) = reference(x, (h0, c0))
    expected = (y, h, c)
    scripted = torch.jit.load(str(out / "model.pt"), map_location="cpu")
    with torch.no_grad():
        y_ts, (h_ts, c_ts) = scripted(x, (h0, c0), lengths)
    _assert_close((y_ts, h_ts, c_ts), expected)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"x": x.numpy(), "h0": h0.numpy(), "c0": c0.numpy()}
    if ragged:
        feeds["lengths"] = lengths.numpy()
    _assert_close(session.run(["y", "hn", "cn"], feeds), expected)


@pytest.mark.parametrize(
    ("make", "args", "expected"),
    [
        pytest.param(
            lambda: nn.LSTM(4, 8).state_dict(),
            ["--bidirectional"],
            "--bidirectional asks for a bidirectional model, but checkpoint {path} is "
            "unidirectional (it has no reverse-direction weights, and its keys decide); "
            "drop --bidirectional",
            id="flag-vs-unidirectional",
        ),
        pytest.param(
            lambda: nn.LSTM(4, 8, bidirectional=True).state_dict(),
            ["--no-bidirectional"],
            "--no-bidirectional asks for a unidirectional model, but checkpoint {path} is "
            "bidirectional (it has reverse-direction weights, and its keys decide); "
            "drop --no-bidirectional",
            id="no-flag-vs-bidirectional",
        ),
        pytest.param(
            lambda: _tiny_state(),
            ["--config", "export.toml"],
            "[model] bidirectional = true asks for a bidirectional model, but checkpoint "
            "{path} is unidirectional",
            id="toml-vs-ours",
        ),
    ],
)
def test_a_stated_direction_the_checkpoint_contradicts_is_one_line(
    tmp_path, no_model, call_main, make, args, expected
):
    path = _saved(tmp_path, make())
    (tmp_path / "export.toml").write_text("[model]\nbidirectional = true\n", encoding="utf-8")
    out = tmp_path / "out"
    args = [tmp_path / a if a.endswith(".toml") else a for a in args]

    code, stdout, err = call_main("export", "--checkpoint", path, "--out", out, *args)

    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected.format(path=path) in lines[0]
    assert not out.exists() and stdout == ""


def test_cli_checkpoint_mismatch_is_one_line_exit_2_and_writes_nothing(tmp_path):
    torch.save(_seeded_lstm(16, 4, 8, num_layers=1).state_dict(), tmp_path / "ck.pt")

    args = ("--checkpoint", "ck.pt", "--hidden-size", "12", "--layer-norm", "--out", "out")
    proc = run_cli("export", *args, cwd=tmp_path, timeout=300)

    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "missing: cells.0.layer_norm.0.bias, cells.0.layer_norm.0.weight, " in lines[0]
    assert "wrongly shaped: cells.0.hidden_lin.bias (expected [48], got [32]), " in lines[0]
    assert lines[0].endswith("the state dict has no LayerNorm weights (a layer_norm=False model?)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


# --------------------------------------------------------------------------- sizes before work


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building any LSTM fails the test: each refusal below must come before that work."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("an LSTM was built before the checkpoint was refused")

    monkeypatch.setattr(LSTM, "__init__", refuse)


def _layers_of_tiny_tensors(layers: int, nn_layout: bool) -> dict[str, torch.Tensor]:
    """`layers` complete layers of a 1-in, 1-hidden LSTM (small tensors, a quick torch.save)."""
    weight, bias = torch.zeros(4, 1), torch.zeros(4)
    state = {}
    for k in range(layers):
        if nn_layout:
            state.update({f"weight_ih_l{k}": weight, f"weight_hh_l{k}": weight})
            state.update({f"bias_ih_l{k}": bias, f"bias_hh_l{k}": bias})
        else:
            state[f"cells.{k}.input_lin.weight"] = weight
            state[f"cells.{k}.hidden_lin.weight"] = weight
            state[f"cells.{k}.hidden_lin.bias"] = bias
    return state


@pytest.mark.parametrize("nn_layout", [False, True], ids=["ours", "nn.LSTM"])
def test_twenty_thousand_real_layers_are_refused_by_the_layer_limit_before_building(
    tmp_path, no_model, nn_layout
):
    """All 20,000 layers present (no gap): once 36 s and 1.16 GB, then an 8 MB error line."""
    path = tmp_path / "deep.pt"
    torch.save(_layers_of_tiny_tensors(20_000, nn_layout), path)

    with pytest.raises(UsageError) as error:
        load_checkpoint(path)

    assert str(error.value) == (
        f"checkpoint {path}: num_layers=20,000 is over the limit of 64 layers "
        "(--max-layers raises it)"
    )


def test_cli_refuses_twenty_thousand_layers_in_one_line(tmp_path, no_model, call_main):
    torch.save(_layers_of_tiny_tensors(20_000, False), tmp_path / "deep.pt")
    code, _, err = call_main(
        "export", "--checkpoint", tmp_path / "deep.pt", "--out", tmp_path / "o"
    )
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "num_layers=20,000 is over" in err, err
    assert len(err) < 300


def test_size_limits_apply_to_checkpoints_and_can_be_raised(tmp_path):
    path = tmp_path / "three.pt"
    torch.save(_seeded_lstm(17, 4, 8, num_layers=3).state_dict(), path)
    with pytest.raises(UsageError, match=r"num_layers=3 is over the limit of 2 layers"):
        load_checkpoint(path, limits=SizeLimits(max_layers=2))
    with pytest.raises(UsageError, match=r"has 1,\d{3} parameters .* over the limit of 100 "):
        read_checkpoint(path, SizeLimits(max_parameters=100))
    # A config given with the checkpoint is checked too (it decides what gets built).
    with pytest.raises(UsageError, match=r"hidden_size=9 is over the limit of 8"):
        load_checkpoint(path, LSTMConfig(4, 9, 3, False), limits=SizeLimits(max_size=8))
    assert load_checkpoint(path, limits=SizeLimits(max_layers=3)).num_layers == 3


def test_a_config_that_does_not_fit_is_refused_before_the_model_is_built(tmp_path, no_model):
    """A small checkpoint and `--hidden-size 4096` once built the big model to compare keys."""
    path = tmp_path / "small.pt"
    torch.save(_tiny_state(), path)
    with pytest.raises(UsageError, match=r"wrongly shaped: cells\.0\.hidden_lin\.bias"):
        load_checkpoint(path, LSTMConfig(1, 4096, 1, False))


def _tiny_state() -> dict[str, torch.Tensor]:
    return _layers_of_tiny_tensors(1, nn_layout=False)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["one-way", "bidirectional"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_expected_shapes_are_the_models_state_dict_without_building_it(layer_norm, bidirectional):
    config = LSTMConfig(5, 6, 3, layer_norm, bidirectional=bidirectional)
    model = LSTM.from_config(config)
    assert expected_shapes(config) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    reference = nn.LSTM(5, 6, num_layers=3, bidirectional=bidirectional)
    assert nn_lstm_shapes(LSTMConfig(5, 6, 3, False, bidirectional=bidirectional)) == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()
    }


def test_a_layer_index_of_five_thousand_digits_is_refused_in_one_line(tmp_path):
    """int() refuses over 4,300 digits: that was a ValueError traceback."""
    for stray in (f"cells.{'9' * 5000}.input_lin.weight", f"weight_hh_l{'9' * 5000}"):
        state = dict(nn.LSTM(4, 8).state_dict() if stray.startswith("w") else _tiny_state())
        state[stray] = torch.zeros(4, 1)
        with pytest.raises(
            UsageError, match=r"layer indices must run 0\.\.1 without gaps"
        ) as error:
            read_checkpoint(_saved(tmp_path, state))
        assert len(str(error.value)) < 200


def _saved(tmp_path: Path, state: dict, name: str = "ck.pt") -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


# --------------------------------------------------------------------------- bounded error lines


@pytest.mark.parametrize(
    ("make", "config", "expected"),
    [
        pytest.param(
            lambda: {
                **_tiny_state(),
                **dict.fromkeys((f"extra.{i:05}" for i in range(20_000)), ONE),
            },
            None,
            "unexpected: extra.00000, extra.00001, extra.00002, extra.00003, extra.00004 "
            "and 19,995 more",
            id="unexpected",
        ),
        pytest.param(
            lambda: _tiny_state(),
            LSTMConfig(1, 1, 64, True),
            "missing: cells.0.layer_norm.0.bias, cells.0.layer_norm.0.weight, "
            "cells.0.layer_norm.1.bias, cells.0.layer_norm.1.weight, "
            "cells.0.layer_norm.2.bias and 824 more",
            id="missing",
        ),
        pytest.param(
            lambda: _layers_of_tiny_tensors(64, nn_layout=False),
            LSTMConfig(1, 2, 64, False),
            "wrongly shaped: cells.0.hidden_lin.bias (expected [8], got [4]), "
            "cells.0.hidden_lin.weight (expected [8, 2], got [4, 1]), "
            "cells.0.input_lin.weight (expected [8, 1], got [4, 1]), "
            "cells.1.hidden_lin.bias (expected [8], got [4]), "
            "cells.1.hidden_lin.weight (expected [8, 2], got [4, 1]) and 187 more",
            id="wrongly-shaped",
        ),
        pytest.param(
            lambda: {
                **nn.LSTM(1, 1).state_dict(),
                **{f"fc.{i:05}": torch.zeros(1) for i in range(9)},
            },
            None,
            "unexpected keys for an nn.LSTM state dict: fc.00000, fc.00001, fc.00002, fc.00003, "
            "fc.00004 and 4 more",
            id="nn.LSTM-unexpected",
        ),
    ],
)
def test_error_lines_name_the_first_keys_and_count_the_rest(tmp_path, make, config, expected):
    """20,000 unexpected keys were a 260 KB error line."""
    path = _saved(tmp_path, make())
    with pytest.raises(UsageError) as error:
        load_checkpoint(path, config)
    message = str(error.value)
    assert expected in message, message
    assert len(message) < 600


def test_a_key_holding_terminal_escapes_is_shown_escaped(tmp_path):
    """A key from the file must not recolour the terminal of whoever prints the error."""
    evil = "cells.0.x\x1b[31mred\x1b]0;title\x07"
    for state in (
        {**_tiny_state(), evil: torch.zeros(1)},  # unexpected, in our layout
        {**nn.LSTM(1, 1).state_dict(), evil: torch.zeros(1)},  # in nn.LSTM's
        {evil: torch.zeros(1)},  # no layer 0 at all: the keys are listed
        {**_tiny_state(), evil: torch.zeros(1, dtype=torch.int8)},  # a dtype misfit
    ):
        with pytest.raises(UsageError) as error:
            load_checkpoint(_saved(tmp_path, state))
        message = str(error.value)
        assert "\x1b" not in message and "\x07" not in message, message
        assert r"cells.0.x\x1b[31mred\x1b]0;title\x07" in message, message


def test_a_very_long_key_is_cut_in_the_error_line(tmp_path):
    state = {**_tiny_state(), "k" * 1_000_000: torch.zeros(1)}
    with pytest.raises(UsageError) as error:
        load_checkpoint(_saved(tmp_path, state))
    assert "unexpected: kkkk" in str(error.value) and len(str(error.value)) < 300


# --------------------------------------------------------------------------- tensor kinds, dtypes


@pytest.mark.parametrize(
    ("make", "what"),
    [
        pytest.param(
            lambda: torch.empty(4, device="meta"),
            "a meta tensor (a shape without data)",
            id="meta",
        ),
        pytest.param(lambda: torch.zeros(4).to_sparse(), "a sparse tensor (sparse_coo)", id="coo"),
        pytest.param(
            lambda: torch.zeros(2, 2).to_sparse_csr(), "a sparse tensor (sparse_csr)", id="csr"
        ),
        pytest.param(
            lambda: torch.quantize_per_tensor(torch.zeros(4), 0.1, 0, torch.qint8),
            "a quantized tensor",
            id="quantized",
        ),
    ],
)
@pytest.mark.parametrize("nn_layout", [False, True], ids=["ours", "nn.LSTM"])
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_tensors_without_dense_data_are_refused_naming_the_key(tmp_path, make, what, nn_layout):
    """Were RuntimeError tracebacks from load_state_dict (or from summing nn.LSTM's biases)."""
    state = dict(nn.LSTM(1, 1).state_dict() if nn_layout else _tiny_state())
    key = "bias_ih_l0" if nn_layout else "cells.0.hidden_lin.bias"
    state[key] = make()
    path = _saved(tmp_path, state)
    with pytest.raises(UsageError) as error:
        load_checkpoint(path)
    assert str(error.value) == (
        f"checkpoint {path}: {key} is {what}; expected a dense tensor of numbers "
        "(save the model's own state_dict())"
    )
    with pytest.raises(UsageError, match=f"{key} is {re.escape(what)}"):  # also from Python
        model_from_state_dict(state, LSTMConfig(1, 1, 1, False))


def test_a_wrongly_shaped_nn_lstm_bias_is_refused_before_the_biases_are_summed():
    state = nn.LSTM(4, 8).state_dict()
    state["bias_ih_l0"] = torch.zeros(3)
    with pytest.raises(UsageError) as error:
        from_nn_lstm_state_dict(state, "checkpoint nn.pt")
    assert str(error.value) == (
        "checkpoint nn.pt does not fit nn.LSTM(input_size=4, hidden_size=8, num_layers=1): "
        "wrongly shaped: bias_ih_l0 (expected [32], got [3])"
    )


@pytest.mark.parametrize(
    "dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, torch.float8_e4m3fn]
)
@pytest.mark.parametrize("nn_layout", [False, True], ids=["ours", "nn.LSTM"])
def test_both_layouts_refuse_the_same_dtypes_with_the_same_words(tmp_path, dtype, nn_layout):
    """An int32 bias was accepted in an nn.LSTM checkpoint (summed into a float one)."""
    state = dict(nn.LSTM(1, 1).state_dict() if nn_layout else _tiny_state())
    key = "bias_ih_l0" if nn_layout else "cells.0.hidden_lin.bias"
    state[key] = torch.zeros(4).to(dtype)
    with pytest.raises(UsageError) as error:
        load_checkpoint(_saved(tmp_path, state))
    name = str(dtype).removeprefix("torch.")
    expected = f"wrong dtype (expected float32, float16, bfloat16 or float64): {key} ({name})"
    assert str(error.value).endswith(expected), error.value


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("nn_layout", [False, True], ids=["ours", "nn.LSTM"])
def test_both_layouts_accept_half_bfloat16_and_double_as_float32(tmp_path, dtype, nn_layout):
    source = _seeded_nn_lstm(18, 3, 4) if nn_layout else _seeded_lstm(18, 3, 4, num_layers=1)
    state = {k: v.to(dtype) for k, v in source.state_dict().items()}
    model = load_checkpoint(_saved(tmp_path, state))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x, h0, c0 = _inputs(5, 2, 3, 1, 4)
    reference = source.to(dtype).float()  # the same rounding, then compared in float32
    _assert_close(_run(model, x, h0, c0), _run(reference, x, h0, c0))


# --------------------------------------------------------------------------- weight values


@pytest.mark.parametrize(
    ("value", "shown"), [(math.nan, "NaN"), (math.inf, "inf"), (-math.inf, "inf")]
)
@pytest.mark.parametrize("nn_layout", [False, True], ids=["ours", "nn.LSTM"])
def test_non_finite_weights_are_refused_at_read_time_naming_the_first_bad_key(
    tmp_path, no_model, value, shown, nn_layout
):
    """Were refused only after 15-79 s of export, as "h0 must hold only finite numbers"."""
    state = dict(nn.LSTM(1, 1).state_dict() if nn_layout else _tiny_state())
    first, second = list(state)[1], list(state)[2]
    state[first] = state[first].clone().fill_(value)
    state[second] = state[second].clone().fill_(math.nan)
    path = _saved(tmp_path, state)
    with pytest.raises(UsageError) as error:
        read_checkpoint(path)
    assert str(error.value) == f"checkpoint {path}: weights must be finite; {first} holds {shown}"


def test_non_finite_weights_are_refused_from_python_too(no_model):
    state = _tiny_state()
    state["cells.0.hidden_lin.bias"] = torch.tensor([0.0, 1.0, math.nan, 2.0])
    with pytest.raises(UsageError) as error:
        model_from_state_dict(state, LSTMConfig(1, 1, 1, False), "my weights")
    assert (
        str(error.value) == "my weights: weights must be finite; cells.0.hidden_lin.bias holds NaN"
    )


def test_cli_refuses_nan_weights_in_one_line_naming_the_checkpoint(tmp_path, no_model, call_main):
    state = _tiny_state()
    state["cells.0.input_lin.weight"] = torch.full((4, 1), math.nan)
    path = _saved(tmp_path, state)
    code, _, err = call_main("export", "--checkpoint", path, "--out", tmp_path / "out")
    assert code == 2, err
    assert err.strip().splitlines() == [
        f"error: checkpoint {path}: weights must be finite; cells.0.input_lin.weight holds NaN"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("nn_layout", [False, True], ids=["ours", "nn.LSTM"])
def test_weights_beyond_max_abs_weight_are_refused_naming_key_and_magnitude(tmp_path, nn_layout):
    """Weights of 1e30 got as far as "parity failed (nan)"."""
    state = dict(nn.LSTM(1, 1).state_dict() if nn_layout else _tiny_state())
    key = next(iter(state))
    state[key] = torch.full_like(state[key], 0.5)
    state[key][0] = -1e30
    path = _saved(tmp_path, state)
    with pytest.raises(UsageError) as error:
        read_checkpoint(path)
    assert str(error.value).startswith(
        f"checkpoint {path}: weights must be at most 1e+06 in magnitude; {key} holds 1e+30 "
    )
    state[key][0] = -MAX_ABS_WEIGHT  # the bound itself is accepted
    assert load_checkpoint(_saved(tmp_path, state)).num_layers == 1


def test_max_abs_weight_is_where_float32_is_still_finite_and_1e19_is_not():
    """Why the bound: a LayerNorm LSTM at MAX_ABS_WEIGHT (every weight, largest sizes' worth
    of fan-in) stays finite in float32; at 1e19 LayerNorm squares the pre-activations into
    inf, and the outputs are NaN: what "parity failed (nan)" reported."""
    x, h0, c0 = _inputs(3, 2, 64, 1, 16)
    for scale, finite in ((MAX_ABS_WEIGHT, True), (1e19, False)):
        model = _seeded_lstm(19, 64, 16, num_layers=1, layer_norm=True)
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(torch.sign(param) * scale)
        outputs = _run(model, 100 * x, h0, c0)  # inputs 100x the parity matrix's
        assert all(bool(torch.isfinite(t).all()) for t in outputs) is finite, scale


# --------------------------------------------------------------------------- the file itself


def test_a_fifo_a_device_or_a_folder_is_refused_as_not_a_regular_file(tmp_path):
    """Were "does not exist or is not a file" (/dev/zero exists) or, opened, a hang."""
    for path, kind in not_regular_files(tmp_path, ".pt"):
        with pytest.raises(UsageError) as error:
            read_state_dict(path)
        assert str(error.value) == f"checkpoint {path} must be a regular file, but it is {kind}"
    with pytest.raises(UsageError) as error:
        read_state_dict(tmp_path / "missing.pt")
    assert str(error.value) == f"checkpoint {tmp_path / 'missing.pt'} does not exist"


def test_every_cut_of_a_zip_checkpoint_is_said_to_be_truncated(tmp_path):
    """A cut-short copy said "[Errno 22] Invalid argument" or "failed finding central directory"."""
    whole = _saved(tmp_path, _seeded_lstm(20, 4, 8, num_layers=2, layer_norm=True).state_dict())
    data = whole.read_bytes()
    cut = tmp_path / "cut.pt"
    for size in [*range(3, len(data), 211), len(data) - 1]:
        cut.write_bytes(data[:size])
        with pytest.raises(UsageError) as error:
            read_state_dict(cut)
        assert str(error.value) == (
            f"checkpoint {cut} is truncated or corrupt: a zip archive without its end record "
            "(an interrupted save or copy?); save or copy it again"
        ), size


def test_every_cut_of_a_legacy_pickle_checkpoint_is_one_line_saying_so(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(_tiny_state(), path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    for size in range(2, len(data), 7):
        cut.write_bytes(data[:size])
        with pytest.raises(UsageError) as error:
            read_state_dict(cut)
        assert f"checkpoint {cut} is truncated or corrupt: " in str(error.value), (size, error)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("fifo", "must be a regular file, but it is a named pipe"),
        ("device", "must be a regular file, but it is a device"),
        ("folder", "must be a regular file, but it is a folder"),
        ("truncated", "is truncated or corrupt: a zip archive without its end record"),
        ("meta", "cells.0.hidden_lin.bias is a meta tensor"),
        ("int32-bias", "wrong dtype (expected float32, float16, bfloat16 or float64)"),
        ("inf", "weights must be finite; cells.0.hidden_lin.bias holds inf"),
        ("ansi-key", r"unexpected: \x1b[31mred"),
    ],
)
def test_cli_refuses_each_bad_checkpoint_with_one_line_and_exit_2(
    tmp_path, call_main, no_model, kind, expected
):
    state = _tiny_state()
    not_files = dict(
        zip(("fifo", "device", "folder"), not_regular_files(tmp_path, ".pt"), strict=True)
    )
    if kind in not_files:
        path = not_files[kind][0]
    elif kind == "truncated":
        path = _saved(tmp_path, state)
        path.write_bytes(path.read_bytes()[:-100])
    else:
        key = {"ansi-key": "\x1b[31mred"}.get(kind, "cells.0.hidden_lin.bias")
        state[key] = {
            "meta": torch.empty(4, device="meta"),
            "int32-bias": torch.zeros(4, dtype=torch.int32),
            "inf": torch.full((4,), math.inf),
            "ansi-key": torch.zeros(1),
        }[kind]
        path = _saved(tmp_path, state)
    code, out, err = call_main("export", "--checkpoint", path, "--out", tmp_path / "out")
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: checkpoint {path}"), err
    assert expected in err, err
    assert "Traceback" not in err and "\x1b[31m" not in err and out == "", err
    assert not (tmp_path / "out").exists()


def test_a_bidirectional_key_with_a_newline_is_shown_escaped(tmp_path):
    state = nn.LSTM(4, 8).state_dict()
    state["weight_ih_l0_reverse\n"] = state["weight_ih_l0"].clone()
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    with pytest.raises(UsageError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message and "weight_ih_l0_reverse\\n" in message


def test_a_missing_forward_weight_of_a_bidirectional_nn_lstm_is_named_as_missing(tmp_path):
    """Not called a half-bidirectional file: the forward bias is what is missing."""
    state = _half(nn.LSTM(4, 5, bidirectional=True).state_dict(), "bias_hh_l0")
    with pytest.raises(UsageError) as error:
        read_checkpoint(_saved(tmp_path, state))
    message = str(error.value)
    assert "one direction or the other; missing: bias_hh_l0" in message, message
