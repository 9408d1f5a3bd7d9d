"""bench runs every backend and anchor and reports ratios; no absolute time is asserted."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from helpers import run_cli, small_model
from lstm_export.artifacts import FUSED_ONNX_FILE, ORT_KERNEL_LIBRARY
from lstm_export.benchmarks import DEFAULT_SHAPES
from lstm_export.benchmarks.anchors import ANCHORS, ORT_LSTM_OP
from lstm_export.benchmarks.latency import (
    LIBTORCH_CPP,
    LIBTORCH_CPP_FUSED,
    Shape,
    bench,
    parse_shapes,
    ragged_lengths,
)
from lstm_export.errors import UsageError
from lstm_export.pipeline import export
from lstm_export.verification.backends import FUSED_BACKEND, FUSED_ONNX_BACKEND

DATA = Path(__file__).parent.parent / "data"
PYTHON_BACKENDS = {"eager", "torchscript (scratch cell)", "torchscript", "onnxruntime", *ANCHORS}


def quick_bench(folder, shapes: str, **options):
    """`bench` as these tests run it: one thread, two repeats, no warm-up, no pauses and no
    export timing, unless `options` say otherwise."""
    settings = {"threads": 1, "repeats": 2, "warmup": 0, "with_export": False, "settle_seconds": 0}
    return bench(folder, parse_shapes(shapes), **{**settings, **options})


@pytest.mark.parametrize("ln", [False, True], ids=["plain", "layer_norm"])
def test_bench_times_every_backend_on_every_shape(tmp_path, ln):
    folder = export(small_model(ln, 2), tmp_path / "m").out_dir
    report = quick_bench(folder, "3x2,1x1,5x3:ragged", repeats=3, warmup=1)
    backends = {t.backend for t in report.timings}
    assert backends >= PYTHON_BACKENDS
    assert {t.shape for t in report.timings} == {"3x2", "1x1", "5x3:ragged"}
    assert {t.backend for t in report.timings if t.ragged} == backends - {LIBTORCH_CPP}
    for t in report.timings:
        assert 0 < t.p10_ms <= t.median_ms <= t.p90_ms and math.isfinite(t.ratio_to_best_anchor)
    targeted = {t.backend for t in report.timings if t.target is not None}
    assert targeted == {"torchscript", "onnxruntime"}
    best = min(t.median_ms for t in report.timings if t.backend in ANCHORS and t.seq == 3)
    ts = next(t for t in report.timings if t.backend == "torchscript" and t.seq == 3)
    assert ts.ratio_to_best_anchor == pytest.approx(ts.median_ms / best)


@pytest.mark.slow  # builds the C++ example (cpp_binary) where no cache holds it
def test_bench_times_libtorch_from_cpp_when_the_example_is_built(tmp_path, cpp_binary):
    folder = export(small_model(True, 1), tmp_path / "m").out_dir
    report = quick_bench(folder, "3x2", warmup=1)
    cpp_rows = [t for t in report.timings if t.backend == LIBTORCH_CPP]
    assert report.cpp == str(cpp_binary)
    assert len(cpp_rows) == 1 and cpp_rows[0].median_ms > 0
    assert cpp_rows[0].ratio_to_best_anchor is not None
    without = quick_bench(folder, "3x2", repeats=1, cpp=False)
    assert LIBTORCH_CPP not in {t.backend for t in without.timings}


@pytest.mark.slow  # compiles the kernel and the C++ example where no cache holds them
def test_bench_times_the_fused_kernel_in_python_and_cpp_when_exported(tmp_path, cpp_binary):
    folder = export(small_model(True, 2), tmp_path / "m", fused_kernel=True).out_dir
    report = quick_bench(folder, "5x3", warmup=1)
    rows = {t.backend: t for t in report.timings}
    assert rows.keys() >= PYTHON_BACKENDS | {FUSED_BACKEND, LIBTORCH_CPP, LIBTORCH_CPP_FUSED}
    assert rows[FUSED_BACKEND].target == "<= 2.5x nn.LSTM"
    assert rows[FUSED_BACKEND].target_ratio == pytest.approx(
        rows[FUSED_BACKEND].median_ms / rows["nn.LSTM"].median_ms
    )
    assert rows[LIBTORCH_CPP_FUSED].median_ms > 0


def test_bench_times_model_fused_onnx_against_the_lstm_op_of_each_shape(
    fused_onnx_export, tmp_path
):
    """With model.fused.onnx in the folder, one row per shape holds its ratio to onnxruntime's
    LSTM op timed in the same run; our build of the library runs it, not the folder's copy."""
    folder = shutil.copytree(fused_onnx_export, tmp_path / "m")
    (folder / ORT_KERNEL_LIBRARY).write_bytes(b"not a library")  # never loaded
    report = quick_bench(folder, "3x2,4x3:ragged", cpp=False)
    assert report.notes == []
    for shape in ("3x2", "4x3:ragged"):
        rows = {t.backend: t for t in report.timings if t.shape == shape}
        fused, op = rows[FUSED_ONNX_BACKEND], rows[ORT_LSTM_OP]
        assert fused.median_ms > 0 and fused.target == f"<= 1.2x {ORT_LSTM_OP}"
        assert fused.target_ratio == pytest.approx(fused.median_ms / op.median_ms)
        assert fused.meets_target == (fused.target_ratio <= 1.2)
        assert rows["onnxruntime"].target == f"<= 1.5x {ORT_LSTM_OP}"


