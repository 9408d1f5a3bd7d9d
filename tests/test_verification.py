"""verify: the matrix it covers, and that it catches real breaches."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import parity_corpus as corpus
from conftest import small_model
from lstm_export import triton, verification
from lstm_export.config import LSTMConfig
from lstm_export.errors import ParityError, UsageError
from lstm_export.files import sha256
from lstm_export.parity import default_cases
from lstm_export.pipeline import export
from lstm_export.verification import verify


@pytest.fixture
def good_export(tmp_path):
    return export(small_model(True, 2), tmp_path / "m").out_dir


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
    weight = next(t for t in proto.graph.initializer if t.name == "b_1")
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


@pytest.fixture(params=[False, True], ids=["plain", "layer_norm"])
def sound_export(request, tmp_path):
    model = corpus.trained_like(LSTMConfig(6, 16, 2, request.param), seed=3, norm_std=0.5)
    return export(model, tmp_path / "m").out_dir


def _verify_fails(call_main, folder, *backends: str) -> None:
    """verify exits 1 with one line naming the first failing backend; `backends` fail."""
    report = verify(folder)
    assert not report.problems, report.problems  # the hashes match: only parity can tell
    failed = {r.backend for r in report.failures}
    assert failed == set(backends), report.summary()
    code, out, err = call_main("verify", folder)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: parity failed"), err
    assert "FAIL" in out and "--json" in lines[0]


ONNX_ROWS = ("onnxruntime", "onnxruntime batch-first")


def test_a_layer_norm_epsilon_of_1e_3_in_model_onnx_fails(tmp_path, call_main):
    model = corpus.trained_like(LSTMConfig(6, 16, 2, True), seed=3, norm_std=0.5)
    folder = export(model, tmp_path / "m").out_dir
    corpus.set_layer_norm_epsilon(folder, 1e-3)
    _verify_fails(call_main, folder, *ONNX_ROWS)


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
    real = triton.batch_first_onnx

    def broken(proto):
        return corpus.reshape_state_instead_of_transposing(real(proto))

    monkeypatch.setattr(verification, "batch_first_onnx", broken)
    _verify_fails(call_main, sound_export, "onnxruntime batch-first")
    # `triton` runs the same engine before writing: it refuses, and writes nothing.
    monkeypatch.setattr(triton, "batch_first_onnx", broken)
    repo = sound_export.parent / "repo"
    with pytest.raises(ParityError, match="onnxruntime batch-first, case "):
        triton.write_triton_repo(sound_export, repo)
    assert not repo.exists()
