"""LSTMConfig from untrusted data: refused with one line naming what was expected and what came."""

from __future__ import annotations

import pytest

from lstm_export.config import LSTMConfig
from lstm_export.errors import UsageError

COMPLETE = {"input_size": 4, "hidden_size": 8, "num_layers": 1, "layer_norm": False}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(
            [1, 2],
            "m.onnx: expected an object with keys input_size, hidden_size, num_layers, "
            "layer_norm, got list [1, 2]",
            id="a-list",
        ),
        pytest.param(
            {**COMPLETE, "input_size": 0},
            "m.onnx: input_size must be an integer >= 1, got 0",
            id="zero-input",
        ),
        pytest.param(
            {"input_size": 4},
            "m.onnx: missing key(s) ['hidden_size', 'num_layers', 'layer_norm']; expected all "
            "of ['input_size', 'hidden_size', 'num_layers', 'layer_norm']",
            id="missing-keys",
        ),
        pytest.param(
            {**COMPLETE, "layer_norm": "yes"},
            "m.onnx: layer_norm must be true or false, got 'yes'",
            id="string-flag",
        ),
    ],
)
def test_from_dict_refuses_what_is_not_a_complete_valid_config(data, expected):
    with pytest.raises(UsageError) as error:
        LSTMConfig.from_dict(data, source="m.onnx")
    assert str(error.value) == expected


def test_partial_keeps_defaults_for_absent_keys():
    config = LSTMConfig.from_dict({"hidden_size": 12}, source="export.toml", partial=True)
    assert config == LSTMConfig(hidden_size=12)


def test_from_json_refuses_invalid_json_and_reads_a_valid_config():
    with pytest.raises(UsageError, match=r"^m\.pt config\.json is not valid JSON \("):
        LSTMConfig.from_json("{oops", source="m.pt config.json")
    assert LSTMConfig.from_json(LSTMConfig(4, 8, 1, False).to_json()) == LSTMConfig(4, 8, 1, False)
