"""verify: the matrix it covers, and that it catches real breaches."""

from __future__ import annotations

import json
import os
import resource
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import parity_corpus as corpus
from helpers import small_model, sparse_2500m
from lstm_export.artifacts import FUSED_ONNX_FILE, ORT_KERNEL_LIBRARY
from lstm_export.config import LSTMConfig
from lstm_export.errors import ParityError, UsageError
from lstm_export.exporters.batch_first import batch_first_onnx
from lstm_export.exporters.torchscript import quiet_torchscript
from lstm_export.files import sha256
from lstm_export.pipeline import export
from lstm_export.serving.triton import repository as triton_repository
from lstm_export.serving.triton import write_triton_repo
from lstm_export.verification import folder as verification
from lstm_export.verification.cases import default_cases
from lstm_export.verification.folder import verify

DATA = Path(__file__).parent.parent / "data"


@pytest.fixture(scope="module")
def _good_export_once(tmp_path_factory):
    return export(small_model(True, 2), tmp_path_factory.mktemp("good") / "m").out_dir


@pytest.fixture
def good_export(_good_export_once, tmp_path):
    """A copy of one export of this module's, for a test to change."""
    return shutil.copytree(_good_export_once, tmp_path / "m", symlinks=True)


def test_a_good_export_verifies(good_export):
    report = verify(good_export)
    assert report.passed and not report.problems
    assert {r.backend for r in report.results} == {
        "eager",
        "torchscript",
        "onnxruntime",
        "onnxruntime batch-first",
    }
    assert len(report.results) == 4 * len(default_cases())  # eager float32 has a row too


def test_tampered_onnx_weights_are_caught_by_hash_and_by_parity(good_export):
    path = good_export / "model.onnx"
    proto = onnx.load(str(path))
    weight = next(t for t in proto.graph.initializer if t.name == "b_layer1")
    values = np.frombuffer(weight.raw_data, np.float32)
    # Not a uniform shift: LayerNorm would cancel that exactly.
    noise = np.random.default_rng(0).standard_normal(values.shape).astype(np.float32)
    weight.raw_data = (values + 1e-3 * noise).tobytes()
    onnx.save(proto, str(path))
    report = verify(good_export)
    assert not report.passed
    assert any("model.onnx does not match" in p for p in report.problems)
    assert any(not r.passed for r in report.results if r.backend == "onnxruntime")

    # With the manifest updated to the new hash, parity alone still catches it.
    manifest_path = good_export / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["artifacts"]["model.onnx"]["sha256"] = sha256(path)
    manifest_path.write_text(json.dumps(manifest))
    report = verify(good_export)
    assert not report.problems and not report.passed


def test_verify_refuses_what_is_not_an_export(tmp_path):
    with pytest.raises(UsageError, match="not a directory"):
        verify(tmp_path / "missing")
    with pytest.raises(UsageError, match=r"lacks model\.pt, model\.onnx"):
        verify(tmp_path)


@pytest.mark.parametrize("keyword", ["atol", "factor"])
@pytest.mark.parametrize("value", [-1, -1e-9, float("nan"), float("inf"), "1e-5", True, None])
def test_a_tolerance_that_is_not_a_finite_number_at_least_0_is_refused(tmp_path, keyword, value):
    # Refused before anything is looked at: the folder is not even an export.
    message = f"{keyword} must be a finite number >= 0"
    with pytest.raises(UsageError, match=message):
        verify(tmp_path, **{keyword: value})
    with pytest.raises(UsageError, match=message):
        export(small_model(False, 1), tmp_path / "m", **{keyword: value})
    assert list(tmp_path.iterdir()) == []


def test_verify_requires_the_manifest_to_list_both_artifacts(good_export):
    manifest_path = good_export / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["artifacts"]["model.onnx"]
    manifest_path.write_text(json.dumps(manifest))

    report = verify(good_export)

    assert not report.passed
    assert report.problems == [
        "model.onnx is not listed in the manifest, so nothing vouches for it"
    ]
    assert all(r.passed for r in report.results)  # the backends agree; the manifest does not


