"""The fused kernel as an onnxruntime custom op (lstm_export.LayerNormLSTMLayer): its headers,
its build, and one node of it against the eager model in float64.

The op runs one layer; a one-layer LayerNorm model is that layer, so the parity engine's
reference (the eager model in float64) and its float32 floor apply as they are. x_proj, the
hoisted input projection, is computed here with numpy (x @ W_x^T + b), as a graph's MatMul
would. Hidden sizes 1, 3, 9, 13 (scalar tails only or vector blocks plus tails), 20 and 256
(whole vectors; packed panels from batch 2).

The build needs a C++ compiler and onnxruntime's headers (fetched with npm on first use, or
$LSTM_EXPORT_ORT_INCLUDE): those tests are slow, skipped only where the toolchain is
missing, and CI (LSTM_EXPORT_REQUIRE_CPP=1) turns that into a failure. The header finder's
errors are checked offline, with a fake npm.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi.onnxruntime_pybind11_state import (
    InvalidArgument,
    InvalidGraph,
    RuntimeException,
)

from lstm_export.artifacts import ATOL as TOLERANCE
from lstm_export.artifacts import OPSET, ORT_KERNEL_LIBRARY
from lstm_export.checkpoints import build_model
from lstm_export.config import LSTMConfig
from lstm_export.errors import UsageError
from lstm_export.native import build, ort_kernel
from lstm_export.native import torch_kernel as kernels
from lstm_export.verification.cases import Case
from lstm_export.verification.parity import (
    Backend,
    Reference,
    check_parity,
)

WEIGHTS = ("w_h", "gamma", "beta", "gamma_c", "beta_c")
OUTPUTS = ("y", "h_n", "c_n")


@pytest.fixture
def library(ort_library) -> Path:
    """The op library (conftest's `ort_library`: built or found in the cache once)."""
    return ort_library


def _layer_weights(model) -> dict[str, np.ndarray]:
    """The op's weight inputs from layer 0 of a LayerNorm model (gates i, f, g, o)."""
    cell = model.cells[0]
    tensors = {
        "w_h": cell.hidden_lin.weight,
        "gamma": torch.cat([norm.weight for norm in cell.layer_norm]),
        "beta": torch.cat([norm.bias for norm in cell.layer_norm]),
        "gamma_c": cell.layer_norm_c.weight,
        "beta_c": cell.layer_norm_c.bias,
    }
    return {name: t.detach().numpy().astype(np.float32) for name, t in tensors.items()}


def _graph(
    weights: dict[str, np.ndarray],
    eps: float | None = 1e-5,
    mask: str | None = None,
    dtypes: dict[str, int] | None = None,
    inputs: tuple[str, ...] | None = None,
) -> bytes:
    """One LayerNormLSTMLayer node: x_proj, h0, c0 (and the mask, if `mask` names it) are
    graph inputs of any shape, the weights initializers. `mask=""` passes the optional input
    as the empty name; `inputs` overrides the node's input list."""
    dtypes = dtypes or {}
    names = ["x_proj", "h0", "c0", *WEIGHTS] + ([] if mask is None else [mask])
    attributes = {} if eps is None else {"eps": eps}
    node = helper.make_node(
        ort_kernel.OP_TYPE,
        list(inputs) if inputs is not None else names,
        list(OUTPUTS),
        domain=ort_kernel.DOMAIN,
        **attributes,
    )
    graph_inputs = [
        helper.make_tensor_value_info(n, dtypes.get(n, TensorProto.FLOAT), None)
        for n in ("x_proj", "h0", "c0")
    ]
    if mask:
        graph_inputs.append(helper.make_tensor_value_info(mask, TensorProto.BOOL, None))
    graph = helper.make_graph(
        [node],
        "layer",
        graph_inputs,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in OUTPUTS],
        [numpy_helper.from_array(weights[n], n) for n in WEIGHTS],
    )
    opsets = [
        helper.make_opsetid("", OPSET),
        helper.make_opsetid(ort_kernel.DOMAIN, ort_kernel.DOMAIN_VERSION),
    ]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def _session(library: Path, graph: bytes, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def _project(model, x: np.ndarray) -> np.ndarray:
    """x_proj = x W_x^T + b, float32, as the graph's MatMul and Add would give it."""
    cell = model.cells[0]
    w_x = cell.input_lin.weight.detach().numpy()
    bias = cell.hidden_lin.bias.detach().numpy()
    return (x @ w_x.T + bias).astype(np.float32)


def _valid(lengths: np.ndarray, seq: int) -> np.ndarray:
    """[seq, batch] bool: step t of sequence b is real when t < lengths[b]."""
    return np.arange(seq)[:, None] < lengths[None, :]


def _ort_backend(
    library: Path, model, weights: dict[str, np.ndarray] | None = None, threads: int = 2
) -> Backend:
    """The op as a parity backend for a one-layer model: without lengths a node with eight
    inputs (no mask), with lengths one fed the [seq, batch] mask."""
    weights = _layer_weights(model) if weights is None else weights
    eps = model.cells[0].layer_norm_c.eps
    plain = _session(library, _graph(weights, eps), threads)
    masked = _session(library, _graph(weights, eps, mask="valid"), threads)
    hidden = model.hidden_size

    def run(x, state, lengths):
        seq, batch = x.shape[:2]
        feeds = {"x_proj": _project(model, x)}
        if state is None:
            feeds["h0"] = feeds["c0"] = np.zeros((batch, hidden), np.float32)
        else:
            feeds["h0"], feeds["c0"] = state[0][0], state[1][0]
        if lengths is None:
            y, h, c = plain.run(None, feeds)
        else:
            y, h, c = masked.run(None, {**feeds, "valid": _valid(lengths, seq)})
        return y, h[None], c[None]

    return Backend("onnxruntime (fused op)", run)


def _torchscript_op_backend(model) -> Backend:
    """The TorchScript op (the other binding) on the same inputs, the same way."""
    kernels.build_kernel()
    cell = model.cells[0]
    weights = [torch.from_numpy(w) for w in _layer_weights(model).values()]
    eps = cell.layer_norm_c.eps
    hidden = model.hidden_size

    def run(x, state, lengths):
        seq, batch = x.shape[:2]
        x_proj = torch.from_numpy(_project(model, x))
        if state is None:
            h0 = c0 = torch.zeros(batch, hidden)
        else:
            h0, c0 = torch.from_numpy(state[0][0]), torch.from_numpy(state[1][0])
        valid = None if lengths is None else torch.from_numpy(_valid(lengths, seq))
        with torch.inference_mode():
            y, h, c = torch.ops.lstm_export.layer_norm_lstm_layer(
                x_proj, h0, c0, *weights, eps, valid
            )
        return y.numpy(), h[None].numpy(), c[None].numpy()

    return Backend("torchscript op", run)


def _model(hidden: int, seed: int = 0):
    """One LayerNorm layer; build_model draws the LayerNorm scales and shifts at random."""
    return build_model(LSTMConfig(5, hidden, 1, layer_norm=True), seed=seed + hidden).eval()


# Batch 1 (dot products), 2 and 5 (panels where hidden % 4 == 0 and seq >= 8), with and
# without a state, one step and 17; ragged batches with a length-1 sequence beside a full one.
_CASES = [Case(s, b, st) for s in (1, 17) for b in (1, 2, 5) for st in (False, True)] + [
    Case(17, 5, False, ragged=True),
    Case(17, 2, True, ragged=True),
]


@pytest.mark.slow
@pytest.mark.parametrize("hidden", [1, 3, 9, 13, 20, 256])
def test_the_op_matches_the_eager_layer_in_float64(library, hidden):
    """The parity rule (error <= max(atol, 8 x the float32 floor)) on every case, y, h and c."""
    model = _model(hidden)
    report = check_parity(Reference(model), [_ort_backend(library, model)], _CASES)
    assert report.passed, report.summary()
    rows = [r for r in report.results if r.backend == "onnxruntime (fused op)"]
    assert len(rows) == len(_CASES) and not report.problems


@pytest.mark.slow
@pytest.mark.parametrize("hidden", [13, 20])
def test_the_rule_catches_one_gamma_entry_off_by_one_percent(library, hidden):
    """The comparison can fail: the same cases on a layer whose gate LayerNorm has one scale
    1.01x its value (the op otherwise right) do not pass."""
    model = _model(hidden)
    weights = _layer_weights(model)
    weights["gamma"][hidden] *= 1.01  # the forget gate's first unit
    report = check_parity(Reference(model), [_ort_backend(library, model, weights)], _CASES)
    assert not report.passed
    failed = {r.case for r in report.failures}
    assert any(c.startswith("17x") for c in failed), report.summary()


@pytest.mark.slow
@pytest.mark.parametrize("hidden", [13, 16])
def test_nan_and_inf_propagate_as_in_eager(library, hidden):
    """NaN exactly where the eager model (float64 and float32) has NaN; the rest as usual."""
    model = _model(hidden, seed=2)
    x = np.random.default_rng(1).standard_normal((12, 4, 5), dtype=np.float32)
    x[3, 0, 1] = np.nan
    x[7, 2, 0] = np.inf
    got = _ort_backend(library, model).run(x, None, None)
    reference = Reference(model)
    expected64 = reference.expected(x, None)
    expected32 = reference.eager(x, None)
    for ours, want64, want32 in zip(got, expected64, expected32, strict=True):
        assert np.array_equal(np.isnan(ours), np.isnan(want64))
        assert np.array_equal(np.isnan(ours), np.isnan(want32))
        finite = ~np.isnan(want64)
        assert np.isnan(want64).any() and finite.any()
        assert np.abs(ours[finite] - want64[finite]).max() <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("hidden", [13, 256])
def test_the_op_gives_the_torchscript_ops_numbers(library, hidden):
    """Both bindings pass the rule on the same cases, and with the same float eps (the ONNX
    attribute is float32) they agree bit for bit: one core, the same arithmetic. One or two
    intra-op threads: the same bits too (threads split work, not sums)."""
    model = _model(hidden, seed=5)
    backends = [_ort_backend(library, model), _torchscript_op_backend(model)]
    report = check_parity(Reference(model), backends, _CASES)
    assert report.passed, report.summary()

    kernels.build_kernel()
    weights = _layer_weights(model)
    eps32 = float(np.float32(model.cells[0].layer_norm_c.eps))
    torch_weights = [torch.from_numpy(w) for w in weights.values()]
    rng = np.random.default_rng(7)
    for seq, batch, masked in ((17, 1, False), (17, 5, False), (9, 3, True), (1, 2, True)):
        x_proj = rng.standard_normal((seq, batch, 4 * hidden), dtype=np.float32)
        h0 = rng.standard_normal((batch, hidden), dtype=np.float32)
        c0 = rng.standard_normal((batch, hidden), dtype=np.float32)
        feeds = {"x_proj": x_proj, "h0": h0, "c0": c0}
        valid = None
        if masked:
            valid = rng.random((seq, batch)) < 0.7
            feeds["valid"] = valid
        graph = _graph(weights, eps32, mask="valid" if masked else None)
        two = _session(library, graph, threads=2).run(None, feeds)
        one = _session(library, graph, threads=1).run(None, feeds)
        with torch.inference_mode():
            expected = torch.ops.lstm_export.layer_norm_lstm_layer(
                *map(torch.from_numpy, (x_proj, h0, c0)),
                *torch_weights,
                eps32,
                None if valid is None else torch.from_numpy(valid),
            )
        for a, b, want in zip(two, one, expected, strict=True):
            assert np.array_equal(a, want.numpy()) and np.array_equal(b, want.numpy())


# Both vector routes on this machine: LSTM_EXPORT_KERNEL_ISA caps the route a build takes, so
# an AVX-512 CPU builds and tests the AVX2 route too (each its own cached library).
_ROUTE_HIDDEN = [1, 3, 9, 13, 20, 33, 256]
_ROUTE_CASES = [Case(9, b, b % 2 == 1) for b in range(1, 18)] + [
    Case(9, b, b % 2 == 0, ragged=True) for b in range(2, 18)
]
_ROUTE_CASES += [Case(1, 5, True), Case(12, 3, False, chunks=(8, 4))]


@pytest.fixture(scope="module", params=["avx512", "avx2"])
def route_library(request) -> tuple[str, Path]:
    """(route, the op library built for it). Skipped where this CPU cannot run the route;
    a failed build fails under LSTM_EXPORT_REQUIRE_CPP=1 (CI), else skips."""
    import os

    isa = request.param
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(build.ISA_ENV, isa)
        patch.delenv(build.PORTABLE_ENV, raising=False)
        if build.isa() != isa:
            pytest.skip(f"this CPU cannot run the {isa} route (/proc/cpuinfo)")
        try:
            built = ort_kernel.build_ort_kernel()
        except UsageError as exc:
            if os.environ.get("LSTM_EXPORT_REQUIRE_CPP") == "1":
                pytest.fail(f"LSTM_EXPORT_REQUIRE_CPP=1 but the {isa} op library failed: {exc}")
            pytest.skip(f"no {isa} op library here: {exc}")
    return isa, built


@pytest.mark.slow
@pytest.mark.parametrize("hidden", _ROUTE_HIDDEN)
def test_each_vector_route_matches_the_eager_layer_in_float64(route_library, hidden):
    """The AVX-512 and the AVX2 route, each to the parity rule: hidden sizes with vector tails
    (1 to 33) and the default 256, batch 1 to 17 (dot products at batch 1, panels with every
    remainder of the row blocks), with and without state, ragged (masked), one step, streamed."""
    _, library = route_library
    model = _model(hidden, seed=11)
    report = check_parity(Reference(model), [_ort_backend(library, model)], _ROUTE_CASES)
    assert report.passed, report.summary()
    rows = [r for r in report.results if r.backend == "onnxruntime (fused op)"]
    assert len(rows) == len(_ROUTE_CASES) and not report.problems


@pytest.mark.slow
def test_each_route_is_its_own_library_with_its_own_code(route_library):
    """The route is part of the compile command, hence of the cache key; the AVX-512 library
    holds 16-lane (zmm) code and the AVX2 one none."""
    import os
    import shutil

    isa, library = route_library
    assert library.parent.name.startswith("ort-")
    if shutil.which("objdump") is None:
        if os.environ.get("LSTM_EXPORT_REQUIRE_CPP") == "1":
            pytest.fail("LSTM_EXPORT_REQUIRE_CPP=1 but objdump (binutils) is missing")
        pytest.skip("needs objdump (binutils)")
    code = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(library)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert ("zmm" in code) == (isa == "avx512") and "vfmadd" in code
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(build.ISA_ENV, "portable")
        portable, _ = ort_kernel._library_and_command(ort_kernel.find_headers())
    assert portable.path != library


@pytest.mark.slow
@pytest.mark.parametrize("hidden", [20, 256])
def test_w_h_fed_at_run_time_gives_the_initializers_bits(library, hidden):
    """An initializer w_h is packed into panels once, when the session is made; fed as a graph
    input it is packed per call: the same numbers either way (batch 5, seq 9: panels)."""
    weights = _layer_weights(_model(hidden, seed=6))
    proto = onnx.load_from_string(_graph(weights))
    w_h = next(t for t in proto.graph.initializer if t.name == "w_h")
    proto.graph.initializer.remove(w_h)
    proto.graph.input.append(helper.make_tensor_value_info("w_h", TensorProto.FLOAT, None))
    rng = np.random.default_rng(3)
    feeds = {
        "x_proj": rng.standard_normal((9, 5, 4 * hidden), dtype=np.float32),
        "h0": rng.standard_normal((5, hidden), dtype=np.float32),
        "c0": rng.standard_normal((5, hidden), dtype=np.float32),
    }
    packed_once = _session(library, _graph(weights)).run(None, feeds)
    fed = _session(library, proto.SerializeToString()).run(None, {**feeds, "w_h": weights["w_h"]})
    for a, b in zip(packed_once, fed, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.slow
def test_the_mask_input(library):
    """All valid is the unmasked op bit for bit, and so is the mask passed as the empty name;
    all padding leaves (h0, c0) and outputs 0; seq 0 gives (h0, c0) back."""
    model = _model(8, seed=3)
    weights = _layer_weights(model)
    rng = np.random.default_rng(0)
    feeds = {
        "x_proj": rng.standard_normal((9, 3, 32), dtype=np.float32),
        "h0": rng.standard_normal((3, 8), dtype=np.float32),
        "c0": rng.standard_normal((3, 8), dtype=np.float32),
    }
    unmasked = _session(library, _graph(weights)).run(None, feeds)
    masked = _session(library, _graph(weights, mask="valid"))
    empty_name = _session(library, _graph(weights, mask="")).run(None, feeds)
    all_valid = masked.run(None, {**feeds, "valid": np.ones((9, 3), bool)})
    for got, other, want in zip(all_valid, empty_name, unmasked, strict=True):
        assert np.array_equal(got, want) and np.array_equal(other, want)
    y, h, c = masked.run(None, {**feeds, "valid": np.zeros((9, 3), bool)})
    assert np.array_equal(h, feeds["h0"]) and np.array_equal(c, feeds["c0"]) and not y.any()
    none = {**feeds, "x_proj": np.zeros((0, 3, 32), np.float32)}
    y, h, c = _session(library, _graph(weights)).run(None, none)
    assert y.shape == (0, 3, 8)
    assert np.array_equal(h, feeds["h0"]) and np.array_equal(c, feeds["c0"])


@pytest.mark.slow
def test_bad_inputs_are_onnxruntime_errors_naming_the_expected_shape(library):
    """Shapes and types the op cannot take come back as onnxruntime errors (the process
    lives on), each naming what was expected."""
    weights = _layer_weights(_model(8, seed=4))
    x_proj, h0 = np.zeros((3, 2, 32), np.float32), np.zeros((2, 8), np.float32)
    feeds = {"x_proj": x_proj, "h0": h0, "c0": h0}
    session = _session(library, _graph(weights))
    with pytest.raises(InvalidArgument, match=r"x_proj must be \[seq, batch, 4 \* hidden\]"):
        session.run(None, {**feeds, "x_proj": np.zeros((3, 2, 30), np.float32)})
    with pytest.raises(InvalidArgument, match=r"h0 must have shape \[2, 8\], got \[2, 7\]"):
        session.run(None, {**feeds, "h0": np.zeros((2, 7), np.float32)})
    with pytest.raises(InvalidArgument, match=r"c0 must have shape \[2, 8\], got \[8\]"):
        session.run(None, {**feeds, "c0": np.zeros(8, np.float32)})
    transposed = {**weights, "w_h": np.ascontiguousarray(weights["w_h"].T)}
    with pytest.raises(InvalidArgument, match=r"w_h must have shape \[32, 8\], got \[8, 32\]"):
        _session(library, _graph(transposed)).run(None, feeds)
    short = {**weights, "gamma_c": weights["gamma_c"][:5]}
    with pytest.raises(InvalidArgument, match=r"gamma_c must have shape \[8\], got \[5\]"):
        _session(library, _graph(short)).run(None, feeds)
    masked = _session(library, _graph(weights, mask="valid"))
    with pytest.raises(InvalidArgument, match=r"valid must have shape \[3, 2\], got \[2, 3\]"):
        masked.run(None, {**feeds, "valid": np.ones((2, 3), bool)})
    zero = {n: np.zeros([0] * w.ndim, np.float32) for n, w in weights.items()}
    hidden0 = {
        "x_proj": np.zeros((3, 2, 0), np.float32),
        **{n: np.zeros((2, 0), np.float32) for n in ("h0", "c0")},
    }
    with pytest.raises(InvalidArgument, match="hidden size must be >= 1, got 0"):
        _session(library, _graph(zero)).run(None, hidden0)
    # Refused when the session is made: a missing eps (ours), a double input, too few
    # inputs (onnxruntime's own checks of the op's declared types and arity).
    with pytest.raises(RuntimeException, match="LayerNormLSTMLayer: needs the float attribute eps"):
        _session(library, _graph(weights, eps=None))
    with pytest.raises(InvalidGraph, match=r"Type 'tensor\(double\)' of input parameter \(h0\)"):
        _session(library, _graph(weights, dtypes={"h0": TensorProto.DOUBLE}))
    with pytest.raises(InvalidGraph, match=r"has input size 4 not in range \[min=8, max=9\]"):
        _session(library, _graph(weights, inputs=("x_proj", "h0", "c0", "w_h")))
    y, h, c = session.run(None, feeds)  # the session still works
    assert y.shape == (3, 2, 8) and h.shape == c.shape == (2, 8)


@pytest.mark.slow
def test_the_library_needs_neither_libtorch_nor_libonnxruntime(library):
    """It is loaded by onnxruntime, which hands it its API: no link to either runtime, no
    OpenMP (onnxruntime's pool runs the threads); one exported entry point."""
    assert library.name == ORT_KERNEL_LIBRARY
    dynamic = subprocess.run(
        ["readelf", "-d", "--dyn-syms", "-W", str(library)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    needed = [line.split("[")[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert needed and not any(
        word in name
        for name in needed
        for word in ("torch", "c10", "onnxruntime", "gomp", "python")
    ), needed
    exported = [
        line.split()[-1]
        for line in dynamic.splitlines()
        if " FUNC " in line and " GLOBAL " in line and " DEFAULT " in line and " UND " not in line
    ]
    assert "RegisterCustomOps" in exported


@pytest.mark.slow
def test_a_cached_library_is_reused_and_a_damaged_one_rebuilt(library, tmp_path, monkeypatch):
    """The shared build helper: the stamp catches a truncated library, as for the TorchScript
    kernel; once built, the same headers, sources and compiler find the same file."""
    include = ort_kernel.find_headers()
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(ort_kernel.INCLUDE_ENV, str(include))
    built = ort_kernel.build_ort_kernel()
    assert built.parent.parent == tmp_path / "cache" and build.intact(built)
    first = built.read_bytes()
    assert ort_kernel.build_ort_kernel() == built and built.read_bytes() == first
    built.write_bytes(first[: len(first) // 3])
    assert ort_kernel.build_ort_kernel() == built and build.intact(built)
    assert built.stat().st_size == len(first)


# The header finder, offline: a fake npm on PATH that "packs" a tarball we made.

_FAKE_NPM = """#!{python}
import shutil, sys
args = sys.argv[1:]
with open({log!r}, "a") as log:
    log.write(" ".join(args) + "\\n")
sys.stderr.write({stderr!r})
if {tarball!r}:
    shutil.copy({tarball!r}, args[args.index("--pack-destination") + 1])
sys.exit({code})
"""


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty kernel cache, no header folder given, and a PATH with only a stand-in
    compiler (never run here) on it: each test adds the npm it needs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cxx = bin_dir / "cxx"
    cxx.write_text("#!/bin/sh\nexit 1\n")
    cxx.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(ort_kernel.INCLUDE_ENV, raising=False)
    return bin_dir


def _fake_npm(bin_dir: Path, tarball: Path | None = None, code: int = 0, stderr: str = "") -> Path:
    """npm that copies `tarball` (if any) into --pack-destination and exits with `code`;
    each call's arguments go to the log it returns."""
    log = bin_dir / "npm.log"
    npm = bin_dir / "npm"
    npm.write_text(
        _FAKE_NPM.format(
            python=sys.executable,
            log=str(log),
            stderr=stderr,
            tarball=str(tarball) if tarball else "",
            code=code,
        )
    )
    npm.chmod(0o755)
    return log


_XCF = "package/Plugins/iOS~/onnxruntime.xcframework/"
_HEADERS_AT = _XCF + "{platform}/onnxruntime.framework/Headers/"


def _garbage(path: Path) -> Path:
    path.write_bytes(b"not a tarball")
    return path


def _tarball(
    path: Path,
    version: int = 29,
    platforms: tuple[str, ...] = ("ios-arm64", "ios-arm64_x86_64-simulator"),
    link: str | None = None,
    extra: dict[str, bytes] | None = None,
    skip: str | None = None,
) -> Path:
    """A tarball laid out as the npm package: every header in each platform's folder
    (`skip` left out of the first), `link` a symlink there instead of a file, and `extra`
    members anywhere."""
    members = dict(extra or {})
    for index, platform in enumerate(platforms):
        for name in ort_kernel.HEADERS:
            if index == 0 and name == skip:
                continue
            text = f"// {name} of {platform}\n"
            if name == "onnxruntime_c_api.h":
                text += f"#define ORT_API_VERSION {version}\n"
            members[_HEADERS_AT.format(platform=platform) + name] = text.encode()
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if link is not None and name == _HEADERS_AT.format(platform=platforms[0]) + link:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                archive.addfile(info)
                continue
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _pin(monkeypatch, tarball: Path) -> None:
    monkeypatch.setattr(ort_kernel, "NPM_SHA256", hashlib.sha256(tarball.read_bytes()).hexdigest())


def _leftovers(cache: Path) -> list[str]:
    """Whatever a failed fetch left in the cache but its lock files."""
    if not cache.exists():
        return []
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.name != ".lock")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


def test_a_fetch_extracts_only_the_headers_and_deletes_the_tarball(offline, tmp_path, monkeypatch):
    tarball = _tarball(
        tmp_path / "pkg.tgz", extra={"package/../../escape.h": b"x", "package/README.md": b"x"}
    )
    _pin(monkeypatch, tarball)
    log = _fake_npm(offline, tarball)
    cache = tmp_path / "cache"
    killed = cache / ".onnxruntime-headers-fetch.x1y2"  # a fetch killed midway
    killed.mkdir(parents=True)
    (killed / "pkg.tgz").write_bytes(b"150 MB")
    include = ort_kernel.find_headers()
    assert include == cache / f"onnxruntime-headers-{ort_kernel.NPM_VERSION}"
    assert sorted(p.name for p in include.iterdir()) == sorted(ort_kernel.HEADERS)
    assert "of ios-arm64\n" in (include / "onnxruntime_cxx_api.h").read_text()  # one platform
    files = [f"{include.name}/{name}" for name in ort_kernel.HEADERS]
    assert _leftovers(cache) == sorted([include.name, *files])  # no tarball, no npm cache
    assert not (tmp_path / "escape.h").exists() and not (cache.parent / "escape.h").exists()
    args = log.read_text().split()
    assert args[:2] == ["pack", "com.github.asus4.onnxruntime@0.4.9"]
    assert Path(args[args.index("--cache") + 1]).parent.parent == cache  # npm's copy goes too
    assert ort_kernel.api_version(include) == 29
    assert ort_kernel.find_headers() == include and len(log.read_text().splitlines()) == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda p: _tarball(p, link="onnxruntime_cxx_api.h"),
            "onnxruntime_cxx_api.h is a link, not a file",
        ),
        (
            lambda p: _tarball(p, platforms=("ios-arm64",), skip="onnxruntime_float16.h"),
            "has no package/Plugins",
        ),
        (lambda p: _tarball(p, version=28), "onnxruntime's C API 28, not 29"),
        (
            lambda p: _tarball(p, extra={_XCF + "x/../Headers/onnxruntime_c_api.h": b"x"}),
            "points outside",
        ),
        (lambda p: _garbage(p), "cannot read"),
    ],
    ids=["link", "incomplete", "version", "dot-dot", "garbage"],
)
def test_a_bad_package_is_refused_and_nothing_is_left(
    offline, tmp_path, monkeypatch, make, message
):
    tarball = make(tmp_path / "pkg.tgz")
    _pin(monkeypatch, tarball)
    _fake_npm(offline, tarball)
    with pytest.raises(UsageError, match=message) as info:
        ort_kernel.find_headers()
    _one_line(info)
    assert _leftovers(tmp_path / "cache") == []


def test_a_tarball_that_is_not_the_pinned_one_is_refused(offline, tmp_path):
    _fake_npm(offline, _tarball(tmp_path / "pkg.tgz"))
    with pytest.raises(
        UsageError, match=f"not the pinned {ort_kernel.NPM_SHA256}; refusing it"
    ) as info:
        ort_kernel.find_headers()
    assert ort_kernel.INCLUDE_ENV in _one_line(info)
    assert _leftovers(tmp_path / "cache") == []


def test_npm_missing_is_one_line_saying_how_to_fix_it(offline, tmp_path):
    with pytest.raises(UsageError, match="npm is not on PATH to fetch them") as info:
        ort_kernel.find_headers()
    assert f"set {ort_kernel.INCLUDE_ENV} to the include folder" in _one_line(info)
    assert not (tmp_path / "cache").exists()


def test_npm_failing_is_one_line_with_its_reason(offline, tmp_path):
    stderr = (
        "npm error code E404\nnpm error 404 Not Found - GET https://registry.npmjs.org/x\n"
        "npm error A complete log of this run can be found in: /tmp/x.log\n"
    )
    _fake_npm(offline, code=1, stderr=stderr)
    with pytest.raises(
        UsageError,
        match=r"npm pack com\.github\.asus4\.onnxruntime@0\.4\.9 failed: 404 Not Found - GET",
    ) as info:
        ort_kernel.find_headers()
    assert ort_kernel.INCLUDE_ENV in _one_line(info)
    assert _leftovers(tmp_path / "cache") == []


def test_no_compiler_is_said_before_anything_is_downloaded(offline, tmp_path, monkeypatch):
    log = _fake_npm(offline, _tarball(tmp_path / "pkg.tgz"))
    monkeypatch.delenv("CXX")
    with pytest.raises(UsageError, match=r"needs a C\+\+ compiler; 'c\+\+' is not on PATH") as info:
        ort_kernel.build_ort_kernel()
    assert _one_line(info).startswith("the onnxruntime op library is compiled on first use")
    assert not log.exists() and _leftovers(tmp_path / "cache") == []


def test_a_header_folder_without_the_header_is_one_line(offline, tmp_path, monkeypatch):
    folder = tmp_path / "include"
    folder.mkdir()
    (folder / "onnxruntime_cxx_api.h").write_text("")
    monkeypatch.setenv(ort_kernel.INCLUDE_ENV, str(folder))
    with pytest.raises(
        UsageError, match=r"has no onnxruntime_c_api\.h; set LSTM_EXPORT_ORT_INCLUDE"
    ) as info:
        ort_kernel.build_ort_kernel()
    assert f"{ort_kernel.INCLUDE_ENV}={folder}" in _one_line(info)
    (folder / "onnxruntime_c_api.h").write_text("#define ORT_API_VERSION 16\n")
    with pytest.raises(UsageError, match="C API 16; the onnxruntime op library needs 17 or newer"):
        ort_kernel.build_ort_kernel()
    assert _leftovers(tmp_path / "cache") == []


def _header_folder(path: Path, version: int, note: str = "") -> Path:
    path.mkdir()
    (path / "onnxruntime_c_api.h").write_text(f"#define ORT_API_VERSION {version}\n{note}")
    (path / "onnxruntime_cxx_api.h").write_text("")
    return path


def test_the_library_is_keyed_by_the_headers_and_their_version(offline, tmp_path):
    """Different headers, a different cache folder; the same, the same folder."""
    a = ort_kernel._library_and_command(_header_folder(tmp_path / "a", 29))[0]
    b = ort_kernel._library_and_command(_header_folder(tmp_path / "b", 30))[0]
    c = ort_kernel._library_and_command(_header_folder(tmp_path / "c", 29, "// changed"))[0]
    again = ort_kernel._library_and_command(tmp_path / "a")[0]
    assert (a.api_version, b.api_version, c.api_version) == (29, 30, 29)
    a, b, c, again = (library.path for library in (a, b, c, again))
    assert a == again and len({a, b, c}) == 3
    assert a.name == ORT_KERNEL_LIBRARY and a.parent.parent == tmp_path / "cache"
    command = ort_kernel._library_and_command(tmp_path / "a")[1](Path("OUT"))
    assert f"-I{tmp_path / 'a'}" in command and "-fopenmp" not in command
    assert not any("torch" in part for part in command)
    assert ("-mavx2" in command) == ("-mavx2" in kernels.compile_flags())
