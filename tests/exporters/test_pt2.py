"""model.pt2 (export --pt2): torch.export + AOTInductor, proven against the float64 model.

The packages are the session's two exports (conftest: `pt2_export`, the default LayerNorm
model through the CLI; `plain_pt2_export`, a plain bidirectional batch-first one), compiled
once; the tests only read them.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (
    compilers_working_in,
    interrupt_once_started,
    live_processes,
    run_python,
    wait_until_gone,
)
from lstm_export.artifacts import (
    CONFIG_KEY,
    KERNEL_LIBRARY,
    MANIFEST_FILE,
    PT2_FILE,
    PT2_MODELS,
    TORCHSCRIPT_FILE,
)
from lstm_export.config import LSTMConfig, read_export_config
from lstm_export.errors import UsageError
from lstm_export.exporters.pt2_package import _cpus
from lstm_export.exporters.torchscript import load_torchscript
from lstm_export.runtime.pt2 import Pt2LSTM
from lstm_export.verification.backends import PT2_BACKEND
from lstm_export.verification.cases import Case, case_lengths
from lstm_export.verification.folder import verify
from lstm_export.verification.parity import (
    Reference,
    Tolerance,
    eager_from_scripted,
    max_abs_errors,
)

pytestmark = pytest.mark.slow  # every test here reads a compiled package

SHAPES = [(seq, batch) for seq in (1, 2, 17, 300) for batch in (1, 5)]
"""The issue's shapes: seq 1, 2, 17, 300 by batch 1 and 5."""
LONG_SKIPPED = ("model_state", "model_lengths")
"""At seq 300 only `model` and `model_state_lengths` (the default form and the one with every
input) are held to the float64 reference, whose seq-300 runs are most of this test's time;
the fresh interpreter still runs all four there, and every form runs at seq 1 to 17."""

# A deployer's script: no lstm_export (its import is made to fail), only torch, the op
# library beside the package, and aoti_load_package. It runs the four call forms on the
# inputs in IN and writes every output to OUT.
FRESH = """
import sys
sys.modules["lstm_export"] = None  # proof that nothing of ours is imported
import numpy as np, torch
from torch._inductor import aoti_load_package
from torch._inductor.package import load_package
folder, work = sys.argv[1], sys.argv[2]
torch.ops.load_library(folder + "/lstm_export_kernels.so")
package = folder + "/model.pt2"
models = {"model": aoti_load_package(package)}
for name in ("model_state", "model_lengths", "model_state_lengths"):
    models[name] = load_package(package, name)
cases = np.load(work + "/cases.npz")
for key in sorted({k.split("/")[0] for k in cases.files}):
    x = torch.from_numpy(cases[key + "/x"])
    state = (torch.from_numpy(cases[key + "/h0"]), torch.from_numpy(cases[key + "/c0"]))
    lengths = torch.from_numpy(cases[key + "/lengths"])
    calls = {
        "model": lambda: models["model"](x),
        "model_state": lambda: models["model_state"](x, state),
        "model_lengths": lambda: models["model_lengths"](x, None, lengths),
        "model_state_lengths": lambda: models["model_state_lengths"](x, state, lengths),
    }
    for name, call in calls.items():
        y, (h, c) = call()
        np.save(f"{work}/{key}-{name}-h.npy", h.numpy())
        np.save(f"{work}/{key}-{name}-c.npy", c.numpy())
        np.save(f"{work}/{key}-{name}-y.npy", y.numpy())
print("ran", len(calls) * len({k.split("/")[0] for k in cases.files}))
"""