def test_verify_reports_an_artifact_that_is_a_symlink(good_export, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the export")
    (good_export / "notes.txt").symlink_to(outside)
    manifest_path = good_export / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["artifacts"]["notes.txt"] = {"sha256": sha256(outside)}
    manifest_path.write_text(json.dumps(manifest))

    report = verify(good_export)

    assert report.problems == ["notes.txt is a symbolic link, not a file the export wrote"]


# --------------------------------------------------------------------------- subtle breakage
# Each breaks a sound export a little, re-hashes the manifest so that only parity can
# notice, and `lstm-export verify` must exit 1 naming a failing backend. Sizes: 2 layers
# (the state and batch-first breakages need more than one row of state), hidden 16.


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "layer_norm"])
def _sound_export_once(request, tmp_path_factory):
    model = corpus.trained_like(LSTMConfig(6, 16, 2, request.param), seed=3, norm_std=0.5)
    return export(model, tmp_path_factory.mktemp("sound") / "m").out_dir


@pytest.fixture
def sound_export(_sound_export_once, tmp_path):
    """A copy of one of this module's two sound exports, for a test to break."""
    return shutil.copytree(_sound_export_once, tmp_path / "m", symlinks=True)


def _verify_fails(call_main, folder, *backends: str) -> dict:
    """verify exits 1 with one line saying parity failed; exactly `backends` fail. One run,
    with --json: the rows are read from it (the table's FAIL marks: `test_a_layer_norm_...`)."""
    code, out, err = call_main("verify", folder, "--json")
    line = _one_line(code, err, expected_code=1)
    assert line.startswith("error: parity failed") and "--json" in line, line
    report = json.loads(out)
    assert not report["problems"], report["problems"]  # the hashes match: only parity can tell
    failed = {row["backend"] for row in report["results"] if not row["passed"]}
    assert failed == set(backends), report["worst"]
    return report


ONNX_ROWS = ("onnxruntime", "onnxruntime batch-first")


def test_a_layer_norm_epsilon_of_1e_3_in_model_onnx_fails(tmp_path, call_main):
    model = corpus.trained_like(LSTMConfig(6, 16, 2, True), seed=3, norm_std=0.5)
    folder = export(model, tmp_path / "m").out_dir
    corpus.set_layer_norm_epsilon(folder, 1e-3)
    _verify_fails(call_main, folder, *ONNX_ROWS)
    code, out, err = call_main("verify", folder)  # the table, as a person reads it
    assert code == 1 and err.startswith("error: parity failed")
    verdicts = {line.strip().split("  ")[0]: line.split()[-1] for line in _table_rows(out)}
    assert verdicts == {"eager": "ok", "torchscript": "ok"} | dict.fromkeys(ONNX_ROWS, "FAIL")


def _table_rows(out: str) -> list[str]:
    """The rows of verify's table: the lines that end in a result."""
    return [line for line in out.splitlines() if line.split()[-1:] in (["ok"], ["FAIL"])]


def test_one_weight_nudged_by_1e_3_in_model_onnx_fails(sound_export, call_main):
    corpus.nudge_onnx_weight(sound_export, 1e-3)
    _verify_fails(call_main, sound_export, *ONNX_ROWS)


def test_one_weight_nudged_by_1e_3_in_model_pt_fails(sound_export, call_main):
    # The reference is rebuilt from model.pt's weights, so it moves with them: the
    # artifacts that kept the true weights are the ones found to disagree.
    corpus.nudge_torchscript_weight(sound_export, 1e-3)
    _verify_fails(call_main, sound_export, *ONNX_ROWS)


def test_gates_i_and_f_swapped_in_model_pt_fails(sound_export, call_main):
    corpus.swap_gates_i_and_f(sound_export)
    _verify_fails(call_main, sound_export, *ONNX_ROWS)


def test_state_not_carried_between_chunks_fails(sound_export, call_main):
    corpus.drop_state_of_last_layer(sound_export)
    report = verify(sound_export)
    failing_cases = {r.case for r in report.failures}
    # Every case that starts from a state fails; a single chunk from zeros cannot tell.
    assert failing_cases == {c.label for c in default_cases() if c.initial_state or c.chunks}
    _verify_fails(call_main, sound_export, *ONNX_ROWS)


