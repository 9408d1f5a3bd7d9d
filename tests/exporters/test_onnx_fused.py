"""model.fused.onnx: model.onnx's graph with each LayerNorm direction one fused-kernel node.

The graph's shape is checked offline (onnx's checker, its signature and metadata against
model.onnx's); its numbers through the export pipeline, whose parity matrix runs it with
`OnnxLSTM(..., fused=True)` against the eager model in float64: hidden 13 (a vector block
and a scalar tail, the shared `fused_onnx_export`), 20 (batch-first and bidirectional) and
the default model's 256, with and without state, streamed, ragged. Those tests build the op
library (slow; skipped only without a toolchain, never in CI).
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from helpers import FUSED_ONNX_CONFIG, run_python
from lstm_export.artifacts import (
    ATOL,
    CONFIG_KEY,
    FUSED_ONNX_FILE,
    LAYOUT_KEY,
    LENGTHS_INPUT,
    MANIFEST_FILE,
    OP_LIBRARY_KEY,
    ORT_KERNEL_LIBRARY,
    ROUTE_KEY,
)
from lstm_export.checkpoints import build_model
from lstm_export.config import LSTMConfig
from lstm_export.errors import UsageError
from lstm_export.exporters.onnx_fused import build_fused_onnx
from lstm_export.exporters.onnx_graph import build_onnx
from lstm_export.pipeline import export
from lstm_export.verification.backends import FUSED_ONNX_BACKEND, ONNX_BACKEND
from lstm_export.verification.folder import verify
from lstm_export.verification.parity import Reference

LAYOUTS = [
    pytest.param(batch_first, bidirectional, id=f"{order}-{direction}")
    for batch_first, order in ((False, "time_major"), (True, "batch_first"))
    for bidirectional, direction in ((False, "one_way"), (True, "bidirectional"))
]


def _model(hidden: int = 13, layers: int = 2, **layout: bool):
    return build_model(LSTMConfig(5, hidden, layers, True, **layout), seed=3)


def _values(values) -> list[tuple[str, int, list]]:
    """Each graph input or output: name, element type, dims (symbolic by name)."""
    described = []
    for value in values:
        tensor = value.type.tensor_type
        described.append(
            (value.name, tensor.elem_type, [d.dim_param or d.dim_value for d in tensor.shape.dim])
        )
    return described


@pytest.mark.parametrize("batch_first,bidirectional", LAYOUTS)
def test_the_graph_passes_the_checker_with_one_node_per_layer_and_direction(
    batch_first, bidirectional
):
    model = _model(batch_first=batch_first, bidirectional=bidirectional)
    graph = build_fused_onnx(model)
    onnx.checker.check_model(graph, full_check=True)
    assert {o.domain: o.version for o in graph.opset_import} == {"": 17, "lstm_export": 1}
    custom = [n for n in graph.graph.node if n.domain]
    assert len(custom) == 2 * (2 if bidirectional else 1)
    assert {(n.domain, n.op_type) for n in custom} == {("lstm_export", "LayerNormLSTMLayer")}
    for node in custom:
        assert len(node.input) == 9 and node.input[8]  # the valid mask is always given
        (eps,) = node.attribute
        assert eps.name == "eps" and eps.f == pytest.approx(1e-5)
    # The input projection stays standard ONNX: one MatMul per layer and direction.
    assert sum(n.op_type == "MatMul" for n in graph.graph.node) == len(custom)


@pytest.mark.parametrize("batch_first,bidirectional", LAYOUTS)
def test_signature_lengths_default_and_metadata_are_model_onnxs(batch_first, bidirectional):
    model = _model(batch_first=batch_first, bidirectional=bidirectional)
    fused, plain = build_fused_onnx(model), build_onnx(model)
    assert _values(fused.graph.input) == _values(plain.graph.input)
    assert _values(fused.graph.output) == _values(plain.graph.output)
    (default,) = [t for t in fused.graph.initializer if t.name == LENGTHS_INPUT]
    assert (
        numpy_helper.to_array(default).shape == (0,) and default.data_type == onnx.TensorProto.INT64
    )
    meta = {p.key: p.value for p in fused.metadata_props}
    plain_meta = {p.key: p.value for p in plain.metadata_props}
    assert meta[OP_LIBRARY_KEY] == ORT_KERNEL_LIBRARY
    assert meta[CONFIG_KEY] == plain_meta[CONFIG_KEY]
    assert meta.get(LAYOUT_KEY) == plain_meta.get(LAYOUT_KEY)
    assert "LayerNormLSTMLayer" in meta[ROUTE_KEY] and ORT_KERNEL_LIBRARY in meta[ROUTE_KEY]
    assert set(meta) == set(plain_meta) | {OP_LIBRARY_KEY}


def test_a_plain_model_has_no_fused_graph():
    with pytest.raises(UsageError, match=r"model\.fused\.onnx is for layer_norm=True models"):
        build_fused_onnx(build_model(LSTMConfig(5, 8, 1, False)))


# --- through the export pipeline: the parity matrix, the manifest ------------------------


def _fused_rows(report) -> list:
    return [r for r in report.results if r.backend == FUSED_ONNX_BACKEND]


def _cases(report, backend: str) -> list[str]:
    return sorted(r.case for r in report.results if r.backend == backend)


@pytest.mark.slow
def test_the_shared_export_proves_model_fused_onnx_on_the_whole_matrix(fused_onnx_export):
    """Hidden 13: every case model.onnx runs (state or not, streamed, ragged) passes."""
    report = verify(fused_onnx_export)
    assert report.passed, report.summary()
    rows = _fused_rows(report)
    assert rows and all(r.passed for r in rows)
    cases = _cases(report, FUSED_ONNX_BACKEND)
    assert cases == _cases(report, ONNX_BACKEND) and len(cases) == 21
    assert any("ragged" in c for c in cases) and any("chunks" in c for c in cases)
    assert any("h0/c0" in c for c in cases) and any("zeros" in c for c in cases)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [
        pytest.param(
            LSTMConfig(4, 20, 1, True, batch_first=True, bidirectional=True), id="20-bf-bi"
        ),
        pytest.param(LSTMConfig(64, 256, 2, True), id="default-64-256-2"),
    ],
)
def test_export_proves_model_fused_onnx_at_other_sizes(ort_library, config, tmp_path):
    result = export(build_model(config, seed=5), tmp_path / "m", fused_kernel=True)
    assert result.report.passed and not result.warnings
    rows = _fused_rows(result.report)
    assert _cases(result.report, FUSED_ONNX_BACKEND) == _cases(result.report, ONNX_BACKEND)
    assert len(rows) >= 18 and all(r.passed for r in rows)
    assert any("ragged" in r.case for r in rows)


@pytest.mark.slow
def test_the_manifest_vouches_for_both_files_and_names_the_library(fused_onnx_export, ort_library):
    folder = fused_onnx_export
    artifacts = json.loads((folder / MANIFEST_FILE).read_text())["artifacts"]
    for name in (FUSED_ONNX_FILE, ORT_KERNEL_LIBRARY):
        data = (folder / name).read_bytes()
        assert artifacts[name]["sha256"] == hashlib.sha256(data).hexdigest()
        assert artifacts[name]["bytes"] == len(data)
    assert artifacts[FUSED_ONNX_FILE]["requires"] == ORT_KERNEL_LIBRARY
    assert artifacts[FUSED_ONNX_FILE]["opset"] == 17
    assert "LayerNormLSTMLayer" in artifacts[ORT_KERNEL_LIBRARY]["route"]
    assert artifacts[ORT_KERNEL_LIBRARY]["onnxruntime"].startswith(">= 1.")
    # The deployed copy is our cached build, byte for byte.
    assert (folder / ORT_KERNEL_LIBRARY).read_bytes() == ort_library.read_bytes()


@pytest.mark.slow
def test_the_matrix_fails_a_model_fused_onnx_whose_gate_scale_is_one_percent_off(
    fused_onnx_export, tmp_path
):
    """The matrix runs the file itself: one gate's LayerNorm scale x1.01 in model.fused.onnx
    (its sha256 updated in the manifest) fails its rows, and only its rows."""
    folder = shutil.copytree(fused_onnx_export, tmp_path / "m")
    graph = onnx.load(str(folder / FUSED_ONNX_FILE))
    (gamma,) = [t for t in graph.graph.initializer if t.name == "gates_gamma_layer0"]
    scales = numpy_helper.to_array(gamma).copy()
    scales[: FUSED_ONNX_CONFIG[1]] *= np.float32(1.01)  # the input gate's
    gamma.CopyFrom(numpy_helper.from_array(scales, gamma.name))
    (folder / FUSED_ONNX_FILE).write_bytes(graph.SerializeToString())
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    digest = hashlib.sha256((folder / FUSED_ONNX_FILE).read_bytes()).hexdigest()
    manifest["artifacts"][FUSED_ONNX_FILE]["sha256"] = digest
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    report = verify(folder)
    assert not report.passed and not report.problems
    assert {r.backend for r in report.failures} == {FUSED_ONNX_BACKEND}


@pytest.mark.slow
@pytest.mark.parametrize("bidirectional", [False, True], ids=["one_way", "bidirectional"])
def test_nan_and_inf_propagate_as_in_eager(ort_library, bidirectional):
    """NaN exactly where the eager model (float64 and float32) has NaN, given lengths or
    not; the rest within the absolute tolerance. Raw onnxruntime: OnnxLSTM refuses NaN."""
    model = _model(hidden=9, bidirectional=bidirectional)
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(ort_library))
    options.log_severity_level = 3
    session = ort.InferenceSession(
        build_fused_onnx(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(1).standard_normal((12, 4, 5), dtype=np.float32)
    x[3, 0, 1] = np.nan
    x[7, 2, 0] = np.inf
    reference = Reference(model)
    for lengths in (None, np.array([12, 5, 9, 1], dtype=np.int64)):
        feed = {"x": x}
        if lengths is not None:
            feed[LENGTHS_INPUT] = lengths
        state = np.zeros((model.config().state_layers, 4, 9), np.float32)
        got = session.run(None, {**feed, "h0": state, "c0": state})
        expected64 = reference.expected(x, None, lengths)
        expected32 = reference.eager(x, None, lengths=lengths)
        for ours, want64, want32 in zip(got, expected64, expected32, strict=True):
            assert np.array_equal(np.isnan(ours), np.isnan(want64))
            assert np.array_equal(np.isnan(ours), np.isnan(want32))
            finite = ~np.isnan(want64)
            assert np.isnan(want64).any() and finite.any()
            assert np.abs(ours[finite] - want64[finite]).max() <= ATOL


_DEPLOYED = """
import sys
import numpy as np
import onnxruntime as ort
folder = sys.argv[1]
options = ort.SessionOptions()
options.register_custom_ops_library(folder + "/liblstm_export_ort_ops.so")  # the shipped copy
options.log_severity_level = 3
cpu = ["CPUExecutionProvider"]
fused = ort.InferenceSession(folder + "/model.fused.onnx", options, providers=cpu)
plain = ort.InferenceSession(folder + "/model.onnx", providers=cpu)
x = np.random.default_rng(0).standard_normal((11, 3, 5)).astype(np.float32)
state = np.zeros((2, 3, 13), np.float32)
feed = {"x": x, "h0": state, "c0": state, "lengths": np.array([11, 1, 6])}
got, want = fused.run(None, feed), plain.run(None, feed)
print(max(float(np.abs(a - b).max()) for a, b in zip(got, want)))
print("lstm_export" in sys.modules)
"""


@pytest.mark.slow
def test_the_shipped_library_runs_model_fused_onnx_in_a_fresh_interpreter(fused_onnx_export):
    """The export folder alone, as a deployment uses it: raw onnxruntime, no lstm_export."""
    done = run_python(_DEPLOYED, fused_onnx_export)
    assert done.returncode == 0, done.stderr
    error, imported = done.stdout.split()
    assert float(error) <= ATOL and imported == "False"
