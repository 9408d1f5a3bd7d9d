"""LSTMConfig from untrusted data: refused with one line naming what was expected and what came."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lstm_export.config import LSTMConfig, read_export_config
from lstm_export.errors import UsageError
from lstm_export.files import MAX_TEXT_BYTES

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
    with pytest.raises(UsageError, match=r"^m\.pt config\.json is not valid JSON: "):
        LSTMConfig.from_json("{oops", source="m.pt config.json")
    assert LSTMConfig.from_json(LSTMConfig(4, 8, 1, False).to_json()) == LSTMConfig(4, 8, 1, False)


def test_from_json_refuses_deep_nesting_in_one_line():
    """`[[[...` once reached json.loads unchecked: a RecursionError in verify, inspect, serve."""
    with pytest.raises(UsageError) as error:
        LSTMConfig.from_json("[" * 100_000, source="m.onnx lstm_export.config metadata")
    message = str(error.value)
    assert message.startswith("m.onnx lstm_export.config metadata nests 100000 levels deep")
    assert len(message) < 200


# --------------------------------------------------------------------------- export TOML files


def test_a_config_that_is_a_device_is_refused_without_reading_it(tmp_path):
    """`--config` as a symlink to /dev/zero once read until MemoryError.

    In a child whose address space is capped at 1 GiB: reading /dev/zero fails there
    with a MemoryError in a second, instead of taking this machine's memory.
    """
    link = tmp_path / "export.toml"
    link.symlink_to("/dev/zero")
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from pathlib import Path\n"
        "from lstm_export.config import read_export_config\n"
        "from lstm_export.errors import UsageError\n"
        "try:\n"
        "    read_export_config(Path(sys.argv[1]))\n"
        "except UsageError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(link)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"config file {link} must be a regular file, but it is a device"


def test_an_oversized_or_deeply_nested_config_file_is_refused_in_one_line(tmp_path):
    big = tmp_path / "big.toml"
    big.write_text("# padding\n" * 200_000)  # 2 MB of comments: valid TOML, but no config
    with pytest.raises(UsageError) as error:
        read_export_config(big)
    assert str(error.value) == (
        f"config file {big} is 2,000,000 bytes; expected at most {MAX_TEXT_BYTES:,}"
    )

    deep = tmp_path / "deep.toml"
    deep.write_text("name = " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(UsageError) as error:
        read_export_config(deep)
    assert str(error.value) == f"config file {deep} nests arrays or tables too deeply"