def test_a_batch_first_graph_that_reshapes_the_state_fails(sound_export, call_main, monkeypatch):
    real = batch_first_onnx

    def broken(proto):
        return corpus.reshape_state_instead_of_transposing(real(proto))

    monkeypatch.setattr(verification, "batch_first_onnx", broken)
    _verify_fails(call_main, sound_export, "onnxruntime batch-first")
    # `triton` runs the same engine before writing: it refuses, and writes nothing.
    monkeypatch.setattr(triton_repository, "batch_first_onnx", broken)
    repo = sound_export.parent / "repo"
    with pytest.raises(ParityError, match="onnxruntime batch-first, case "):
        write_triton_repo(sound_export, repo)
    assert not repo.exists()


# --------------------------------------------------------------------------- what the manifest
# claims (issue 11). One export, copied per test; each forgery edits the manifest alone (or one
# artifact and its hash), so nothing but the checks under test can notice.


@pytest.fixture(scope="module")
def claimed(tmp_path_factory):
    return export(small_model(True, 2), tmp_path_factory.mktemp("claimed") / "m").out_dir


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


def _forge(folder, **changes):
    """Rewrite manifest.json with `changes` (dotted keys reach inside: parity.passed)."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        target = manifest
        for parent in parents:
            target = target[parent]
        target[key] = value
    path.write_text(json.dumps(manifest))


def _one_line(code, err, expected_code):
    lines = err.strip().splitlines()
    assert code == expected_code and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


def _save_module(module, path, extra=None):
    with quiet_torchscript():
        torch.jit.save(torch.jit.script(module), str(path), _extra_files=extra or {})


class _SizesOnly(torch.nn.Module):
    """The four config attributes of our LSTM and no weights at all."""

    def __init__(self) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers, self.layer_norm = 5, 8, 2, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _OtherModel(_SizesOnly):
    """Our attributes, someone else's weights."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(5, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


DEEP = "[" * 100000


def _deep_config_json(folder):
    with quiet_torchscript():
        module = torch.jit.load(str(folder / "model.pt"), map_location="cpu")
        torch.jit.save(module, str(folder / "model.pt"), _extra_files={"config.json": DEEP})
    corpus.rehash(folder, "model.pt")


def _deep_metadata(folder):
    proto = onnx.load(str(folder / "model.onnx"))
    next(p for p in proto.metadata_props if p.key == "lstm_export.config").value = DEEP
    onnx.save(proto, str(folder / "model.onnx"))
    corpus.rehash(folder, "model.onnx")


@pytest.mark.parametrize("command", ["verify", "inspect"])
@pytest.mark.parametrize(
    ("deepen", "where"),
    [
        pytest.param(
            lambda d: (d / "manifest.json").write_text(DEEP), "manifest.json", id="manifest"
        ),
        pytest.param(_deep_metadata, "model.onnx lstm_export.config metadata", id="onnx-metadata"),
        pytest.param(_deep_config_json, "model.pt config.json", id="config-json"),
    ],
)
def test_json_nested_100000_deep_anywhere_is_one_line_exit_2(
    claimed, tmp_path, call_main, command, deepen, where
):
    folder = _copy(claimed, tmp_path)
    deepen(folder)

    line = _one_line(*call_main(command, folder)[::2], expected_code=2)

    assert f"{where} nests 100000 levels deep; expected at most 32" in line, line


def test_a_forged_config_fails_verify_naming_both_artifacts(claimed, tmp_path, call_main):
    folder = _copy(claimed, tmp_path)
    _forge(folder, **{"config.hidden_size": 999})

    report = verify(folder)
    code, _, err = call_main("verify", folder)

    assert not report.passed and all(r.passed for r in report.results)  # only the claim is false
    for artifact in ("model.pt", "model.onnx"):
        assert (
            "manifest.json records config {'input_size': 5, 'hidden_size': 999, 'num_layers': 2, "
            "'layer_norm': True, 'batch_first': False, 'bidirectional': False}, "
            f"but {artifact} holds {{'input_size': 5, 'hidden_size': 8, "
            "'num_layers': 2, 'layer_norm': True, 'batch_first': False, 'bidirectional': False}"
        ) in report.problems
    assert "manifest.json records config" in _one_line(code, err, expected_code=1)


