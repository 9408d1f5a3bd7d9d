"""The `lstm-export` command: export, verify, inspect, --config, errors and atomic writes.

Cheap paths run in-process (typer's CliRunner, or `cli.main()` for the exit codes and
the one-line errors it produces); what only a real process can show (no traceback on
stderr, `--help` without torch, the console script, the no-argument default export)
runs as a subprocess with `cwd=tmp_path`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

import helpers
from helpers import SizesWithoutLayerNorm
from lstm_export import LSTM, cli
from lstm_export.checkpoints import build_model
from lstm_export.config import LSTMConfig
from lstm_export.verification.cases import default_cases

# Small and quick: one layer, and no LayerNorm unless a test asks for it.
SMALL = ["--input-size", "4", "--hidden-size", "8", "--num-layers", "1", "--no-layer-norm"]
SMALL_CONFIG = LSTMConfig(4, 8, 1, False)
SMALL_LN = LSTMConfig(4, 8, 1, True)
ARTIFACTS = ("manifest.json", "model.onnx", "model.pt")

# torch.jit.load warns that TorchScript is deprecated; that is torch's business, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:DeprecationWarning")


# --------------------------------------------------------------------------- helpers


def run_cli(*args: object, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m lstm_export.cli ARGS` in a fresh process, 200 columns wide (whole lines)."""
    env = {**os.environ, "COLUMNS": "200"}
    return helpers.run_cli(*args, cwd=cwd, env=env, timeout=timeout)


def invoke(*args: object):
    """The app in-process; exceptions stay on `result.exception`."""
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def assert_one_line_error(code: int, err: str, expected_code: int = 2) -> str:
    assert code == expected_code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_onnx(path: Path, x, h0, c0):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["y", "hn", "cn"], {"x": x, "h0": h0, "c0": c0})


def run_eager(model, x, h0, c0):
    with torch.no_grad():
        y, (h, c) = model(torch.from_numpy(x), (torch.from_numpy(h0), torch.from_numpy(c0)))
    return y.numpy(), h.numpy(), c.numpy()


def max_error(got, expected) -> float:
    return max(float(np.max(np.abs(g - e))) for g, e in zip(got, expected, strict=True))


def random_inputs(config: LSTMConfig, seq: int = 9, batch: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((seq, batch, config.input_size), dtype=np.float32)
    shape = (config.num_layers, batch, config.hidden_size)
    return x, rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, np.float32)


@pytest.fixture(scope="module")
def small_export(tmp_path_factory) -> Path:
    """One small export shared by the read-only verify/inspect tests (copy it to modify it)."""
    out = tmp_path_factory.mktemp("shared") / "small"
    result = invoke("export", *SMALL, "--name", "small", "--out", out)
    assert result.exit_code == 0, (result.output, result.exception)
    return out


# --------------------------------------------------------------------------- entry points


def test_help_does_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from lstm_export import cli\n"
        "for args in (['--help'], ['export', '--help'], ['verify', '--help']):\n"
        "    try:\n"
        "        cli.app(args)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code in (0, None), exc.code\n"
        "heavy = sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'numpy') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('NO-TORCH-OK')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "--checkpoint" in proc.stdout  # the export help really was printed
    assert "NO-TORCH-OK" in proc.stdout


