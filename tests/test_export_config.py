"""ExportConfig as a library call: the layers `lstm-export export` merges (a TOML file, then the
flags), the checks done before any slow work, and `checkpoints.model_for`.

The command's own tests (tests/cli/test_cli.py) prove the same end to end; these say which call
decides what, so a Python caller gets the CLI's rules without the CLI.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lstm_export.config import ExportConfig, LSTMConfig, SizeLimits
from lstm_export.errors import UsageError
from lstm_export.model import LSTM

SMALL = LSTMConfig(4, 8, 1, False)


def test_flags_override_the_file_and_absent_flags_leave_it() -> None:
    file = ExportConfig(model=SMALL, name="file", out=Path("a"), fused_kernel=True, atol=2e-5)
    merged = file.with_flags(name="flag", fused_kernel=False, factor=5.0)
    assert merged == ExportConfig(
        model=SMALL, name="flag", out=Path("a"), fused_kernel=False, atol=2e-5, factor=5.0
    )
    assert merged.tolerance() == {"atol": 2e-5, "factor": 5.0}
    assert file.with_flags() == file


def test_resolve_names_the_destination_and_the_model(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert ExportConfig().resolve().out == Path("models") / "default"
    named = ExportConfig(name="speech").resolve()
    assert (named.out, named.name) == (Path("models") / "speech", "speech")
    from_folder = ExportConfig(out=tmp_path / "exports" / "run-1").resolve()
    assert from_folder.name == "run-1"  # as export() names it
    assert list(tmp_path.iterdir()) == []  # resolving writes nothing


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        pytest.param(ExportConfig(name="no/slashes"), "--name must be 1-128", id="name"),
        pytest.param(ExportConfig(out=Path("modèle")), "from --out modèle", id="folder-name"),
        pytest.param(ExportConfig(atol=-1.0), "atol must be a finite number >= 0", id="atol"),
        pytest.param(
            ExportConfig(checkpoint=Path("m/w.pt"), out=Path("m")), "is inside --out m", id="ckpt"
        ),
    ],
)
def test_resolve_refuses_before_any_work(tmp_path, monkeypatch, config, expected) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=expected):
        config.resolve()


def test_resolve_refuses_an_existing_destination_without_force(tmp_path) -> None:
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(UsageError, match="afile exists and is not a folder"):
        ExportConfig(out=tmp_path / "afile").resolve(force=True)


def test_check_source_refuses_without_torch(tmp_path) -> None:
    """An oversized random config and a checkpoint that is a folder, in a process that
    never imports torch: the CLI calls check_source before loading it."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from lstm_export.config import ExportConfig\n"
        "from lstm_export.errors import UsageError\n"
        "for config in (ExportConfig(), ExportConfig(checkpoint=Path(sys.argv[1]))):\n"
        "    try:\n"
        "        config.check_source({'hidden_size': 100_000})\n"
        "    except UsageError as exc:\n"
        "        print(exc)\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "the model: hidden_size=100,000 is over the limit of 65,536 (--max-size raises it)",
        f"checkpoint {tmp_path} must be a regular file, but it is a folder",
        "False",
    ]


def test_model_for_random_weights_takes_the_overrides() -> None:
    from lstm_export.checkpoints import build_model, model_for

    model, origin, notes = model_for(ExportConfig(model=SMALL), {"hidden_size": 6})
    assert (origin, notes) == ("random weights (seed 0)", ())
    expected = build_model(LSTMConfig(4, 6, 1, False)).state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    with pytest.raises(UsageError, match="num_layers=2 is over the limit of 1 layers"):
        model_for(ExportConfig(), limits=SizeLimits(max_layers=1))


def test_model_for_a_checkpoint_reads_its_sizes_and_holds_it_to_the_model_table(tmp_path) -> None:
    from lstm_export.checkpoints import model_for

    weights = LSTM(4, 8, 1, layer_norm=False).state_dict()
    torch.save(weights, tmp_path / "w.pt")
    model, origin, _notes = model_for(ExportConfig(checkpoint=tmp_path / "w.pt"))
    assert origin == f"checkpoint {tmp_path / 'w.pt'}"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    wrong = ExportConfig(checkpoint=tmp_path / "w.pt", model=LSTMConfig(5, 8, 1, False))
    with pytest.raises(UsageError, match=r"input_lin\.weight \(expected \[32, 5\], got \[32, 4\]"):
        model_for(wrong)


# --------------------------------------------------------------------------- layout keys


def test_the_model_table_names_only_some_keys_and_the_rest_come_from_below() -> None:
    """[model] keeps only what it names: a checkpoint's sizes, else the defaults, fill the
    rest, and the flags go over all of it."""
    table = ExportConfig(model={"batch_first": True, "hidden_size": 6})
    checkpoint = LSTMConfig(4, 8, 1, False, bidirectional=True)
    assert table.lstm_config(base=checkpoint) == LSTMConfig(4, 6, 1, False, True, True)
    assert table.lstm_config() == LSTMConfig(hidden_size=6, batch_first=True)
    flags = {"batch_first": False, "bidirectional": True}
    assert table.lstm_config(flags) == LSTMConfig(hidden_size=6, bidirectional=True)
    assert ExportConfig(model=SMALL).lstm_config(base=checkpoint) == SMALL  # a whole config


def test_stated_names_the_flag_over_the_table_and_none_when_neither_says() -> None:
    config = ExportConfig(model={"bidirectional": True})
    assert config.stated("bidirectional") == "[model] bidirectional = true"
    assert config.stated("bidirectional", {"bidirectional": False}) == "--no-bidirectional"
    assert config.stated("batch_first", {"batch_first": True}) == "--batch-first"
    assert config.stated("batch_first") is None


def test_a_bad_model_table_is_refused_when_the_config_is_made() -> None:
    with pytest.raises(UsageError, match="batch_first must be true or false, got 'yes'"):
        ExportConfig(model={"batch_first": "yes"})


def test_toml_layout_keys_are_read(tmp_path) -> None:
    from lstm_export.config import read_export_config

    path = tmp_path / "export.toml"
    path.write_text("[model]\nbatch_first = true\nbidirectional = true\n", encoding="utf-8")
    config = read_export_config(path)
    assert config.model == {"batch_first": True, "bidirectional": True}
    assert config.lstm_config() == LSTMConfig(batch_first=True, bidirectional=True)
    path.write_text("[model]\nbidirectional = 1\n", encoding="utf-8")
    with pytest.raises(UsageError, match="bidirectional must be true or false, got 1"):
        read_export_config(path)


def test_random_weights_honour_both_layout_flags() -> None:
    from lstm_export.checkpoints import model_for

    flags = {"batch_first": True, "bidirectional": True}
    model, _origin, notes = model_for(ExportConfig(model=SMALL), flags)
    assert model.config() == LSTMConfig(4, 8, 1, False, True, True)
    assert notes == ()  # a random model's layout is the one asked for: nothing to warn about