@pytest.mark.parametrize("value", [1, "true"])
def test_a_config_claim_is_compared_strictly(claimed, tmp_path, value):
    # Python's 1 == True: a plain dict comparison would let `"layer_norm": 1` through.
    folder = _copy(claimed, tmp_path)
    _forge(folder, **{"config.layer_norm": value})

    problems = verify(folder).problems

    assert len(problems) == 1 and "manifest.json records no config of a model" in problems[0]
    assert "layer_norm must be true or false" in problems[0]


@pytest.mark.parametrize("name", ["../evil", "modèle", "a" * 129, 7])
def test_a_name_no_export_could_write_fails_verify(claimed, tmp_path, call_main, name):
    folder = _copy(claimed, tmp_path)
    _forge(folder, name=name)

    code, out, err = call_main("verify", folder, "--json")

    _one_line(code, err, expected_code=1)
    problems = json.loads(out)["problems"]
    assert problems == [
        "the name manifest.json records must be 1-128 ASCII letters, digits, '.', '_' or '-', "
        f"starting with a letter or digit; got {name!r}"
    ]


def test_versions_and_name_are_shown_as_recorded_at_export_not_verified(
    claimed, tmp_path, call_main
):
    folder = _copy(claimed, tmp_path)
    _forge(folder, **{"versions.torch": "9.9.9-forged"})

    notes = verify(folder).notes()
    code, out, err = call_main("verify", folder)

    assert code == 0, err  # nothing can check a version: it passes, labelled
    note = next(n for n in notes if "recorded at export" in n)
    assert note.startswith("recorded at export, not verified: name 'm', versions {")
    assert "'torch': '9.9.9-forged'" in note
    shown = " ".join(out.split())  # notes wrap at 100 columns
    assert f"note: {note}" in shown
    assert max(map(len, out.splitlines())) <= 100


def test_a_recorded_parity_report_is_never_trusted(claimed, tmp_path, call_main):
    # A sound export whose manifest says it failed: verify recomputes, passes, and says so.
    folder = _copy(claimed, tmp_path)
    _forge(folder, **{"parity.passed": False, "parity.worst_error": 1e9})
    code, out, _ = call_main("verify", folder)
    assert code == 0
    assert (
        "note: the manifest records parity passed=False at export; this check recomputed it "
        "(passed=True): a recorded report is never trusted"
    ) in " ".join(out.split())

    # A broken export whose manifest says it passed: verify fails it on the recomputed rows.
    broken = shutil.copytree(claimed, tmp_path / "broken")
    corpus.nudge_onnx_weight(broken, 1e-3)  # re-hashed: only parity can tell
    _forge(broken, **{"parity.passed": True, "parity.worst_error": 0.0, "parity.results": []})
    report = verify(broken)
    assert not report.problems and {r.backend for r in report.failures} == {
        "onnxruntime",
        "onnxruntime batch-first",
    }
    assert any("records parity passed=True" in note for note in report.notes())


def test_inspect_labels_the_manifest_as_recorded_and_warns_where_files_disagree(
    claimed, tmp_path, call_main
):
    folder = _copy(claimed, tmp_path)
    _forge(folder, name="../evil", **{"config.num_layers": 7, "versions.torch": "9.9"})

    code, out, _ = call_main("inspect", folder, "--json")
    assert code == 0
    recorded = json.loads(out)["manifest"]
    assert recorded["note"].startswith("recorded at export, not verified here")
    assert recorded["name"] == "../evil" and recorded["versions"]["torch"] == "9.9"
    warnings = recorded["warnings"]
    assert len(warnings) == 3, warnings
    assert warnings[0].startswith("the recorded config {'input_size': 5, 'hidden_size': 8, ")
    assert warnings[0].endswith(
        "differs from model.pt's {'input_size': 5, 'hidden_size': 8, "
        "'num_layers': 2, 'layer_norm': True, 'batch_first': False, 'bidirectional': False}"
    )
    assert "differs from model.onnx's" in warnings[1]
    assert warnings[2].endswith("got '../evil'")

    code, out, _ = call_main("inspect", folder)
    assert code == 0
    assert "  name (recorded): '../evil'" in out
    assert "'torch': '9.9'" in next(
        line for line in out.splitlines() if "versions (recorded)" in line
    )
    assert sum(line.startswith("warning: ") for line in out.splitlines()) == 3