def test_module_help_and_version(tmp_path):
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for command in ("export", "verify", "inspect"):
        assert command in proc.stdout
    proc = run_cli("--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "0.1.0" in proc.stdout


def test_console_script_is_installed(tmp_path):
    # The README's commands install the package (pip install -e .), which puts the script on PATH.
    script = shutil.which("lstm-export")
    assert script is not None, "the lstm-export console script is not on PATH: pip install -e ."
    proc = subprocess.run(
        [script, "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "lstm-export 0.1.0" in proc.stdout


# --------------------------------------------------------------------------- export


@pytest.mark.slow  # the built-in default model, exported in a fresh process
def test_default_export_without_arguments(tmp_path):
    proc = run_cli("export", cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "models" / "default"
    assert sorted(p.name for p in out.iterdir()) == sorted(ARTIFACTS)
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["default"]  # no staging left
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == "default"
    expected = LSTMConfig()
    assert (expected.input_size, expected.hidden_size, expected.num_layers) == (64, 256, 2)
    assert manifest["config"] == expected.to_dict()
    assert manifest["parity"]["passed"] is True
    assert "Parity passed" in proc.stdout
    # Random weights from a fixed seed: the same every time, and the ones saved.
    reference = build_model(expected).state_dict()
    saved = torch.jit.load(str(out / "model.pt"), map_location="cpu").state_dict()
    assert set(saved) == set(reference)
    for key, value in reference.items():
        assert torch.equal(saved[key], value), key


def test_export_json_manifest_and_parity_with_the_saved_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("export", *SMALL, "--layer-norm", "--name", "mine", "--json")

    assert result.exit_code == 0, (result.output, result.exception)
    out = tmp_path / "models" / "mine"  # the default --out is models/<name> under the cwd
    assert sorted(p.name for p in out.iterdir()) == sorted(ARTIFACTS)
    manifest = json.loads(result.stdout)
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == "mine"
    assert manifest["config"] == SMALL_LN.to_dict()
    for name in ("model.pt", "model.onnx"):
        entry = manifest["artifacts"][name]
        assert entry["sha256"] == sha256(out / name)
        assert entry["bytes"] == (out / name).stat().st_size
    assert manifest["parity"]["passed"] is True
    assert manifest["parity"]["tolerance"]["atol"] == 1e-5
    assert 0 < manifest["parity"]["worst_error"] <= 1e-5
    backends = {r["backend"] for r in manifest["parity"]["results"]}
    assert {"torchscript", "onnxruntime"} <= backends
    assert manifest["signature"]["inputs"]["x"]["shape"] == ["seq", "batch", 4]
    # The eager model with the weights model.pt holds, against onnxruntime and TorchScript.
    scripted = torch.jit.load(str(out / "model.pt"), map_location="cpu")
    eager = LSTM(4, 8, 1, layer_norm=True)
    eager.load_state_dict(scripted.state_dict())
    x, h0, c0 = random_inputs(SMALL_LN)
    expected = run_eager(eager.eval(), x, h0, c0)
    assert max_error(run_onnx(out / "model.onnx", x, h0, c0), expected) <= 1e-5
    assert max_error(run_eager(scripted, x, h0, c0), expected) <= 1e-5


def test_export_without_name_is_named_after_its_out_folder(tmp_path, call_main):
    code, stdout, err = call_main("export", *SMALL, "--out", tmp_path / "speech", "--json")

    assert code == 0, err
    manifest = json.loads((tmp_path / "speech" / "manifest.json").read_text())
    assert manifest["name"] == "speech"  # not "default"
    assert json.loads(stdout)["name"] == "speech"


def _nan_checkpoint(path: Path) -> None:
    state = LSTM(4, 8, 1).state_dict()
    state["cells.0.hidden_lin.bias"] = torch.full_like(state["cells.0.hidden_lin.bias"], np.nan)
    torch.save(state, path)


def test_existing_folder_is_only_replaced_with_force(tmp_path, call_main):
    out = tmp_path / "exp"
    code, stdout, err = call_main("export", *SMALL, "--out", out)
    assert code == 0, err
    assert "Exported" in stdout and "Parity passed" in stdout
    before = snapshot(out)

    # Without --force: refused, and the folder is untouched.
    code, _, err = call_main("export", *SMALL, "--hidden-size", "12", "--out", out)
    assert "--force" in assert_one_line_error(code, err)
    assert snapshot(out) == before

    # With --force but a failing export: the old folder survives as it was.
    _nan_checkpoint(tmp_path / "nan.pt")
    code, _, err = call_main("export", "--checkpoint", tmp_path / "nan.pt", "--out", out, "--force")
    assert code in (1, 2), err  # a parity breach, or a refusal of the NaN weights
    assert "Traceback" not in err
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "nan.pt"]

    # With --force but a file the export did not write: refused naming it, nothing deleted.
    (out / "notes.txt").write_text("the user's")
    code, _, err = call_main("export", *SMALL, "--hidden-size", "12", "--out", out, "--force")
    assert "'notes.txt'" in assert_one_line_error(code, err)
    assert snapshot(out) == {**before, "notes.txt": b"the user's"}
    (out / "notes.txt").unlink()

    # With --force: replaced, no .old-/.partial- dirs or lock left.
    code, _, err = call_main("export", *SMALL, "--hidden-size", "12", "--out", out, "--force")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(ARTIFACTS)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["hidden_size"] == 12
    assert manifest["artifacts"]["model.onnx"]["sha256"] == sha256(out / "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp", "nan.pt"]


def test_failed_export_leaves_nothing_behind(tmp_path, call_main):
    _nan_checkpoint(tmp_path / "nan.pt")
    parent = tmp_path / "exports"
    parent.mkdir()

    code, _, err = call_main("export", "--checkpoint", tmp_path / "nan.pt", "--out", parent / "x")

    assert code in (1, 2), err  # a parity breach, or a refusal of the NaN weights
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert list(parent.iterdir()) == []  # no folder, no .x.partial-* staging dir


def test_export_interrupted_mid_write_leaves_nothing_behind(tmp_path, call_main, monkeypatch):
    import lstm_export.pipeline as pipeline

    written = []

    def half_written(model, path, *args, **kwargs):
        Path(path).write_bytes(b"half an onnx file")
        written.append(Path(path))
        raise KeyboardInterrupt  # Ctrl-C after model.pt and half of model.onnx

    monkeypatch.setattr(pipeline, "save_onnx", half_written)
    code, _, err = call_main("export", *SMALL, "--out", tmp_path / "default")

    assert written, "the export never reached the ONNX step"
    assert code != 0
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_failed_export_into_a_nested_path_leaves_no_empty_parents(tmp_path, call_main):
    _nan_checkpoint(tmp_path / "nan.pt")
    nested = tmp_path / "exports" / "2026" / "run" / "x"

    code, _, err = call_main("export", "--checkpoint", tmp_path / "nan.pt", "--out", nested)

    assert code in (1, 2), err
    assert [p.name for p in tmp_path.iterdir()] == ["nan.pt"]  # no exports/2026/run/


def test_sigterm_during_export_leaves_no_staging_folder(tmp_path):
    parent = tmp_path / "exports"
    parent.mkdir()
    env = {**os.environ, "COLUMNS": "200"}
    # The default model: its export runs for seconds, long enough to be caught mid-way.
    proc = subprocess.Popen(
        [sys.executable, "-m", "lstm_export.cli", "export", "--out", str(parent / "m")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 240
        while not list(parent.glob(".m.partial-*")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the export never started staging"
            time.sleep(0.01)
        time.sleep(0.2)  # inside the export: scripting, ONNX or the parity matrix
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert proc.returncode == 143, (proc.returncode, err)  # not -15: it cleaned up
    assert "terminated (SIGTERM)" in assert_one_line_error(proc.returncode, err, 143)
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(["--name", "no/slashes"], "--name", id="bad-name"),
        pytest.param(["--hidden-size", "0"], "hidden_size", id="zero-hidden"),
        pytest.param(["--num-layers", "-1"], "num_layers", id="negative-layers"),
        pytest.param(["--checkpoint", "missing.pt"], "missing.pt", id="missing-checkpoint"),
        pytest.param(["--config", "missing.toml"], "missing.toml", id="missing-config"),
    ],
)
def test_export_bad_input_is_one_line_exit_2(tmp_path, monkeypatch, call_main, args, expected):
    monkeypatch.chdir(tmp_path)
    code, _, err = call_main("export", *args)

    assert expected in assert_one_line_error(code, err)
    assert list(tmp_path.iterdir()) == []


def test_export_out_that_is_a_file_is_refused_even_with_force(tmp_path, call_main):
    target = tmp_path / "afile"
    target.write_text("keep me")

    for extra in ([], ["--force"]):
        code, _, err = call_main("export", *SMALL, "--out", target, *extra)
        assert "afile" in assert_one_line_error(code, err)
    assert target.read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_export_out_below_a_file_is_one_line_exit_2(tmp_path, call_main):
    (tmp_path / "afile").write_text("keep me")

    code, _, err = call_main("export", *SMALL, "--out", tmp_path / "afile" / "sub")

    assert_one_line_error(code, err)
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(["export", "--name", "bad name!"], "--name", id="bad-name"),
        pytest.param(["export", "--config", "nope.toml"], "nope.toml", id="missing-config"),
        pytest.param(["export", "--input-size", "abc"], "'--input-size'", id="not-an-int"),
        pytest.param(
            ["export", "--no-such-flag"],
            "No such option: --no-such-flag",
            id="unknown-flag",
        ),
        pytest.param(["verify"], "Missing argument", id="missing-argument"),
        pytest.param(["exprot"], "No such command 'exprot'", id="unknown-command"),
    ],
)
def test_bad_usage_in_a_real_process_is_one_line_exit_2(tmp_path, args, expected):
    proc = run_cli(*args, cwd=tmp_path)

    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr  # not typer's five-line box
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert not proc.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "expected", "command"),
    [
        pytest.param(
            ["export", "--bogus"], "No such option: --bogus", "export", id="unknown-option"
        ),
        pytest.param(
            ["export", "--hidden-size", "abc"],
            "Invalid value for '--hidden-size'",
            "export",
            id="not-an-int",
        ),
        pytest.param(["inspect"], "Missing argument", "inspect", id="missing-argument"),
        pytest.param(["bogus"], "No such command 'bogus'", None, id="unknown-command"),
    ],
)
def test_usage_errors_are_one_line_naming_the_help(call_main, args, expected, command):
    code, out, err = call_main(*args)

    line = assert_one_line_error(code, err)
    assert line.startswith(f"error: {expected}"), line
    where = f"lstm-export {command}" if command else "lstm-export"
    assert line.endswith(f"(see {where} --help)"), line
    assert not out