def _inputs(config: LSTMConfig, seq: int, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((seq, batch, config.input_size), dtype=np.float32)
    if config.batch_first:
        x = np.ascontiguousarray(x.transpose(1, 0, 2))
    shape = (config.state_layers, batch, config.hidden_size)
    lengths = case_lengths(Case(seq, batch, True, ragged=True))
    return {
        "x": x,
        "h0": 0.5 * rng.standard_normal(shape, dtype=np.float32),
        "c0": rng.standard_normal(shape, dtype=np.float32),
        "lengths": lengths,
    }


@pytest.mark.parametrize("which", ["pt2_export", "plain_pt2_export"])
def test_a_fresh_interpreter_without_lstm_export_runs_every_form_within_the_parity_rule(
    which, request, tmp_path
):
    folder: Path = request.getfixturevalue(which)
    scripted, config = load_torchscript(folder / TORCHSCRIPT_FILE)
    # Eager float64 on model.pt's weights; the float32 floor from 4 realizations, not 16: a
    # lower floor only makes the rule stricter, and the 32 seq-300 runs cost a minute less.
    reference = Reference(eager_from_scripted(scripted, config), realizations=4)
    cases = {
        f"{seq}x{batch}": _inputs(config, seq, batch, seq * 10 + batch) for seq, batch in SHAPES
    }
    np.savez(
        tmp_path / "cases.npz", **{f"{k}/{n}": a for k, v in cases.items() for n, a in v.items()}
    )
    done = run_python(FRESH, folder, tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ran", str(4 * len(SHAPES))]
    tolerance, checked = Tolerance(), 0
    for key, inputs in cases.items():
        for name, (with_state, with_lengths) in PT2_MODELS.items():
            if key.startswith("300x") and name in LONG_SKIPPED:
                continue
            x = inputs["x"]
            state = (inputs["h0"], inputs["c0"]) if with_state else None
            lengths = inputs["lengths"] if with_lengths else None
            expected = reference.expected(x, state, lengths)
            floors = reference.floor(
                x, state, expected, reference.eager.run(x, state, lengths), lengths
            )
            got = [np.load(tmp_path / f"{key}-{name}-{o}.npy") for o in ("y", "h", "c")]
            errors = max_abs_errors(got, expected)
            for output, error, floor in zip("yhc", errors, floors, strict=True):
                allowed = tolerance.allowed(floor)
                assert error <= allowed, (
                    f"{which} {name} {key} {output}: {error:.2e} > {allowed:.2e}"
                )
                checked += 1
    assert checked == 3 * (4 * len(SHAPES) - 2 * len(LONG_SKIPPED))


def test_the_default_export_records_model_pt2_and_its_library(pt2_export):
    manifest = json.loads((pt2_export / MANIFEST_FILE).read_text())
    entry = manifest["artifacts"][PT2_FILE]
    assert entry["requires"] == KERNEL_LIBRARY and KERNEL_LIBRARY in manifest["artifacts"]
    assert entry["torch"] == torch.__version__
    assert "layer_norm_lstm_layer" in entry["route"]
    assert entry["models"] == {
        "model": "forward(x)",
        "model_state": "forward(x, (h0, c0))",
        "model_lengths": "forward(x, None, lengths)",
        "model_state_lengths": "forward(x, (h0, c0), lengths)",
    }
    assert entry["cpu_isa"]
    rows = {r["backend"] for r in manifest["parity"]["results"]}
    assert PT2_BACKEND in rows  # export proved it before writing the folder
    package = Pt2LSTM(pt2_export)
    assert package.config == LSTMConfig()  # the default model, read from the metadata
    assert json.loads(package.metadata()[CONFIG_KEY]) == manifest["config"]


def test_a_plain_package_runs_aten_lstm_and_verify_proves_it(plain_pt2_export):
    manifest = json.loads((plain_pt2_export / MANIFEST_FILE).read_text())
    assert "lstm_export::aten_lstm" in manifest["artifacts"][PT2_FILE]["route"]
    report = verify(plain_pt2_export)
    assert report.passed, report.summary()
    pt2_rows = [r for r in report.results if r.backend == PT2_BACKEND]
    assert any(r.inputs.get("lengths") for r in pt2_rows)  # the ragged cases ran through it
    assert len(pt2_rows) == len([r for r in report.results if r.backend == "torchscript"])


def test_verify_fails_a_package_whose_weights_were_nudged(plain_pt2_export, tmp_path):
    """The other way round: one weight of the compiled model off by 1e-3 is caught."""
    package = Pt2LSTM(plain_pt2_export)
    scripted, config = load_torchscript(plain_pt2_export / TORCHSCRIPT_FILE)
    reference = Reference.from_scripted(scripted, config)
    inputs = _inputs(config, 17, 5, 0)
    x = torch.from_numpy(inputs["x"])
    y, (h, c) = package(x)
    expected = reference.expected(inputs["x"], None)
    floors = reference.floor(
        inputs["x"], None, expected, reference.eager.run(inputs["x"], None, None)
    )
    errors = max_abs_errors((y.numpy(), h.numpy(), c.numpy()), expected)
    assert all(e <= Tolerance().allowed(f) for e, f in zip(errors, floors, strict=True))
    compiled = package._model("model")
    fqn = next(n for n in compiled.get_constant_fqns() if n.endswith("cells.0.hidden_lin.weight"))
    nudged = scripted.state_dict()["cells.0.hidden_lin.weight"].clone()
    nudged[0, 0] += 1e-3
    compiled.load_constants({fqn: nudged}, check_full_update=False)
    y, (h, c) = package(x)
    errors = max_abs_errors((y.numpy(), h.numpy(), c.numpy()), expected)
    assert any(e > Tolerance().allowed(f) for e, f in zip(errors, floors, strict=True))


def test_bad_inputs_are_refused_before_the_compiled_model_reads_them(pt2_export):
    """AOTInductor checks no shape: Pt2LSTM does, with the model's own messages."""
    package = Pt2LSTM(pt2_export)
    config = package.config
    with pytest.raises(ValueError, match=r"x must have shape \[seq>=1, batch>=1, input_size=64\]"):
        package(torch.zeros(3, 2, 8))
    with pytest.raises(ValueError, match="x must be a float32 tensor"):
        package(torch.zeros(3, 2, config.input_size, dtype=torch.float64))
    x = torch.zeros(3, 2, config.input_size)
    bad_state = (torch.zeros(1, 2, config.hidden_size), torch.zeros(1, 2, config.hidden_size))
    with pytest.raises(ValueError, match=r"h0 must have shape \[num_layers=2, batch=2"):
        package(x, bad_state)
    with pytest.raises(ValueError, match=r"lengths must each be in 1..seq=3, got 4"):
        package(x, None, torch.tensor([4, 1]))
    with pytest.raises(ValueError, match="lengths must be an int64 tensor, got int32"):
        package(x, None, torch.tensor([3, 1], dtype=torch.int32))


def test_a_file_that_is_not_our_package_is_one_line(tmp_path, pt2_export):
    junk = tmp_path / "model.pt2"
    junk.write_bytes(b"not a zip")
    with pytest.raises(UsageError, match=r"is not a \.pt2 package"):
        Pt2LSTM(junk)
    other = tmp_path / "other" / PT2_FILE
    other.parent.mkdir()
    with zipfile.ZipFile(pt2_export / PT2_FILE) as source, zipfile.ZipFile(other, "w") as copy:
        for item in source.infolist():  # the package without its "model" model
            if "/aotinductor/model/" not in item.filename:
                copy.writestr(item, source.read(item))
    with pytest.raises(
        UsageError,
        match=r"is not an lstm-export model\.pt2: it lacks the compiled model\(s\) model$",
    ):
        Pt2LSTM(other)


def test_verify_requires_the_kernel_library_beside_model_pt2(plain_pt2_export, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(plain_pt2_export, copy)
    (copy / KERNEL_LIBRARY).unlink()
    report = verify(copy)
    assert not report.passed
    assert any(KERNEL_LIBRARY in p and "missing" in p for p in report.problems)


def test_pt2_is_a_toml_switch(tmp_path):
    toml = tmp_path / "export.toml"
    toml.write_text("pt2 = true\n")
    assert read_export_config(toml).pt2 is True
    toml.write_text('pt2 = "yes"\n')
    with pytest.raises(UsageError, match="pt2 must be true or false, got str"):
        read_export_config(toml)


def test_inspect_reads_the_package_without_loading_it(pt2_export):
    from lstm_export.inspection import inspect

    info = inspect(pt2_export)["files"][PT2_FILE]
    assert info["models"] == sorted(PT2_MODELS) and info["takes_lengths"] is True
    assert info["config"] == LSTMConfig().to_dict()
    assert info["op_library"] == KERNEL_LIBRARY and info["cpu_isa"] != "not recorded"


def _pt2_compilers() -> dict[int, str]:
    """Live compilers working on a model.pt2 of ours (in an lstm-export-pt2-* work folder)."""
    return compilers_working_in("lstm-export-pt2-")


def _pt2_helpers() -> set[int]:
    """Live helper processes compiling a share of a model.pt2 (`exporters.pt2_package`)."""
    return set(live_processes(lambda argv: "lstm_export.exporters.pt2_package" in argv))


@pytest.mark.parametrize("ctrl_c,exit_code", [(False, 143), (True, 130)], ids=["sigterm", "ctrl-c"])
def test_an_interrupted_pt2_compile_stops_its_compilers_and_helper_and_leaves_nothing(
    tmp_path, ctrl_c, exit_code
):
    """AOTInductor's compilers are children in our process group and the helper process
    (and its compilers) in a session of its own: SIGTERM to the export (as a service manager
    sends it) and Ctrl-C to its process group (as a terminal sends it) must stop them all,
    not leave them running orphaned."""
    import sys

    compilers, helpers = set(_pt2_compilers()), _pt2_helpers()
    command = [sys.executable, "-m", "lstm_export.cli", "export", "--pt2", "--no-layer-norm"]
    command += ["--input-size", "3", "--hidden-size", "5", "--num-layers", "1"]
    log = tmp_path / "log"

    def ours_alive() -> tuple[bool, bool]:
        return bool(set(_pt2_compilers()) - compilers), bool(_pt2_helpers() - helpers)

    def started() -> bool:  # on one CPU the export compiles alone, with no helper
        compiling, helping = ours_alive()
        return compiling and (helping or _cpus() == 1)

    returncode = interrupt_once_started(
        [*command, "--out", str(tmp_path / "m")],
        log,
        started,
        "the pt2 compile",
        ctrl_c=ctrl_c,
    )
    assert returncode == exit_code, log.read_text()
    assert "Traceback" not in log.read_text()
    # Killed processes are reaped at once; an orphan lives on.
    assert wait_until_gone(lambda: any(ours_alive()), 5), ours_alive()
    assert not (tmp_path / "m").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.partial")]


def _rewritten(source: Path, target: Path, edit) -> Path:
    """A copy of the package `source` with `edit(name, data) -> data` applied to each member."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info)))
    return target


def test_a_damaged_package_is_never_loaded_so_verify_reports_it_instead_of_crashing(
    plain_pt2_export, tmp_path
):
    """Half of each compiled library cut off: loading it would kill the process (SIGBUS)
    before any error; its sha256 no longer matches the manifest, so it is not loaded."""
    copy = tmp_path / "copy"
    shutil.copytree(plain_pt2_export, copy)

    def cut(name: str, data: bytes) -> bytes:
        return data[: len(data) // 2] if name.endswith(".wrapper.so") else data

    _rewritten(plain_pt2_export / PT2_FILE, copy / PT2_FILE, cut)
    with pytest.raises(UsageError, match=r"does not match the sha256 .* not loaded"):
        Pt2LSTM(copy)
    report = verify(copy)  # in this process: it would not survive a load
    assert not report.passed
    assert any("model.pt2 was not checked" in p and "not loaded" in p for p in report.problems)
    assert PT2_BACKEND not in {r.backend for r in report.results}


def test_a_metadata_file_that_disagrees_with_the_compiled_model_is_refused(
    plain_pt2_export, tmp_path
):
    """The archive's metadata file (what inspect reads) says input_size 1; the loaded model
    says 5: the input checks would rest on the wrong one, so the package is refused."""

    def shrink(name: str, data: bytes) -> bytes:
        if "/aotinductor/model/" not in name or not name.endswith(".wrapper_metadata.json"):
            return data
        meta = json.loads(data)
        config = json.loads(meta[CONFIG_KEY])
        meta[CONFIG_KEY] = json.dumps({**config, "input_size": 1})
        return json.dumps(meta).encode()

    lone = _rewritten(plain_pt2_export / PT2_FILE, tmp_path / "lone" / PT2_FILE, shrink)
    with pytest.raises(UsageError, match="is not one model: its compiled model model records"):
        Pt2LSTM(lone)


def test_a_compile_failure_is_named_by_the_compilers_first_error_line():
    from lstm_export.exporters.pt2 import _why

    inductor = RuntimeError(
        "C++ compile error\n\nCommand:\ng++ /tmp/lstm-export-pt2-x/model/c.cpp -O3\n\nOutput:\n"
        "/tmp/lstm-export-pt2-x/model/c.cpp:7:3: error: 'foo' was not declared\n  7 | foo();\n"
    )
    assert _why(inductor) == (
        "RuntimeError: /tmp/lstm-export-pt2-x/model/c.cpp:7:3: error: 'foo' was not declared"
    )
    assert _why(ValueError("Constraints violated (seq)!\nmore")) == "Constraints violated (seq)!"