@pytest.mark.parametrize("command", ["verify", "inspect"])
@pytest.mark.parametrize(
    ("module", "expected"),
    [
        pytest.param(_SizesOnly, "it holds 0 tensors, a 2-layer LSTM at least 6", id="no-weights"),
        pytest.param(_OtherModel, "2 unexpected: lin.weight, lin.bias", id="another-model"),
    ],
)
def test_a_scripted_module_without_our_weights_is_one_line_exit_2(
    claimed, tmp_path, call_main, command, module, expected
):
    folder = _copy(claimed, tmp_path)
    _save_module(module(), folder / "model.pt")
    corpus.rehash(folder, "model.pt")  # the manifest vouches for it: only its content is wrong

    line = _one_line(*call_main(command, folder)[::2], expected_code=2)

    assert f"{folder / 'model.pt'} does not hold the weights of the lstm-export LSTM" in line
    assert expected in line, line


def test_a_300_character_artifact_name_is_one_line_exit_2(claimed, tmp_path, call_main):
    folder = _copy(claimed, tmp_path)
    _forge(folder, **{"artifacts." + "a" * 300: {"sha256": "0" * 64}})

    line = _one_line(*call_main("verify", folder)[::2], expected_code=2)

    assert f"{folder / 'manifest.json'} is not a valid manifest" in line
    assert "(at most 255 bytes), got 'aaaa" in line and "(300 characters)" in line, line


# --------------------------------------------------------------------------- what inspect reads


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_inspect_refuses_a_2500_mb_onnx_before_reading_it(tmp_path, call_main):
    big = tmp_path / "big.onnx"
    sparse_2500m(big)
    before = _peak_rss_mib()

    line = _one_line(*call_main("inspect", big)[::2], expected_code=2)

    assert _peak_rss_mib() - before < 200  # reading it would take 2.4 GB and more
    assert line == (
        f"error: ONNX model {big} is 2,621,440,000 bytes; an ONNX model is one protobuf "
        "message, which holds at most 2,147,483,647 bytes (2 GiB)"
    )


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        pytest.param(lambda p: p.write_bytes(b""), "is empty (0 bytes)", id="empty"),
        pytest.param(lambda p: p.symlink_to("/dev/zero"), "it is a device", id="dev-zero"),
        pytest.param(os.mkfifo, "it is a named pipe", id="fifo"),
    ],
)
@pytest.mark.parametrize("name", ["x.onnx", "x.pt"])
def test_inspect_says_why_what_is_there_is_not_a_model(tmp_path, call_main, make, reason, name):
    path = tmp_path / name
    make(path)

    line = _one_line(*call_main("inspect", path)[::2], expected_code=2)

    assert str(path) in line and reason in line, line
    assert "does not exist" not in line and "not an lstm-export model" not in line


@pytest.mark.parametrize("kind", ["plain", "layer_norm"])
def test_an_export_written_before_lengths_still_verifies(kind, tmp_path):
    """tests/data holds exports of the previous version: no lengths input, no layout fields.
    They load as time-major and unidirectional and pass every case they can run."""
    folder = shutil.copytree(DATA / f"export_v2_{kind}", tmp_path / kind)
    report = verify(folder)
    assert report.passed, report.summary()
    ran = {r.case for r in report.results}
    assert ran == {c.label for c in default_cases() if not c.ragged}
    assert any("predate padded batches" in note for note in report.notes())


def test_a_new_export_runs_the_ragged_cases(good_export):
    report = verify(good_export)
    ragged = {c.label for c in default_cases() if c.ragged}
    assert ragged and ragged <= {r.case for r in report.results if r.passed}
    assert not any("predate" in note for note in report.notes())