def test_usage_line_names_arguments_plainly():
    for command, usage in (
        ("verify", "verify [OPTIONS] FOLDER"),
        ("bench", "bench [OPTIONS] [FOLDER]"),
    ):
        result = invoke(command, "--help")
        assert result.exit_code == 0, result.output
        assert usage in result.stdout, result.stdout
        assert "{folder}" not in result.stdout


# --------------------------------------------------------------------------- --config


def _write_toml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_config_file_paths_are_relative_to_the_toml(tmp_path, monkeypatch):
    torch.manual_seed(3)
    model = LSTM(4, 8, 1, layer_norm=False).eval()
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    torch.save(model.state_dict(), cfg_dir / "weights.pt")
    _write_toml(
        cfg_dir / "export.toml",
        'name = "fromtoml"\ncheckpoint = "weights.pt"\nout = "exports/here"\n\n'
        "[model]\ninput_size = 4\nhidden_size = 8\nnum_layers = 1\nlayer_norm = false\n",
    )
    monkeypatch.chdir(tmp_path)

    result = invoke("export", "--config", "cfg/export.toml")

    assert result.exit_code == 0, (result.output, result.exception)
    out = cfg_dir / "exports" / "here"
    assert not (tmp_path / "exports").exists() and not (tmp_path / "models").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == "fromtoml"
    assert manifest["config"] == LSTMConfig(4, 8, 1, False).to_dict()
    x, h0, c0 = random_inputs(LSTMConfig(4, 8, 1, False))
    expected = run_eager(model, x, h0, c0)  # the checkpoint's weights, not random ones
    assert max_error(run_onnx(out / "model.onnx", x, h0, c0), expected) <= 1e-5


def test_cli_flags_override_the_config_file(tmp_path, monkeypatch):
    _write_toml(
        tmp_path / "export.toml",
        'name = "fromtoml"\nout = "fromtoml-out"\n\n'
        "[model]\ninput_size = 4\nhidden_size = 8\nnum_layers = 1\nlayer_norm = false\n",
    )
    monkeypatch.chdir(tmp_path)

    result = invoke(
        "export",
        "--config",
        "export.toml",
        "--hidden-size",
        "12",
        "--layer-norm",
        "--name",
        "flagname",
        "--out",
        "flag-out",
    )

    assert result.exit_code == 0, (result.output, result.exception)
    assert not (tmp_path / "fromtoml-out").exists()
    manifest = json.loads((tmp_path / "flag-out" / "manifest.json").read_text())
    assert manifest["name"] == "flagname"
    assert manifest["config"] == LSTMConfig(4, 12, 1, True).to_dict()


def test_layout_flags_override_the_config_file_for_random_weights(tmp_path, monkeypatch):
    _write_toml(tmp_path / "export.toml", "[model]\nbatch_first = false\nbidirectional = true\n")
    monkeypatch.chdir(tmp_path)

    result = invoke("export", *SMALL, "--config", "export.toml", "--batch-first", "--out", "o")

    assert result.exit_code == 0, (result.output, result.exception)
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["config"] == LSTMConfig(4, 8, 1, False, True, True).to_dict()
    assert manifest["signature"]["inputs"]["x"]["shape"] == ["batch", "seq", 4]
    assert manifest["signature"]["outputs"]["hn"]["shape"] == [2, "batch", 8]
    assert "layer_norm=False batch_first=True bidirectional=True" in result.stdout
    assert "do not record batch_first" not in result.stderr  # random weights: as asked


