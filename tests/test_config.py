"""LSTMConfig from untrusted data: refused with one line naming what was expected and what came.

Also the size limits (check_size, the export flags that raise them) and export TOML files.
"""

from __future__ import annotations

import time

import pytest

from helpers import run_python
from lstm_export.config import (
    DEFAULT_LIMITS,
    MAX_LAYERS,
    MAX_PARAMETERS,
    MAX_SIZE,
    LSTMConfig,
    SizeLimits,
    check_size,
    read_export_config,
)
from lstm_export.errors import UsageError
from lstm_export.files import MAX_TEXT_BYTES

COMPLETE = {"input_size": 4, "hidden_size": 8, "num_layers": 1, "layer_norm": False}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(
            [1, 2],
            "m.onnx: expected an object with keys input_size, hidden_size, num_layers, "
            "layer_norm, batch_first, bidirectional, got list [1, 2]",
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
            "of ['input_size', 'hidden_size', 'num_layers', 'layer_norm', 'batch_first', "
            "'bidirectional']",
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


# --------------------------------------------------------------------------- size limits


@pytest.mark.parametrize(
    "config",
    [
        LSTMConfig(5, 6, 3, True),
        LSTMConfig(5, 6, 1, False),
        LSTMConfig(1, 1, 1, True),
        LSTMConfig(64, 256, 2, True),
    ],
    ids=str,
)
def test_parameter_count_is_the_built_models_without_building_it(config):
    from lstm_export.model import LSTM

    model = LSTM(config.input_size, config.hidden_size, config.num_layers, config.layer_norm)
    assert config.parameter_count() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        pytest.param(
            LSTMConfig(num_layers=65),
            "the model: num_layers=65 is over the limit of 64 layers (--max-layers raises it)",
            id="layers",
        ),
        pytest.param(
            LSTMConfig(hidden_size=100_000),
            "the model: hidden_size=100,000 is over the limit of 65,536 (--max-size raises it)",
            id="hidden-100000",
        ),
        pytest.param(
            LSTMConfig(hidden_size=2**63 - 1),
            "the model: hidden_size=9,223,372,036,854,775,807 is over the limit of 65,536 "
            "(--max-size raises it)",
            id="hidden-int64-max",
        ),
        pytest.param(
            LSTMConfig(input_size=70_000, hidden_size=4, num_layers=1),
            "the model: input_size=70,000 is over the limit of 65,536 (--max-size raises it)",
            id="input",
        ),
        pytest.param(
            LSTMConfig(hidden_size=9000),
            "the model: LSTM(input_size=64, hidden_size=9000, num_layers=2, layer_norm=True) "
            "has 974,556,000 parameters (3,717 MiB of float32), over the limit of 268,435,456 "
            "(1,024 MiB; --max-parameters raises it)",
            id="parameters",
        ),
    ],
)
def test_check_size_refuses_each_limit_naming_the_value_the_limit_and_the_flag(config, expected):
    with pytest.raises(UsageError) as error:
        check_size(config)
    assert str(error.value) == expected


def test_limits_can_be_raised_or_lowered_and_must_be_positive_integers():
    big = LSTMConfig(hidden_size=9000, num_layers=70)
    limits = SizeLimits(max_parameters=10**12, max_layers=70, max_size=9000)
    assert check_size(big, limits) == big.parameter_count()
    assert check_size(LSTMConfig()) == LSTMConfig().parameter_count()  # the default fits
    with pytest.raises(UsageError, match="num_layers=2 is over the limit of 1 layers"):
        check_size(LSTMConfig(), SizeLimits(max_layers=1))
    for bad in (0, -1, True, 1.5):
        with pytest.raises(UsageError, match=r"^max_parameters must be an integer >= 1"):
            SizeLimits(max_parameters=bad)
    assert (MAX_PARAMETERS, MAX_LAYERS, MAX_SIZE) == (2**28, 64, 2**16)