# --- model.fused.onnx and its op library (issue 15) -------------------------------------


def _problems(folder: Path, call_main) -> tuple[int, list[str], set[str]]:
    """`verify --json` in process: exit code, problems, backends whose rows all passed."""
    code, out, _ = call_main("verify", folder, "--json")
    report = json.loads(out)
    rows: dict[str, bool] = {}
    for row in report["results"]:
        rows[row["backend"]] = rows.get(row["backend"], True) and row["passed"]
    return code, report["problems"], {backend for backend, ok in rows.items() if ok}


@pytest.mark.slow  # builds both kernel libraries (cached after the first run)
def test_verify_runs_model_fused_onnx_without_a_remark(fused_onnx_export):
    report = verify(fused_onnx_export)
    assert report.passed and "onnxruntime (fused kernel)" in {r.backend for r in report.results}
    assert verification.NO_FUSED_ONNX not in report.remarks


@pytest.mark.slow
def test_a_tampered_model_fused_onnx_fails_verify(fused_onnx_export, tmp_path, call_main):
    folder = Path(shutil.copytree(fused_onnx_export, tmp_path / "m"))
    graph = onnx.load(str(folder / FUSED_ONNX_FILE))
    graph.doc_string = "changed after export"
    onnx.save(graph, str(folder / FUSED_ONNX_FILE))
    code, problems, _ = _problems(folder, call_main)
    assert code == 1
    assert problems == [
        f"{FUSED_ONNX_FILE} does not match the manifest's sha256 (changed since export)"
    ]


@pytest.mark.slow
def test_a_tampered_op_library_fails_verify_which_never_loads_it(
    fused_onnx_export, tmp_path, call_main
):
    folder = Path(shutil.copytree(fused_onnx_export, tmp_path / "m"))
    (folder / ORT_KERNEL_LIBRARY).write_bytes(b"\x7fELF planted")
    code, problems, passed = _problems(folder, call_main)
    assert code == 1
    assert problems == [
        f"{ORT_KERNEL_LIBRARY} does not match the manifest's sha256 (changed since export)"
    ]
    # Had verify registered the folder's copy, model.fused.onnx could not have run at all.
    assert "onnxruntime (fused kernel)" in passed


@pytest.mark.slow
@pytest.mark.parametrize("unlisted", [FUSED_ONNX_FILE, ORT_KERNEL_LIBRARY])
def test_model_fused_onnx_and_its_library_must_be_listed(fused_onnx_export, tmp_path, unlisted):
    folder = Path(shutil.copytree(fused_onnx_export, tmp_path / "m"))
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["artifacts"][unlisted]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    problems = verify(folder).problems
    assert f"{unlisted} is not listed in the manifest, so nothing vouches for it" in problems
    if unlisted == FUSED_ONNX_FILE:  # a library alone in a folder must be vouched for too
        (folder / FUSED_ONNX_FILE).unlink()
        problems = verify(folder).problems
        assert problems == []
        del manifest["artifacts"][ORT_KERNEL_LIBRARY]
        (folder / "manifest.json").write_text(json.dumps(manifest))
        problems = verify(folder).problems
        assert (
            f"{ORT_KERNEL_LIBRARY} is not listed in the manifest, so nothing vouches for it"
            in problems
        )


@pytest.mark.slow
def test_verify_without_the_op_library_checks_the_rest(fused_onnx_export, tmp_path, monkeypatch):
    """No headers here (an empty LSTM_EXPORT_ORT_INCLUDE): model.fused.onnx is a problem
    (exit 1) and every other backend still runs."""
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("LSTM_EXPORT_ORT_INCLUDE", str(tmp_path / "empty"))
    report = verify(fused_onnx_export)
    assert not report.passed and len(report.problems) == 1
    assert report.problems[0].startswith(f"{FUSED_ONNX_FILE} was not checked: ")
    assert "LSTM_EXPORT_ORT_INCLUDE" in report.problems[0]
    backends = {r.backend for r in report.results if r.passed}
    assert backends == {
        "eager",
        "torchscript",
        "onnxruntime",
        "onnxruntime batch-first",
        "torchscript (fused kernel)",
    }