@pytest.mark.slow  # compiles the fused kernel on first use
def test_config_file_asks_for_the_fused_kernel_and_a_flag_turns_it_off(tmp_path, monkeypatch):
    _write_toml(
        tmp_path / "export.toml",
        "fused_kernel = true\n\n[model]\ninput_size = 4\nhidden_size = 8\nnum_layers = 1\n"
        "layer_norm = true\n",
    )
    monkeypatch.chdir(tmp_path)
    for extra, out in (((), "with"), (("--no-fused-kernel",), "without")):
        result = invoke("export", "--config", "export.toml", "--out", out, *extra)
        assert result.exit_code == 0, (result.output, result.exception)
    assert (
        "model.fused.pt"
        in json.loads((tmp_path / "with" / "manifest.json").read_text())["artifacts"]
    )
    assert not (tmp_path / "without" / "model.fused.pt").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param('nmae = "typo"\n', "nmae", id="unknown-top-level-key"),
        pytest.param("[model]\nhidden_sise = 8\n", "hidden_sise", id="unknown-model-key"),
        pytest.param('[model]\nhidden_size = "8"\n', "hidden_size", id="string-size"),
        pytest.param("[model]\nnum_layers = 0\n", "num_layers", id="zero-layers"),
        pytest.param("name = 3\n", "name", id="name-not-a-string"),
        pytest.param("model = 3\n", "[model] must be a table", id="model-not-a-table"),
        pytest.param("[model\n", "TOML", id="invalid-toml"),
        pytest.param('fused_kernel = "yes"\n', "fused_kernel must be true or false", id="fused"),
        pytest.param("parity = 3\n", "[parity] must be a table", id="parity-not-a-table"),
        pytest.param("[parity]\natl = 1e-4\n", "unknown key(s) ['atl'] in [parity]", id="typo"),
        pytest.param("[parity]\natol = -1e-4\n", "atol must be a finite number >= 0", id="neg"),
        pytest.param("[parity]\nfactor = nan\n", "factor must be a finite number >= 0", id="nan"),
        pytest.param('[parity]\natol = "1e-4"\n', "atol must be a finite number", id="string"),
    ],
)
def test_bad_config_files_are_refused(tmp_path, monkeypatch, call_main, text, expected):
    _write_toml(tmp_path / "export.toml", text)
    monkeypatch.chdir(tmp_path)

    code, _, err = call_main("export", "--config", "export.toml")

    assert expected in assert_one_line_error(code, err)
    assert [p.name for p in tmp_path.iterdir()] == ["export.toml"]


def test_config_model_table_must_fit_the_checkpoint(tmp_path, call_main):
    torch.save(LSTM(4, 8, 1).state_dict(), tmp_path / "weights.pt")
    _write_toml(
        tmp_path / "export.toml",
        'checkpoint = "weights.pt"\nout = "out"\n[model]\ninput_size = 5\nhidden_size = 8\n'
        "num_layers = 1\nlayer_norm = false\n",
    )

    code, _, err = call_main("export", "--config", tmp_path / "export.toml")

    line = assert_one_line_error(code, err)
    assert "cells.0.input_lin.weight (expected [32, 5], got [32, 4])" in line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- parity options


def test_config_file_sets_the_tolerance_and_flags_override_it(tmp_path, monkeypatch):
    _write_toml(tmp_path / "export.toml", "[parity]\natol = 2e-5\nfactor = 6\n")
    monkeypatch.chdir(tmp_path)
    for extra, out, expected in (
        ((), "file", (2e-5, 6.0)),
        (("--atol", "3e-5"), "flag", (3e-5, 6.0)),
        (("--factor", "5"), "both", (2e-5, 5.0)),
    ):
        result = invoke("export", *SMALL, "--config", "export.toml", "--out", out, *extra)
        assert result.exit_code == 0, (result.output, result.exception)
        recorded = json.loads((tmp_path / out / "manifest.json").read_text())["parity"]
        assert (recorded["tolerance"]["atol"], recorded["tolerance"]["factor"]) == expected
        assert all(r["allowed"]["y"] >= expected[0] for r in recorded["results"])


@pytest.mark.parametrize("command", ["export", "verify", "cpp-check", "triton"])
@pytest.mark.parametrize(("option", "value"), [("--atol", "-1"), ("--factor", "nan")])
def test_every_parity_command_refuses_a_tolerance_it_cannot_honour(
    tmp_path, call_main, small_export, command, option, value
):
    args = [*SMALL, "--out", tmp_path / "m"] if command == "export" else [small_export]
    if command == "triton":
        args += ["--repo", tmp_path / "repo"]
    code, _, err = call_main(command, *args, option, value)
    assert f"{option[2:]} must be a finite number >= 0, got" in assert_one_line_error(code, err)
    assert list(tmp_path.iterdir()) == []  # refused before any work


def test_export_refused_by_parity_says_what_failed_in_one_line(tmp_path, call_main):
    # atol 0 and factor 0 allow no error at all: even eager float32 fails, on every case.
    code, _, err = call_main(
        "export", *SMALL, "--out", tmp_path / "m", "--atol", "0", "--factor", "0"
    )

    line = assert_one_line_error(code, err, expected_code=1)
    assert line.startswith(f"error: parity failed for the export to {tmp_path / 'm'}: ")
    for part in ("checks failed; worst: ", ", case ", ", output ", "> allowed 0.00e+00"):
        assert part in line, line
    assert "(float32 floor " in line and "--keep-failed DIR" in line
    assert list(tmp_path.iterdir()) == []


