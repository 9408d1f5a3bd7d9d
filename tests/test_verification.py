"""verify: the matrix it covers, and that it catches real breaches."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import small_model
from lstm_export.config import LSTMConfig
from lstm_export.errors import UsageError
from lstm_export.files import sha256
from lstm_export.pipeline import export
from lstm_export.verification import (
    check_parity,
    check_tolerance,
    default_cases,
    torch_backend,
    verify,
    verify_artifacts,
)


def test_matrix_covers_the_required_shapes():
    cases = default_cases()
    whole = [c for c in cases if not c.chunks]
    assert {c.seq for c in whole} >= {1, 2, 17} and max(c.seq for c in whole) >= 128
    assert {c.batch for c in whole} >= {1} and max(c.batch for c in whole) > 1
    assert {(c.seq, c.batch, c.initial_state) for c in whole} == {
        (s, b, st) for s in {c.seq for c in whole} for b in (1, 3) for st in (False, True)
    }
    streams = [c for c in cases if c.chunks]
    assert streams and all(sum(c.chunks) == c.seq and len(c.chunks) > 1 for c in streams)
    assert {c.initial_state for c in streams} == {False, True}


def test_check_parity_flags_a_backend_just_over_the_tolerance():
    model = small_model(True, 1)
    config = LSTMConfig(5, 8, 1, True)
    reference = torch_backend(model)

    def nudged(x, state):
        y, h, c = reference(x, state)
        return y + 2e-5, h, c

    def nan(x, state):
        y, h, c = reference(x, state)
        return y, h * np.nan, c

    report = check_parity(config, reference, {"nudged": nudged, "nan": nan, "same": reference})
    by_backend = {}
    for r in report.results:
        by_backend.setdefault(r.backend, set()).add(r.passed)
    assert by_backend == {"nudged": {False}, "nan": {False}, "same": {True}, "eager": {True}}
    assert not report.passed


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
    assert len(report.results) == 3 * len(default_cases()) + sum(
        1 for c in default_cases() if c.chunks
    )


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


@pytest.mark.parametrize("tolerance", [-1, -1e-9, float("nan"), float("inf"), "1e-5", True, None])
def test_a_tolerance_that_is_not_a_finite_number_at_least_0_is_refused(tmp_path, tolerance):
    # Refused before anything is looked at: the folder is not even an export.
    with pytest.raises(UsageError, match="tolerance must be a finite number >= 0"):
        verify(tmp_path, tolerance=tolerance)
    with pytest.raises(UsageError, match="tolerance must be a finite number >= 0"):
        verify_artifacts(tmp_path / "model.pt", tmp_path / "model.onnx", tolerance)
    with pytest.raises(UsageError, match="tolerance must be a finite number >= 0"):
        export(small_model(False, 1), tmp_path / "m", tolerance=tolerance)
    assert list(tmp_path.iterdir()) == []


def test_zero_and_positive_tolerances_are_accepted():
    assert check_tolerance(0) == 0.0
    assert check_tolerance(1e-5) == 1e-5


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