def test_a_layer_norm_export_without_model_fused_onnx_benches_as_before_with_a_note(tmp_path):
    folder = export(small_model(True, 1), tmp_path / "m").out_dir
    report = quick_bench(folder, "3x2", cpp=False)
    assert FUSED_ONNX_BACKEND not in {t.backend for t in report.timings}
    assert {t.backend for t in report.timings} >= PYTHON_BACKENDS
    assert len(report.notes) == 1 and f"has no {FUSED_ONNX_FILE}" in report.notes[0]
    plain = export(small_model(False, 1), tmp_path / "p").out_dir  # no fused kernel to have
    assert quick_bench(plain, "3x2", repeats=1, cpp=False).notes == []


def test_model_fused_onnx_is_left_out_with_a_note_where_its_library_cannot_be_built(
    fused_onnx_export, monkeypatch
):
    from lstm_export.native import ort_kernel

    def no_library() -> None:
        raise UsageError("no onnxruntime headers here (a test)")

    monkeypatch.setattr(ort_kernel, "build_ort_kernel", no_library)
    report = quick_bench(fused_onnx_export, "3x2", repeats=1, cpp=False)
    assert FUSED_ONNX_BACKEND not in {t.backend for t in report.timings}
    assert {t.backend for t in report.timings} >= PYTHON_BACKENDS | {FUSED_BACKEND}
    assert report.notes == [
        f"{FUSED_ONNX_FILE} was not timed: no onnxruntime headers here (a test)"
    ]


@pytest.mark.slow  # a child process that exports and benchmarks
def test_cli_bench_writes_json_with_export_time_and_memory(tmp_path):
    folder = export(small_model(True, 1), tmp_path / "m").out_dir
    out = tmp_path / "bench.json"
    options = ["--repeats", "2", "--warmup", "1", "--threads", "1", "--json", out]
    done = run_cli("bench", folder, "--shapes", "4x2", *options)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert {t["backend"] for t in data["timings"]} >= PYTHON_BACKENDS
    assert data["threads"] == 1 and data["config"]["layer_norm"] is True
    assert data["export"]["seconds"] > 0 and data["export"]["peak_rss_mib"] > 50
    assert isinstance(data["targets_met"], bool)
    assert "x best anchor" in done.stdout


def test_bench_gives_the_callers_thread_count_back_even_when_it_fails(tmp_path):
    before = torch.get_num_threads()
    with pytest.raises(UsageError):
        quick_bench(tmp_path / "missing", "3x2", threads=before + 1)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("text", ["100", "100x", "0x1", "ax2", "10x-1"])
def test_bad_shapes_are_refused(text):
    with pytest.raises(UsageError, match="--shapes must look like"):
        parse_shapes(text)


def test_shapes_parse():
    assert parse_shapes("100x1, 500X4,3x2:ragged") == [
        Shape(100, 1),
        Shape(500, 4),
        Shape(3, 2, ragged=True),
    ]
    assert [s.label for s in parse_shapes(DEFAULT_SHAPES)][-1] == "100x16:ragged"
    assert ragged_lengths(Shape(7, 4, ragged=True)).tolist() == [7, 5, 3, 1]


def test_plot_writes_a_png(tmp_path):
    folder = export(small_model(False, 1), tmp_path / "m").out_dir
    report = quick_bench(folder, "2x1,6x1")
    from lstm_export.benchmarks.latency import plot

    png = tmp_path / "latency.png"
    plot(report, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_bench_of_an_export_from_before_lengths_skips_its_ragged_shapes_with_a_note(tmp_path):
    folder = shutil.copytree(DATA / "export_v2_plain", tmp_path / "old")
    report = quick_bench(folder, "2x1,3x2:ragged", cpp=False)
    assert {t.shape for t in report.timings} == {"2x1"}
    assert len(report.notes) == 1 and "before lengths" in report.notes[0]
    assert not quick_bench(folder, "2x1", repeats=1, cpp=False).notes