def test_export_keep_failed_writes_artifacts_and_report(tmp_path, call_main):
    kept = tmp_path / "failed"
    code, _, err = call_main(
        "export", *SMALL, "--out", tmp_path / "m", "--factor", "0", "--atol", "0",
        "--keep-failed", kept,
    )  # fmt: skip
    line = assert_one_line_error(code, err, expected_code=1)
    assert f"the artifacts and parity.json are in {kept}" in line
    assert sorted(p.name for p in kept.iterdir()) == ["model.onnx", "model.pt", "parity.json"]
    assert json.loads((kept / "parity.json").read_text())["passed"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failed"]
    # Kept folders are never overwritten: a second refusal into it is refused up front.
    code, _, err = call_main("export", *SMALL, "--out", tmp_path / "m", "--keep-failed", kept)
    assert "--keep-failed needs a new folder" in assert_one_line_error(code, err)


# --------------------------------------------------------------------------- verify


def test_verify_table_shows_each_backends_worst_case_in_100_columns(small_export, call_main):
    code, out, _ = call_main("verify", small_export)
    assert code == 0
    lines = out.splitlines()
    assert max(map(len, lines)) <= 100, out  # the table, and the verdict wrapped as prose
    assert lines[1] == "pass: error <= max(atol, factor x floor); atol 1e-05, factor 8"
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["backend", "case"])
    assert lines[header].split() == [
        "backend",
        "case",
        "out",
        "error",
        "allowed",
        "floor",
        "result",
    ]
    rows = [line for line in lines[header + 2 :] if line.strip() and " ok" in line]
    backends = ["eager", "torchscript", "onnxruntime", "onnxruntime batch-first"]
    assert len(rows) == 4
    assert [" ".join(r.split()[: len(b.split())]) for r, b in zip(rows, backends, strict=True)] == (
        backends
    )
    checks = 4 * len(default_cases())  # eager, torchscript, onnxruntime, batch-first
    verdict = " ".join(out[out.index("Parity passed: ") :].split())
    assert verdict.startswith(f"Parity passed: {checks} checks passed; closest: ")

    code, out, _ = call_main("verify", small_export, "--all")
    assert code == 0
    assert sum(" ok" in line for line in out.splitlines()) == checks  # every case x backend
    assert "each backend's worst case" not in out and "every case" in out


def test_verify_passes_on_a_fresh_export(small_export):
    result = invoke("verify", small_export, "--json")

    assert result.exit_code == 0, (result.output, result.exception)
    report = json.loads(result.stdout)
    assert report["passed"] is True
    assert report["problems"] == []
    assert {r["backend"] for r in report["results"]} >= {"torchscript", "onnxruntime"}
    assert all(r["passed"] for r in report["results"])


def _perturbed_onnx_copy(source: Path, dest: Path) -> Path:
    """A copy of an export whose model.onnx carries one weight changed by 0.25."""
    shutil.copytree(source, dest)
    model = onnx.load(str(dest / "model.onnx"))
    biggest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    array = numpy_helper.to_array(biggest).copy()
    array.flat[0] += 0.25
    biggest.CopyFrom(numpy_helper.from_array(array, biggest.name))
    onnx.save(model, str(dest / "model.onnx"))
    return dest


def test_verify_breach_exits_1_in_a_real_process(small_export, tmp_path):
    folder = _perturbed_onnx_copy(small_export, tmp_path / "tampered")

    proc = run_cli("verify", folder, "--json", cwd=tmp_path)

    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] is False
    assert any("model.onnx" in p and "sha256" in p for p in report["problems"])
    failed = {r["backend"] for r in report["results"] if not r["passed"]}
    # model.onnx changed: its batch-first variant (derived from it) fails with it.
    assert failed == {"onnxruntime", "onnxruntime batch-first"}


def test_verify_detects_a_changed_manifest_hash(small_export, tmp_path, call_main):
    folder = tmp_path / "copy"
    shutil.copytree(small_export, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"]["model.pt"]["sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))

    code, out, err = call_main("verify", folder)

    assert_one_line_error(code, err, expected_code=1)
    assert "model.pt" in out and "sha256" in out  # the problem is named
    assert "onnxruntime" in out and "FAIL" not in out  # while every backend agreed


def test_verify_without_manifest_fails(small_export, tmp_path, call_main):
    folder = tmp_path / "copy"
    shutil.copytree(small_export, folder)
    (folder / "manifest.json").unlink()

    code, out, err = call_main("verify", folder, "--json")

    assert_one_line_error(code, err, expected_code=1)
    assert json.loads(out)["passed"] is False


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(lambda d: d / "nope", "nope", id="missing"),
        pytest.param(lambda d: (d / "model.onnx").unlink() or d, "model.onnx", id="no-onnx"),
        pytest.param(lambda d: (d / "model.pt").unlink() or d, "model.pt", id="no-pt"),
        pytest.param(
            lambda d: (d / "model.pt").write_bytes(b"garbage") and d, "model.pt", id="garbage-pt"
        ),
        pytest.param(
            lambda d: (d / "model.onnx").write_bytes(b"garbage") and d,
            "model.onnx",
            id="garbage-onnx",
        ),
        pytest.param(
            lambda d: (d / "manifest.json").write_text("{not json") and d,
            "manifest.json",
            id="manifest-not-json",
        ),
        pytest.param(
            lambda d: (d / "manifest.json").write_text('{"artifacts": ["model.pt"]}') and d,
            "manifest.json",
            id="manifest-artifacts-not-a-table",
        ),
    ],
)
def test_verify_bad_folder_is_one_line_exit_2(small_export, tmp_path, call_main, make, expected):
    folder = tmp_path / "copy"
    shutil.copytree(small_export, folder)

    code, _, err = call_main("verify", make(folder))

    assert expected in assert_one_line_error(code, err)


# --------------------------------------------------------------------------- inspect


def test_inspect_folder_json(small_export):
    result = invoke("inspect", small_export, "--json")

    assert result.exit_code == 0, (result.output, result.exception)
    info = json.loads(result.stdout)
    assert info["kind"] == "export folder"
    assert info["manifest"]["name"] == "small"
    assert info["manifest"]["config"] == SMALL_CONFIG.to_dict()
    assert info["manifest"]["parity"]["passed"] is True
    assert set(info["files"]) == {"model.pt", "model.onnx"}
    for entry in info["files"].values():
        assert entry["config"] == SMALL_CONFIG.to_dict()


def test_inspect_onnx_json(small_export):
    result = invoke("inspect", small_export / "model.onnx", "--json")

    assert result.exit_code == 0, (result.output, result.exception)
    info = json.loads(result.stdout)
    assert info["kind"] == "onnx"
    assert info["opset"]["ai.onnx"] == 17
    assert info["bytes"] == (small_export / "model.onnx").stat().st_size
    assert info["signature"]["inputs"]["x"]["shape"] == ["seq", "batch", 4]
    assert info["signature"]["outputs"]["hn"]["shape"] == [1, "batch", 8]
    weights = sum(p.numel() for p in build_model(SMALL_CONFIG).parameters())
    assert info["parameters"] >= weights