def _no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building any LSTM fails the test: a refusal must come before the work."""
    from lstm_export.model import LSTM

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("an LSTM was built before the size was checked")

    monkeypatch.setattr(LSTM, "__init__", refuse)


def test_build_model_refuses_an_oversized_config_before_allocating(monkeypatch):
    """`--hidden-size 100000` was a 160 GB allocation (RuntimeError), 20000 ran 83 s."""
    from lstm_export.checkpoints import build_model

    _no_model(monkeypatch)
    with pytest.raises(UsageError, match=r"has 4,805,680,000 parameters"):
        build_model(LSTMConfig(hidden_size=20_000))


@pytest.mark.parametrize(
    ("hidden", "expected"),
    [
        ("100000", "hidden_size=100,000 is over the limit of 65,536 (--max-size raises it)"),
        ("20000", "has 4,805,680,000 parameters"),  # under --max-size, over --max-parameters
    ],
)
def test_cli_oversized_hidden_size_is_one_line_exit_2_before_torch_is_imported(
    tmp_path, hidden, expected
):
    """Was a RuntimeError traceback (100000: a 160 GB allocation), or 83 s then MemoryError."""
    script = (
        "import sys\n"
        "from lstm_export import cli\n"
        f"sys.argv = ['lstm-export', 'export', '--hidden-size', '{hidden}', '--out', 'out']\n"
        "try:\n"
        "    cli.main()\n"
        "except SystemExit as exc:\n"
        "    print(exc.code, 'torch' in sys.modules)\n"
    )
    start = time.monotonic()
    proc = run_python(script, cwd=tmp_path, timeout=300)
    assert time.monotonic() - start < 5  # a generous bound: the work itself is never started
    assert proc.stdout.split() == ["2", "False"], (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert expected in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []


def test_cli_toml_hidden_size_of_int64_max_is_one_line_exit_2(tmp_path, monkeypatch, call_main):
    """Was an OverflowError traceback from inside torch."""
    _no_model(monkeypatch)
    toml = tmp_path / "export.toml"
    toml.write_text('out = "out"\n[model]\nhidden_size = 9223372036854775807\n')
    code, _, err = call_main("export", "--config", toml)
    assert code == 2, err
    assert err.strip().splitlines() == [
        "error: the model: hidden_size=9,223,372,036,854,775,807 is over the limit of 65,536 "
        "(--max-size raises it)"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.toml"]


def test_cli_max_flags_raise_and_lower_the_limits(tmp_path, monkeypatch, call_main):
    from lstm_export import checkpoints

    built = []

    def fake_build(config: LSTMConfig, seed: int = 0, limits: SizeLimits = DEFAULT_LIMITS):
        built.append((config, limits))
        raise UsageError("stop: the size check passed")

    monkeypatch.setattr(checkpoints, "build_model", fake_build)
    out = tmp_path / "out"
    code, _, err = call_main("export", "--hidden-size", "9000", "--out", out)
    assert code == 2 and "--max-parameters raises it" in err and built == [], err

    code, _, err = call_main(
        "export", "--hidden-size", "9000", "--max-parameters", 10**9, "--out", out
    )
    assert code == 2 and "stop: the size check passed" in err, err
    assert built == [(LSTMConfig(hidden_size=9000), SizeLimits(max_parameters=10**9))]

    code, _, err = call_main("export", "--num-layers", "3", "--max-layers", "2", "--out", out)
    assert code == 2 and "num_layers=3 is over the limit of 2 layers" in err, err
    code, _, err = call_main("export", "--input-size", "300", "--max-size", "256", "--out", out)
    assert code == 2 and "input_size=300 is over the limit of 256" in err, err
    code, _, err = call_main("export", "--max-parameters", "0", "--out", out)
    assert code == 2 and "--max-parameters" in err, err
    assert len(built) == 1 and not out.exists()


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
    proc = run_python(script, link, timeout=120)
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


def test_printable_escapes_first_and_then_cuts_to_the_limit():
    from lstm_export.config import printable

    shown = printable("\x01" * 5000, 2000)
    assert len(shown) == 2000 and shown.startswith("\\x01") and shown.endswith("...")
    assert printable("a\x1b[31mb") == "a\\x1b[31mb"
