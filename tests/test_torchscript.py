"""load_torchscript on files it did not write: one clear UsageError, never an AttributeError."""

from __future__ import annotations

import pytest
import torch

from conftest import SizesWithoutLayerNorm, small_model
from lstm_export.errors import UsageError
from lstm_export.torchscript import load_torchscript, save_torchscript

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:DeprecationWarning")


def test_a_module_without_layer_norm_is_refused_naming_what_it_lacks(tmp_path):
    path = tmp_path / "sizes.pt"
    torch.jit.save(torch.jit.script(SizesWithoutLayerNorm()), str(path))

    with pytest.raises(UsageError) as error:
        load_torchscript(path)

    assert str(error.value) == (
        f"{path} is TorchScript but not an lstm-export LSTM: expected the attributes "
        "input_size, hidden_size, num_layers, layer_norm, it lacks layer_norm"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("{oops", "config.json is not valid JSON", id="invalid-json"),
        pytest.param("[5, 8]", "config.json: expected an object with keys", id="a-list"),
        pytest.param(
            '{"input_size": 5, "hidden_size": 8, "num_layers": 0, "layer_norm": false}',
            "config.json: num_layers must be an integer >= 1, got 0",
            id="zero-layers",
        ),
    ],
)
def test_a_bad_config_json_extra_file_is_refused(tmp_path, text, expected):
    path = tmp_path / "model.pt"
    scripted = save_torchscript(small_model(False, 1), tmp_path / "good.pt")
    torch.jit.save(scripted, str(path), _extra_files={"config.json": text})

    with pytest.raises(UsageError, match=expected) as error:
        load_torchscript(path)
    assert str(path) in str(error.value)