@pytest.mark.slow  # the shared fused export builds both kernel libraries
def test_inspect_shows_model_fused_onnx_and_the_library_it_needs(fused_onnx_export):
    result = invoke("inspect", fused_onnx_export, "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    files = json.loads(result.stdout)["files"]
    assert set(files) == {"model.pt", "model.onnx", "model.fused.pt", "model.fused.onnx"}
    fused = files["model.fused.onnx"]
    assert (
        fused["op_library"] == "liblstm_export_ort_ops.so"
        and "op_library" not in files["model.onnx"]
    )
    assert fused["opset"] == {"ai.onnx": 17, "lstm_export": 1}
    assert fused["config"] == files["model.onnx"]["config"] and fused["takes_lengths"] is True
    assert fused["signature"] == files["model.onnx"]["signature"]
    shown = CliRunner().invoke(cli.app, ["inspect", str(fused_onnx_export)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, (shown.output, shown.exception)
    assert "model.fused.onnx (onnx)" in shown.stdout
    assert "ai.onnx=17 lstm_export=1" in shown.stdout and "op_library" in shown.stdout


def test_inspect_torchscript_json(small_export):
    result = invoke("inspect", small_export / "model.pt", "--json")

    assert result.exit_code == 0, (result.output, result.exception)
    info = json.loads(result.stdout)
    assert info["kind"] == "torchscript"
    assert info["config"] == SMALL_CONFIG.to_dict()
    assert info["parameters"] == sum(p.numel() for p in build_model(SMALL_CONFIG).parameters())
    assert "Tensor x" in info["forward"]


def test_inspect_table_shows_symbolic_shapes(small_export):
    result = invoke("inspect", small_export / "model.onnx")

    assert result.exit_code == 0, (result.output, result.exception)
    # x is [seq, batch, 4] and y [seq, batch, 8]; both must be shown, not swallowed.
    assert "[seq, batch, 4] float32" in result.stdout
    assert "[seq, batch, 8] float32" in result.stdout
    assert "[1, batch, 8] float32" in result.stdout


OLD_EXPORTS = Path(__file__).parent.parent / "data"


@pytest.mark.parametrize("kind", ["plain", "layer_norm"])
def test_inspect_an_export_written_before_the_layout_fields(kind):
    """tests/data: written before lengths, batch_first and bidirectional existed; read as
    time-major and unidirectional, without lengths, and nothing to warn about."""
    folder = OLD_EXPORTS / f"export_v2_{kind}"
    result = invoke("inspect", folder, "--json")

    assert result.exit_code == 0, (result.output, result.exception)
    info = json.loads(result.stdout)
    expected = LSTMConfig(5, 8, 2, kind == "layer_norm").to_dict()
    assert info["manifest"]["warnings"] == []
    assert set(info["files"]) == {"model.pt", "model.onnx"}
    for entry in info["files"].values():
        assert entry["config"] == expected  # batch_first and bidirectional False
        assert entry["takes_lengths"] is False
    table = invoke("inspect", folder / "model.onnx")
    assert table.exit_code == 0, (table.output, table.exception)
    assert "batch_first=False" in table.stdout and "bidirectional=False" in table.stdout
    assert "takes_lengths │ False" in table.stdout


def test_inspect_a_new_export_says_it_takes_lengths(small_export):
    for name in ("model.pt", "model.onnx"):
        result = invoke("inspect", small_export / name, "--json")
        assert result.exit_code == 0, (result.output, result.exception)
        assert json.loads(result.stdout)["takes_lengths"] is True, name


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        pytest.param("notes.txt", b"hello", "notes.txt", id="wrong-suffix"),
        pytest.param("garbage.pt", b"garbage", "garbage.pt", id="garbage-pt"),
        pytest.param("garbage.onnx", b"garbage", "garbage.onnx", id="garbage-onnx"),
        pytest.param("missing.onnx", None, "missing.onnx", id="missing"),
        pytest.param("empty", "dir", "empty", id="empty-folder"),
    ],
)
def test_inspect_bad_path_is_one_line_exit_2(tmp_path, call_main, name, content, expected):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)

    code, _, err = call_main("inspect", path)

    assert expected in assert_one_line_error(code, err)


def test_inspect_a_state_dict_pt_is_refused(tmp_path, call_main):
    torch.save(LSTM(4, 8, 1).state_dict(), tmp_path / "weights.pt")
    code, _, err = call_main("inspect", tmp_path / "weights.pt")
    assert "weights.pt" in assert_one_line_error(code, err)


def test_inspect_folder_with_a_manifest_that_is_not_an_object(small_export, tmp_path, call_main):
    folder = tmp_path / "copy"
    shutil.copytree(small_export, folder)
    (folder / "manifest.json").write_text("[1, 2, 3]")

    code, _, err = call_main("inspect", folder)

    assert "manifest.json" in assert_one_line_error(code, err)


