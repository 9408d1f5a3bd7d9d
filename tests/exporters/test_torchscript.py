"""load_torchscript on files it did not write: one clear UsageError, never an AttributeError."""

from __future__ import annotations

import pytest
import torch

from helpers import NOT_A_FILE, SizesWithoutLayerNorm, WithOwnBuffer, small_model
from lstm_export.errors import UsageError
from lstm_export.exporters.torchscript import load_torchscript, own_weights, save_torchscript
from lstm_export.model import LSTM

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


def test_a_config_json_that_contradicts_the_attributes_is_refused(tmp_path):
    # One file, two configs: neither can be believed, and parity would use the wrong one.
    path = tmp_path / "model.pt"
    scripted = save_torchscript(small_model(False, 1), tmp_path / "good.pt")
    text = '{"input_size": 5, "hidden_size": 16, "num_layers": 1, "layer_norm": false}'
    torch.jit.save(scripted, str(path), _extra_files={"config.json": text})

    with pytest.raises(UsageError) as error:
        load_torchscript(path)

    assert str(error.value) == (
        f"{path}: its config.json says {{'input_size': 5, 'hidden_size': 16, 'num_layers': 1, "
        "'layer_norm': False, 'batch_first': False, 'bidirectional': False}, but its "
        "attributes say {'input_size': 5, 'hidden_size': 8, 'num_layers': 1, "
        "'layer_norm': False, 'batch_first': False, 'bidirectional': False}"
    )


class SizesOnly(torch.nn.Module):
    """All four config attributes, no weights: what `torch.jit.script` makes of a stub."""

    def __init__(self) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers, self.layer_norm = 5, 8, 1, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_a_module_without_the_weights_its_config_describes_is_refused(tmp_path):
    path = tmp_path / "stub.pt"
    torch.jit.save(torch.jit.script(SizesOnly()), str(path))
    with pytest.raises(UsageError) as error:
        load_torchscript(path)
    assert str(error.value) == (
        f"{path} does not hold the weights of the lstm-export LSTM its config describes "
        "({'input_size': 5, 'hidden_size': 8, 'num_layers': 1, 'layer_norm': False, '"
        "batch_first': False, 'bidirectional': False}): it holds "
        "0 tensors, a 1-layer LSTM at least 3"
    )

    # Our module with its attributes edited: every name is right, the shapes are not.
    scripted = torch.jit.script(small_model(False, 1))
    scripted.hidden_size = 4
    torch.jit.save(scripted, str(path))
    with pytest.raises(
        UsageError, match=r"3 wrongly shaped: cells\.0\.input_lin\.weight \[32, 5\]"
    ):
        load_torchscript(path)


@pytest.mark.parametrize(("make", "reason"), NOT_A_FILE)
def test_what_is_not_a_file_is_refused_before_libtorch_opens_it(tmp_path, make, reason):
    path = tmp_path / "model.pt"
    make(path)  # a FIFO would block torch.jit.load forever
    with pytest.raises(UsageError) as error:
        load_torchscript(path)
    assert str(error.value) == f"TorchScript model {path} {reason}"


def test_own_weights_leave_a_subclass_s_own_buffers_out():
    """What the pt2 helper rebuilds the model from, and what export's float32 check reads."""
    model = WithOwnBuffer.from_config(small_model(True).config())
    model.load_state_dict(small_model(True).state_dict(), strict=False)
    weights = own_weights(model)
    assert "calls" not in weights
    plain = LSTM.from_config(model.config())
    plain.load_state_dict(weights)  # strict, as the helper loads them
    for name, value in plain.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