def test_export_summary_shows_bracketed_text_verbatim(tmp_path):
    # Rich would swallow "[batch, 4, hidden]" and "[x]" paths as markup.
    out = tmp_path / "odd [x]"  # a folder name no model name may be: --name gives one
    args = ("--input-size", "3", "--hidden-size", "4", "--name", "odd", "--out", out)
    done = run_cli("export", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "one layer_norm over [batch, 4, hidden] per step" in done.stdout
    assert f"{out / 'model.onnx'}" in done.stdout


# --------------------------------------------------------------------------- untrusted artifacts


def _onnx_with_config(source: Path, dest: Path, text: str) -> Path:
    """A copy of `source` whose lstm_export.config metadata is `text`."""
    model = onnx.load(str(source))
    entry = next(p for p in model.metadata_props if p.key == "lstm_export.config")
    entry.value = text
    onnx.save(model, str(dest))
    return dest


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("{not json", "is not valid JSON", id="invalid-json"),
        pytest.param("[1, 2]", "expected an object with keys input_size", id="a-list"),
        pytest.param(
            '{"input_size": 0, "hidden_size": 8, "num_layers": 1, "layer_norm": false}',
            "input_size must be an integer >= 1, got 0",
            id="zero-input",
        ),
        pytest.param('{"input_size": 4}', "missing key(s)", id="missing-keys"),
    ],
)
def test_inspect_onnx_with_a_bad_config_is_one_line_exit_2(
    small_export, tmp_path, call_main, text, expected
):
    path = _onnx_with_config(small_export / "model.onnx", tmp_path / "model.onnx", text)

    code, _, err = call_main("inspect", path)

    line = assert_one_line_error(code, err)
    assert "lstm_export.config" in line and expected in line, line


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_torchscript_without_layer_norm_attribute_is_one_line_exit_2(
    small_export, tmp_path, call_main, command
):
    folder = tmp_path / "copy"
    shutil.copytree(small_export, folder)
    torch.jit.save(torch.jit.script(SizesWithoutLayerNorm()), str(folder / "model.pt"))

    code, _, err = call_main(command, folder / "model.pt" if command == "inspect" else folder)

    line = assert_one_line_error(code, err)
    assert "model.pt" in line and "lacks layer_norm" in line, line


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_torchscript_with_invalid_config_json_is_one_line_exit_2(
    small_export, tmp_path, call_main, command
):
    folder = tmp_path / "copy"
    shutil.copytree(small_export, folder)
    module = torch.jit.load(str(small_export / "model.pt"), map_location="cpu")
    torch.jit.save(module, str(folder / "model.pt"), _extra_files={"config.json": "{oops"})

    code, _, err = call_main(command, folder / "model.pt" if command == "inspect" else folder)

    line = assert_one_line_error(code, err)
    assert "config.json is not valid JSON" in line, line


def test_inspect_folder_whose_manifest_parity_is_a_list_is_one_line_exit_2(
    small_export, tmp_path, call_main
):
    folder = tmp_path / "copy"
    shutil.copytree(small_export, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["parity"] = [1, 2]
    (folder / "manifest.json").write_text(json.dumps(manifest))

    code, _, err = call_main("inspect", folder)

    line = assert_one_line_error(code, err)
    assert "expected parity to be an object, got list" in line, line


def test_verify_with_an_empty_artifacts_table_fails(small_export, tmp_path, call_main):
    folder = tmp_path / "copy"
    shutil.copytree(small_export, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"] = {}
    (folder / "manifest.json").write_text(json.dumps(manifest))

    code, out, err = call_main("verify", folder, "--json")

    assert_one_line_error(code, err, expected_code=1)
    problems = json.loads(out)["problems"]
    assert any(p.startswith("model.pt is not listed") for p in problems), problems
    assert any(p.startswith("model.onnx is not listed") for p in problems), problems


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/model.pt", ".."])
def test_verify_refuses_artifact_names_outside_the_folder(
    small_export, tmp_path, call_main, monkeypatch, name
):
    import lstm_export.verification.folder as verification

    folder = tmp_path / "copy"
    shutil.copytree(small_export, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"][name] = {"sha256": "0" * 64}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    hashed = []
    real_sha256 = verification.sha256
    monkeypatch.setattr(verification, "sha256", lambda p: hashed.append(p) or real_sha256(p))

    code, _, err = call_main("verify", folder)

    line = assert_one_line_error(code, err)
    assert "plain file names" in line and repr(name) in line, line
    assert hashed == []  # refused before reading anything


@pytest.mark.parametrize("option", ["--atol", "--factor"])
@pytest.mark.parametrize("value", ["-1", "nan", "inf", "-0.5"])
def test_verify_refuses_a_tolerance_that_is_not_a_finite_number_at_least_0(
    small_export, call_main, option, value
):
    code, _, err = call_main("verify", small_export, option, value)

    line = assert_one_line_error(code, err)
    assert f"{option[2:]} must be a finite number >= 0" in line, line


# --------------------------------------------------------------------------- progress


@pytest.mark.slow  # two exports of the default sizes (the spinner needs time to draw)
def test_export_shows_its_steps_on_a_terminal_and_nothing_when_piped(
    monkeypatch, call_main, tmp_path
):
    import io

    from rich.console import Console

    from lstm_export.cli import base, export

    def stderr_to(console: Console) -> None:  # the spinner is base's, the notes export's
        for module in (base, export):
            monkeypatch.setattr(module, "err", console)

    screen = io.StringIO()
    stderr_to(Console(file=screen, force_terminal=True, width=120))
    code, _, _ = call_main("export", "--out", tmp_path / "shown", "--hidden-size", "8")
    assert code == 0
    shown = screen.getvalue()
    # A spinner redraws ~12 times a second, so only steps that last are sure to be drawn.
    for step in ("Loading torch", "Verifying parity: every artifact against the eager model"):
        assert step in shown, shown[-500:]

    piped = io.StringIO()
    stderr_to(Console(file=piped, force_terminal=False))
    code, _, _ = call_main("export", "--out", tmp_path / "piped", "--hidden-size", "8")
    assert code == 0
    assert piped.getvalue() == ""  # CI logs stay free of spinner frames


def test_text_from_a_checkpoint_is_printed_with_control_characters_escaped(tmp_path, call_main):
    """A key holding ANSI escapes must not recolour the terminal (issue 11)."""
    state = LSTM(4, 8, 1).state_dict()
    state["cells.0.\x1b[31mred\x1b[0m"] = torch.zeros(1)
    torch.save(state, tmp_path / "ansi.pt")

    code, _, err = call_main(
        "export", "--checkpoint", tmp_path / "ansi.pt", "--out", tmp_path / "m"
    )

    line = assert_one_line_error(code, err)
    assert "\x1b" not in err and "cells.0.\\x1b[31mred\\x1b[0m" in line, line
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- export folders


def _export_small(out: Path, call_main, *extra: object) -> None:
    code, _, err = call_main("export", *SMALL, "--out", out, *extra)
    assert code == 0, err


def test_force_refuses_a_folder_of_sibling_exports(tmp_path, call_main):
    models = tmp_path / "models"
    for name in ("a", "b"):
        _export_small(models / name, call_main)
    before = {name: snapshot(models / name) for name in ("a", "b")}

    code, _, err = call_main("export", *SMALL, "--out", models, "--force")

    assert "neither empty nor an lstm-export export" in assert_one_line_error(code, err)
    assert {name: snapshot(models / name) for name in ("a", "b")} == before
    assert sorted(p.name for p in models.iterdir()) == ["a", "b"]


def test_force_never_deletes_the_checkpoint_being_exported(tmp_path, call_main):
    out = tmp_path / "m"
    _export_small(out, call_main)
    checkpoint = out / "good.pt"
    torch.save(LSTM(4, 8, 1, False).state_dict(), checkpoint)
    before = snapshot(out)

    code, _, err = call_main("export", "--checkpoint", checkpoint, "--out", out, "--force")

    assert "is inside --out" in assert_one_line_error(code, err)
    assert snapshot(out) == before


def test_force_replaces_an_empty_folder(tmp_path, call_main):
    out = tmp_path / "empty"
    out.mkdir()
    _export_small(out, call_main, "--force")
    assert sorted(p.name for p in out.iterdir()) == sorted(ARTIFACTS)


def test_force_refuses_the_current_folder(tmp_path, call_main, monkeypatch):
    out = tmp_path / "m"
    _export_small(out, call_main)
    before = snapshot(out)
    monkeypatch.chdir(out)
    for where in (".", tmp_path):  # the current folder, and one that holds it
        code, _, err = call_main("export", *SMALL, "--out", where, "--force")
        assert "current folder" in assert_one_line_error(code, err)
    assert snapshot(out) == before


def test_a_model_name_triton_would_refuse_is_refused_by_export_first(tmp_path, call_main):
    for args in (["--out", tmp_path / "modèle"], ["--name", "a\n", "--out", tmp_path / "x"]):
        code, _, err = call_main("export", *SMALL, *args)
        assert "model name" in assert_one_line_error(code, err) or "--name" in err
    assert list(tmp_path.iterdir()) == []


def test_two_exports_to_one_folder_at_once_one_wins_the_other_refuses(tmp_path):
    env = {**os.environ, "COLUMNS": "200"}
    command = [sys.executable, "-m", "lstm_export.cli", "export", *SMALL, "--out", "m"]
    procs = [
        subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refusal = next(err for code, err in results if code == 2)
    assert "another lstm-export process is writing" in refusal or "already exists" in refusal
    assert "Traceback" not in refusal
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no lock, no staging left
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["artifacts"]["model.onnx"]["sha256"] == sha256(tmp_path / "m" / "model.onnx")


_FULL_DISK = """
import resource, sys
from lstm_export import cli
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # every file at most `limit` bytes
sys.argv = ["lstm-export", *sys.argv[2:]]
cli.main()
"""


@pytest.mark.parametrize(
    ("limit", "failing"),
    [(4_000, "model.pt"), (30_000, "manifest.json")],  # model.pt ~15 kB, manifest ~50 kB
)
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, limit, failing):
    parent = tmp_path / "exports"
    result = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(limit), "export", *SMALL, "--out", parent / "m"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )
    line = assert_one_line_error(result.returncode, result.stderr)
    assert "File too large" in line and failing in line, line
    assert "nothing was changed" in line
    assert list(tmp_path.iterdir()) == []  # neither the staging folder nor exports/


_LONG = "x" * 300  # one path component over the 255 bytes filesystems allow


@pytest.mark.parametrize(
    "args",
    [
        ["export", *SMALL, "--out", f"{_LONG}/m"],
        ["export", "--checkpoint", f"{_LONG}.pt"],
        ["export", "--config", f"{_LONG}.toml"],
        ["verify", _LONG],
        ["inspect", f"{_LONG}.onnx"],
        ["cpp-check", _LONG],
        ["triton", _LONG],
        ["serve", _LONG],
        ["serve-bench", _LONG],
        ["bench", _LONG, "--no-export-timing", "--no-cpp"],
    ],
    ids=lambda args: args[0] + ("-" + args[1].lstrip("-") if args[0] == "export" else ""),
)
def test_a_path_component_too_long_is_one_line_exit_2(tmp_path, monkeypatch, call_main, args):
    monkeypatch.chdir(tmp_path)
    code, _, err = call_main(*args)
    assert_one_line_error(code, err)
    assert list(tmp_path.iterdir()) == []


def test_an_internal_error_is_exit_3_with_a_debug_hint(call_main, monkeypatch):
    import lstm_export.inspection as inspection

    def bug(path):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(inspection, "inspect", bug)
    code, _, err = call_main("inspect", "anything")
    line = assert_one_line_error(code, err, expected_code=3)
    assert "internal error: ZeroDivisionError: division by zero second line" in line
    assert "--debug" in line

    code, _, err = call_main("--debug", "inspect", "anything")
    assert code == 3
    assert "Traceback" in err and "ZeroDivisionError" in err  # the traceback on request
    assert err.strip().splitlines()[-1].startswith("error: internal error")


def _catches_sigterm(pid: int) -> bool:
    """Whether process `pid` has a handler for SIGTERM yet (Linux: SigCgt in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_torch_loads_is_one_line_and_the_signals_code(tmp_path, signum):
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lstm_export.cli", "export", *SMALL, "--out", "m"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not _catches_sigterm(proc.pid):  # the export command has begun: torch loads next
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the export never installed its handler"
            time.sleep(0.005)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    expected = {signal.SIGTERM: (143, "terminated"), signal.SIGINT: (130, "interrupted")}[signum]
    assert expected[1] in assert_one_line_error(proc.returncode, err, expected[0])
    assert list(tmp_path.iterdir()) == []


def test_running_out_of_memory_is_bad_input_not_a_bug(call_main, monkeypatch):
    import lstm_export.inspection as inspection

    def allocate(path):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: "
            "can't allocate memory: you tried to allocate 160 GB"
        )

    monkeypatch.setattr(inspection, "inspect", allocate)
    line = assert_one_line_error(*call_main("inspect", "anything")[::2])
    assert line.startswith("error: out of memory:") and "bug" not in line
