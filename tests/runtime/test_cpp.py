"""The C++ example (cpp/lstm_run) against eager PyTorch: built once per session, run many times.

The reference is the eager `LSTM` object whose weights were saved, never the saved file
itself, so a bug in scripting, saving, loading or the C++ driver all show up as a
difference. The only allowed skip is a missing cmake / C++ compiler; set
LSTM_EXPORT_REQUIRE_CPP=1 (as CI does) to turn even that into a failure.
"""

from __future__ import annotations

import copy
import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from lstm_export.artifacts import FUSED_TORCHSCRIPT_FILE, KERNEL_LIBRARY, PT2_FILE
from lstm_export.checkpoints import build_model
from lstm_export.config import LSTMConfig
from lstm_export.errors import ParityError, UsageError
from lstm_export.exporters.torchscript import quiet_torchscript, save_torchscript
from lstm_export.model import LSTM
from lstm_export.runtime import cpp
from lstm_export.verification.backends import CPP_BACKEND, FUSED_CPP_BACKEND, PT2_CPP_BACKEND
from lstm_export.verification.cpp import cpp_check

# Nearly every test here runs lstm_run, built from C++ (minutes where no cache holds it), in
# child processes; `-m "not slow"` leaves the module out.
pytestmark = pytest.mark.slow

INPUT, HIDDEN, LAYERS = 5, 8, 2
TOL = 1e-5


@dataclass(frozen=True)
class Exported:
    eager: LSTM
    model_pt: Path

    @property
    def config(self) -> LSTMConfig:
        return LSTMConfig(INPUT, HIDDEN, LAYERS, self.eager.layer_norm)


@pytest.fixture(scope="session")
def binary(cpp_binary: Path) -> Path:
    return cpp_binary


def _export(layer_norm: bool, folder: Path, seed: int) -> Exported:
    torch.manual_seed(seed)
    eager = LSTM(INPUT, HIDDEN, LAYERS, layer_norm=layer_norm).eval()
    with torch.no_grad():
        for module in eager.modules():
            if isinstance(module, torch.nn.LayerNorm):  # not the identity defaults
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.3)
    folder.mkdir(parents=True, exist_ok=True)
    save_torchscript(eager, folder / "model.pt")
    return Exported(eager, folder / "model.pt")


@pytest.fixture(scope="session", params=[True, False], ids=["layer_norm", "plain"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    name = "ln" if request.param else "plain"
    return _export(request.param, tmp_path_factory.mktemp(name), seed=11 if request.param else 12)


@pytest.fixture(scope="session")
def model_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A layer_norm model for the error-path tests."""
    return _export(True, tmp_path_factory.mktemp("errors"), seed=3).model_pt


def _inputs(seq: int, batch: int, with_state: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((seq, batch, INPUT), dtype=np.float32)
    state = None
    if with_state:
        state = tuple(rng.standard_normal((LAYERS, batch, HIDDEN), dtype=np.float32) for _ in "hc")
    return x, state


def _eager(model: LSTM, x: np.ndarray, state) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with torch.no_grad():
        torch_state = None if state is None else tuple(torch.from_numpy(s) for s in state)
        y, (h, c) = model(torch.from_numpy(x), torch_state)
    return y.numpy(), h.numpy(), c.numpy()


def _assert_close(actual, expected, atol: float = TOL) -> None:
    for name, a, e in zip("yhc", actual, expected, strict=True):
        assert a.dtype == np.float32, name
        assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
        np.testing.assert_allclose(a, e, rtol=0, atol=atol, err_msg=name)


def _lstm_run(binary: Path, *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def _one_line_error(result: subprocess.CompletedProcess[str], expected_code: int = 1) -> str:
    """The failure contract: the exit code, one line on stderr, no TorchScript traceback."""
    assert result.returncode == expected_code, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lstm_run: error: "), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


# --- build -----------------------------------------------------------------------------


def test_build_is_cached(binary: Path) -> None:
    mtime = binary.stat().st_mtime_ns
    assert cpp.build() == binary
    assert binary.stat().st_mtime_ns == mtime, "an unchanged tree must not be rebuilt"


def test_built_binary_finds_the_build_without_building(binary: Path, tmp_path: Path) -> None:
    assert cpp.built_binary() == binary
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cpp.built_binary(empty) is None
    assert list(empty.iterdir()) == [], "built_binary must not build or lock"
    assert cpp.built_binary(tmp_path / "missing") is None
    assert not (tmp_path / "missing").exists()
    # A binary whose stamp names other sources is stale: build() would redo it.
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / cpp.BINARY_NAME).write_bytes(b"an old build")
    (stale / "lstm-export-build.json").write_text('{"fingerprint": "old"}')
    assert cpp.built_binary(stale) is None


def test_help_and_config_from_module_attributes(binary: Path, exported: Exported) -> None:
    assert _lstm_run(binary, "--help").stdout.startswith("usage: lstm_run MODEL.pt")
    assert cpp.model_config(binary, exported.model_pt) == exported.config
    # An export folder works as well as its model.pt.
    result = _lstm_run(binary, exported.model_pt.parent)
    assert result.returncode == 0, result.stderr
    layer_norm = "true" if exported.eager.layer_norm else "false"
    assert f"config: input_size=5 hidden_size=8 num_layers=2 layer_norm={layer_norm}" in (
        result.stdout
    )


# --- parity ----------------------------------------------------------------------------


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "given-state"])
@pytest.mark.parametrize(("seq", "batch"), [(1, 1), (17, 3)], ids=["seq1-batch1", "seq17-batch3"])
def test_whole_sequence_matches_eager(
    binary: Path, exported: Exported, seq: int, batch: int, with_state: bool
) -> None:
    x, state = _inputs(seq, batch, with_state, seed=seq)
    expected = _eager(exported.eager, x, state)
    if with_state:  # the test only means something if the state changes the result
        assert np.abs(expected[0] - _eager(exported.eager, x, None)[0]).max() > 1e-3
    assert np.abs(expected[0]).max() > 1e-2
    y, (h, c) = cpp.run(binary, exported.model_pt, x, state)
    assert y.shape == (seq, batch, HIDDEN)
    assert h.shape == c.shape == (LAYERS, batch, HIDDEN)
    _assert_close((y, h, c), expected)


@pytest.mark.parametrize(
    ("chunk", "with_state"),
    [(1, False), (1, True), (5, True), (40, False)],
    ids=["chunk1", "chunk1-state", "chunk5-state", "chunk40-longer-than-seq"],
)
def test_chunked_equals_whole(
    binary: Path, exported: Exported, chunk: int, with_state: bool
) -> None:
    x, state = _inputs(17, 3, with_state, seed=chunk)
    whole = cpp.run(binary, exported.model_pt, x, state)
    y, (h, c) = cpp.run(binary, exported.model_pt, x, state, chunk=chunk)
    whole_flat = (whole[0], *whole[1])
    # Same per-step arithmetic: streamed equals whole up to float rounding, and both
    # equal eager PyTorch.
    _assert_close((y, h, c), whole_flat, atol=1e-6)
    _assert_close((y, h, c), _eager(exported.eager, x, state))


@pytest.mark.parametrize("variant", ["npy-v2", "big-endian", "non-contiguous"])
def test_npy_reader_variants(binary: Path, model_pt: Path, tmp_path: Path, variant: str) -> None:
    """The reader handles what numpy may write: format 2.0 and '>f4' data."""
    x, _ = _inputs(6, 2, False, seed=5)
    path = tmp_path / "x.npy"
    if variant == "npy-v2":
        with open(path, "wb") as f:
            np.lib.format.write_array(f, x, version=(2, 0))
    elif variant == "big-endian":
        np.save(path, x.astype(">f4"))
    else:  # np.save writes a transposed view in C order when it is not Fortran-contiguous
        np.save(path, np.ascontiguousarray(x.transpose(1, 0, 2)).transpose(1, 0, 2))
    assert np.array_equal(np.load(path), x)
    result = _lstm_run(binary, model_pt, "--x", path, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    reference = _lstm_run(
        binary, model_pt, "--x", _save(tmp_path / "ref.npy", x), "--out", tmp_path / "ref"
    )
    assert reference.returncode == 0, reference.stderr
    for name in "yhc":
        assert np.array_equal(
            np.load(tmp_path / "out" / f"{name}.npy"), np.load(tmp_path / "ref" / f"{name}.npy")
        )


def _save(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


# --- error paths -----------------------------------------------------------------------


def test_missing_model_file(binary: Path, tmp_path: Path) -> None:
    line = _one_line_error(_lstm_run(binary, tmp_path / "nope.pt"))
    assert f"model file '{tmp_path / 'nope.pt'}' does not exist" in line


@pytest.mark.parametrize("kind", ["text", "state-dict"])
def test_non_torchscript_file(binary: Path, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "model.pt"
    if kind == "text":
        path.write_text("this is not a model\n")
    else:  # a zip archive, but a pickled state dict rather than TorchScript
        torch.save(LSTM(INPUT, HIDDEN).state_dict(), path)
    line = _one_line_error(_lstm_run(binary, path))
    assert f"cannot load '{path}' as a TorchScript module" in line


def test_torchscript_module_that_is_not_an_lstm(binary: Path, tmp_path: Path) -> None:
    path = tmp_path / "linear.pt"
    with quiet_torchscript():
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 3)), str(path))
    line = _one_line_error(_lstm_run(binary, path))
    assert "not an lstm_export LSTM: it has no 'input_size' attribute" in line


@pytest.mark.parametrize("chunk", [None, 2])
def test_wrong_feature_size_reports_model_message(
    binary: Path, model_pt: Path, tmp_path: Path, chunk: int | None
) -> None:
    x = _save(tmp_path / "x.npy", np.zeros((4, 3, 6), np.float32))
    out = tmp_path / "out"
    args = [model_pt, "--x", x, "--out", out] + (["--chunk", chunk] if chunk else [])
    line = _one_line_error(_lstm_run(binary, *args))
    assert line == (
        "lstm_run: error: ValueError: x must have shape "
        "[seq>=1, batch>=1, input_size=5], got [4, 3, 6]"
    )
    assert not (out / "y.npy").exists()


@pytest.mark.parametrize("chunk", [None, 2])
def test_wrong_state_batch_reports_model_message(
    binary: Path, model_pt: Path, tmp_path: Path, chunk: int | None
) -> None:
    x = _save(tmp_path / "x.npy", np.zeros((4, 3, INPUT), np.float32))
    h0 = _save(tmp_path / "h0.npy", np.zeros((LAYERS, 2, HIDDEN), np.float32))
    c0 = _save(tmp_path / "c0.npy", np.zeros((LAYERS, 3, HIDDEN), np.float32))
    args = [model_pt, "--x", x, "--h0", h0, "--c0", c0] + (["--chunk", chunk] if chunk else [])
    line = _one_line_error(_lstm_run(binary, *args))
    assert line.endswith(
        "ValueError: h0 must have shape [num_layers=2, batch=3, hidden_size=8], got [2, 2, 8]"
    )


def test_wrong_rank_reports_model_message(binary: Path, model_pt: Path, tmp_path: Path) -> None:
    x = _save(tmp_path / "x.npy", np.zeros((4, INPUT), np.float32))
    line = _one_line_error(_lstm_run(binary, model_pt, "--x", x, "--chunk", 1))
    assert line.endswith("x must have shape [seq>=1, batch>=1, input_size=5], got [4, 5]")


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "does not exist"),
        ("garbage", "not a .npy file (bad magic bytes)"),
        ("truncated", "(truncated or corrupt file)"),
        ("float64", "expected float32 data (descr '<f4'), got '<f8'"),
        ("fortran", "Fortran-order arrays are not supported"),
        ("bad-header", "malformed .npy header"),
    ],
)
def test_malformed_npy(
    binary: Path, model_pt: Path, tmp_path: Path, kind: str, message: str
) -> None:
    path = tmp_path / "x.npy"
    x = np.ones((4, 3, INPUT), np.float32)
    if kind == "garbage":
        path.write_bytes(b"\x00\x01 definitely not numpy")
    elif kind == "truncated":
        path.write_bytes(_save(path, x).read_bytes()[:-7])
    elif kind == "float64":
        np.save(path, x.astype(np.float64))
    elif kind == "fortran":
        np.save(path, np.asfortranarray(x))
    elif kind == "bad-header":
        path.write_bytes(_save(path, x).read_bytes().replace(b"'shape'", b"'shope'"))
    line = _one_line_error(_lstm_run(binary, model_pt, "--x", path))
    assert str(path) in line
    assert message in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--chunk", "0"], "--chunk must be an integer >= 1, got '0'"),
        (["--chunk", "3x"], "--chunk must be an integer >= 1, got '3x'"),
        (["--threads", "0"], "--threads must be an integer >= 1, got '0'"),
        (["--h0", "h0.npy"], "give both --h0 and --c0, or neither"),
        (["--frobnicate"], "unknown option '--frobnicate'"),
        (["--x"], "--x needs a value"),
        (["--time-seq", "0", "--time-batch", "2"], "--time-seq must be an integer >= 1, got '0'"),
        (["--time-seq", "2", "--time-batch", "-1"], "--time-batch must be an integer >= 1"),
        (["--time-seq", "2", "--time-batch", "2", "--repeats", "x"], "--repeats must be"),
        (
            ["--time-seq", "2", "--time-batch", "2", "--warmup", "-1"],
            "--warmup must be an integer >= 0",
        ),
        (["--time-seq", "9" * 20, "--time-batch", "2"], "--time-seq must be an integer >= 1"),
        (["--time-seq", "2"], "give both --time-seq and --time-batch, or neither"),
        (["--repeats", "3"], "--repeats and --warmup need --time-seq and --time-batch"),
        (["--time-seq", "2", "--time-batch", "2", "--x", "x.npy"], "make their own input"),
    ],
)
def test_bad_command_line_exits_2(binary: Path, model_pt: Path, args: list[str], message: str):
    line = _one_line_error(_lstm_run(binary, model_pt, *args), expected_code=2)
    assert message in line


def test_run_helper_raises_with_the_model_message(binary: Path, model_pt: Path) -> None:
    with pytest.raises(cpp.CppRunError, match=r"input_size=5\], got \[4, 3, 6\]") as info:
        cpp.run(binary, model_pt, np.zeros((4, 3, 6), np.float32))
    assert info.value.returncode == 1
    with pytest.raises(UsageError, match="does not exist"):
        cpp.run(binary, model_pt.parent / "missing.pt", np.zeros((4, 3, INPUT)))
    with pytest.raises(UsageError, match="chunk must be"):
        cpp.run(binary, model_pt, np.zeros((4, 3, INPUT)), chunk=0)


# --- timing ----------------------------------------------------------------------------


def test_time_forward_returns_every_sample(binary: Path, model_pt: Path) -> None:
    samples = cpp.time_forward(binary, model_pt, 6, 2, repeats=4, warmup=1)
    assert len(samples) == 4
    assert all(isinstance(ms, float) and math.isfinite(ms) and ms > 0 for ms in samples)
    # No warmup is allowed, and an export folder works as well as its model.pt.
    assert len(cpp.time_forward(binary, model_pt.parent, 1, 1, repeats=2, warmup=0)) == 2


def test_timing_mode_prints_one_line_with_the_default_repeats(binary: Path, model_pt: Path) -> None:
    result = _lstm_run(binary, model_pt, "--time-seq", 3, "--time-batch", 2)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("timing_ms:")]
    assert len(lines) == 1, result.stdout
    assert len(lines[0].split()[1:]) == 15
    assert "timed forward(x [3, 2, 5], None): 3 warmup + 15 timed calls" in result.stdout


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq": 0}, "seq must be an integer >= 1, got 0"),
        ({"batch": 2.0}, "batch must be an integer >= 1"),
        ({"repeats": True}, "repeats must be an integer >= 1"),
        ({"warmup": -1}, "warmup must be an integer >= 0"),
        ({"threads": 0}, "threads must be an integer >= 1"),
    ],
)
def test_time_forward_refuses_bad_arguments(
    binary: Path, model_pt: Path, kwargs: dict, message: str
) -> None:
    args = {"seq": 2, "batch": 1, **kwargs}
    seq, batch = args.pop("seq"), args.pop("batch")
    with pytest.raises(UsageError, match=message):
        cpp.time_forward(binary, model_pt, seq, batch, **args)


def test_time_forward_raises_the_binary_error(binary: Path, tmp_path: Path) -> None:
    path = tmp_path / "linear.pt"
    with quiet_torchscript():
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 3)), str(path))
    with pytest.raises(cpp.CppRunError, match="not an lstm_export LSTM") as info:
        cpp.time_forward(binary, path, 2, 1)
    assert info.value.returncode == 1


# --- cpp_check -------------------------------------------------------------------------


def test_cpp_check_passes_on_an_export_folder(binary: Path, exported: Exported) -> None:
    report = cpp_check(exported.model_pt.parent)
    assert report.binary == binary
    assert report.cpp_config == exported.config
    rows = [r for r in report.parity.results if r.backend == CPP_BACKEND]
    assert [r.case for r in rows] == [
        "9x3 zeros",
        "9x3 h0/c0",
        "9x3 h0/c0 chunks 4+4+1",
        "1x1 zeros",
        "9x3 h0/c0 ragged",
    ]
    assert all(0 <= e <= TOL for r in rows for e in r.error.values())
    assert report.passed
    assert report.raise_if_failed() is report
    assert "PASS" in str(report)
    assert report.to_dict()["passed"] is True


def test_cpp_check_fails_when_outputs_differ(
    binary: Path, model_pt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_run = cpp.run

    def off_by_a_bit(*args, **kwargs):
        y, (h, c) = real_run(*args, **kwargs)
        return y, (h, c + 1e-4)

    monkeypatch.setattr(cpp, "run", off_by_a_bit)
    report = cpp_check(model_pt.parent)
    assert not report.passed
    rows = [r for r in report.parity.results if r.backend == CPP_BACKEND]
    assert len(rows) == 5 and all(r.error["c"] >= 1e-4 > r.allowed["c"] for r in rows)
    assert all(r.passed for r in report.parity.results if r.backend == "eager")
    assert "FAIL" in str(report)
    with pytest.raises(ParityError, match=r"libtorch C\+\+, case .*, output c: error 1\.0"):
        report.raise_if_failed()


def test_cpp_check_refuses_missing_input(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        cpp_check(tmp_path / "no-such-export")
    with pytest.raises(UsageError, match=r"model\.pt"):
        cpp_check(tmp_path)  # exists, but holds no model.pt


# --- toolchain discovery (no build needed) ---------------------------------------------


def test_missing_cmake_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpp, "_which", lambda name: None if name == "cmake" else Path(name))
    with pytest.raises(cpp.ToolchainError, match="cmake not found"):
        cpp.find_toolchain()


def test_missing_compiler_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    compilers = {"c++", "g++", "clang++"}
    monkeypatch.setattr(cpp, "_which", lambda name: None if name in compilers else Path(name))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(cpp.ToolchainError, match="no C\\+\\+ compiler found"):
        cpp.find_toolchain()
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(
        cpp, "_which", lambda name: None if name == "no-such-compiler" else Path(name)
    )
    with pytest.raises(cpp.ToolchainError, match="CXX='no-such-compiler'"):
        cpp.find_toolchain()


# --- the fused kernel (export --fused-kernel) -------------------------------------------


@pytest.fixture(scope="session")
def fused(tmp_path_factory: pytest.TempPathFactory) -> tuple[Exported, Path]:
    """model.fused.pt and the kernel library as an export writes them."""
    from lstm_export.native.torch_kernel import build_kernel

    exported = _export(True, tmp_path_factory.mktemp("fused"), seed=21)
    library = exported.model_pt.parent / KERNEL_LIBRARY
    shutil.copyfile(build_kernel(), library)
    fused_pt = exported.model_pt.parent / FUSED_TORCHSCRIPT_FILE
    save_torchscript(exported.eager, fused_pt, fused_kernel=True)
    return Exported(exported.eager, fused_pt), library


@pytest.mark.parametrize("chunk", [None, 4], ids=["whole", "chunk4"])
def test_fused_model_runs_in_cpp_with_its_library(binary: Path, fused, chunk) -> None:
    exported, library = fused
    x, state = _inputs(17, 3, True, seed=5)
    y, (h, c) = cpp.run(binary, exported.model_pt, x, state, chunk=chunk, kernels=library)
    _assert_close((y, h, c), _eager(exported.eager, x, state))
    samples = cpp.time_forward(binary, exported.model_pt, 9, 2, repeats=2, kernels=library)
    assert len(samples) == 2


def test_fused_model_without_its_library_says_what_to_load(binary: Path, fused) -> None:
    exported, library = fused
    message = _one_line_error(_lstm_run(binary, exported.model_pt))
    assert "lstm_export::layer_norm_lstm_layer" in message and "--kernels" in message
    missing = library.parent / "absent.so"
    message = _one_line_error(_lstm_run(binary, exported.model_pt, "--kernels", missing))
    assert f"cannot load the op library '{missing}'" in message


def test_cpp_check_also_checks_model_fused_pt(binary: Path, fused) -> None:
    exported, _library = fused
    report = cpp_check(exported.model_pt.parent)
    backends = [r.backend for r in report.parity.results]
    assert backends.count(CPP_BACKEND) == backends.count(FUSED_CPP_BACKEND) == 5
    assert report.passed, str(report)


# --- lengths, batch-first and bidirectional (forward(x, state, lengths)) -----------------

DATA = Path(__file__).parents[1] / "data"
# (layer_norm, batch_first, bidirectional): every combination.
LAYOUTS = [(ln, bf, bi) for ln in (False, True) for bf in (False, True) for bi in (False, True)]


def _layout_id(layout: tuple[bool, bool, bool]) -> str:
    names = ("layer_norm", "batch_first", "bidirectional")
    return "-".join(n for n, on in zip(names, layout, strict=True) if on) or "plain"


def _layout_model(layout: tuple[bool, bool, bool], seed: int) -> LSTM:
    return build_model(LSTMConfig(INPUT, HIDDEN, LAYERS, *layout), seed=seed).eval()


@pytest.fixture(scope="session", params=LAYOUTS, ids=map(_layout_id, LAYOUTS))
def layout_export(request: pytest.FixtureRequest, tmp_path_factory) -> Exported:
    eager = _layout_model(request.param, seed=LAYOUTS.index(request.param))
    folder = tmp_path_factory.mktemp(_layout_id(request.param))
    save_torchscript(eager, folder / "model.pt")
    return Exported(eager, folder / "model.pt")


def _ragged(model: LSTM, lengths: list[int], seq: int = 9, seed: int = 0):
    """x in the model's layout, a random (h0, c0) and int64 lengths."""
    rng = np.random.default_rng(seed)
    batch = len(lengths)
    x = rng.standard_normal((seq, batch, INPUT), dtype=np.float32)
    if model.batch_first:
        x = np.ascontiguousarray(x.transpose(1, 0, 2))
    shape = (LAYERS * model.num_directions, batch, HIDDEN)
    state = tuple(rng.standard_normal(shape, dtype=np.float32) for _ in "hc")
    return x, state, np.array(lengths, dtype=np.int64)


def _eager64(model: LSTM, x: np.ndarray, state, lengths) -> tuple[np.ndarray, ...]:
    """The independent reference: the eager model in float64 with the same weights."""
    model64 = copy.deepcopy(model).double()
    given = None if state is None else tuple(torch.from_numpy(s).double() for s in state)
    steps = None if lengths is None else torch.from_numpy(lengths)
    with torch.no_grad():
        y, (h, c) = model64(torch.from_numpy(x).double(), given, steps)
    return y.numpy(), h.numpy(), c.numpy()


# A full sequence beside a length-1 one, and lengths in between.
RAGGED = [9, 1, 5, 3]


def test_lengths_in_every_layout_match_eager_float64(binary: Path, layout_export: Exported):
    eager = layout_export.eager
    assert cpp.model_config(binary, layout_export.model_pt) == eager.config()
    x, state, lengths = _ragged(eager, RAGGED)
    expected = _eager64(eager, x, state, lengths)
    # Only means something if the padding changes the answer.
    assert np.abs(expected[1] - _eager64(eager, x, state, None)[1]).max() > 1e-2
    y, (h, c) = cpp.run(binary, layout_export.model_pt, x, state, lengths=lengths)
    _assert_close((y, h, c), expected)


@pytest.fixture(scope="session")
def fused_layouts(tmp_path_factory) -> tuple[list[Exported], Path]:
    """model.fused.pt for each LayerNorm layout, and our build of the kernel library."""
    from lstm_export.native.torch_kernel import build_kernel

    library = build_kernel()
    exports = []
    for layout in (lay for lay in LAYOUTS if lay[0]):
        eager = _layout_model(layout, seed=30 + LAYOUTS.index(layout))
        path = tmp_path_factory.mktemp("fused-" + _layout_id(layout)) / FUSED_TORCHSCRIPT_FILE
        save_torchscript(eager, path, fused_kernel=True)
        exports.append(Exported(eager, path))
    return exports, library


def test_fused_model_with_lengths_in_every_layout_matches_eager_float64(
    binary: Path, fused_layouts
) -> None:
    exports, library = fused_layouts
    for exported in exports:
        x, state, lengths = _ragged(exported.eager, RAGGED, seed=1)
        y, (h, c) = cpp.run(binary, exported.model_pt, x, state, lengths=lengths, kernels=library)
        _assert_close((y, h, c), _eager64(exported.eager, x, state, lengths))


def test_batch_first_streams_along_its_time_axis(binary: Path, tmp_path: Path) -> None:
    eager = _layout_model((True, True, False), seed=5)
    save_torchscript(eager, tmp_path / "model.pt")
    x, state, _ = _ragged(eager, [9, 9, 9], seq=11)
    y, (h, c) = cpp.run(binary, tmp_path / "model.pt", x, state, chunk=4)
    _assert_close((y, h, c), _eager64(eager, x, state, None))
    result = _lstm_run(binary, tmp_path / "model.pt", "--time-seq", 6, "--time-batch", 2)
    assert "timed forward(x [2, 6, 5], None)" in result.stdout, result.stderr


@pytest.mark.parametrize("name", ["export_v2_plain", "export_v2_layer_norm"])
def test_an_export_from_before_lengths_runs_and_refuses_lengths_in_one_line(
    binary: Path, tmp_path: Path, name: str
) -> None:
    from lstm_export.exporters.torchscript import load_torchscript

    model_pt = DATA / name / "model.pt"
    scripted, config = load_torchscript(model_pt)
    eager = LSTM.from_config(config)
    eager.load_state_dict(scripted.state_dict())
    assert cpp.model_config(binary, model_pt) == config  # no batch_first/bidirectional: false
    x, state, lengths = _ragged(eager.eval(), [7, 7, 7], seq=7)
    expected = _eager64(eager, x, state, None)
    for chunk in (None, 3):
        y, (h, c) = cpp.run(binary, model_pt, x, state, chunk=chunk)
        _assert_close((y, h, c), expected)
    args = ["--x", _save(tmp_path / "x.npy", x), "--lengths", _save(tmp_path / "l.npy", lengths)]
    line = _one_line_error(_lstm_run(binary, model_pt, *args), expected_code=2)
    assert "has forward(x, state) without lengths" in line and "re-export it" in line


@pytest.mark.parametrize(
    ("lengths", "message"),
    [
        ([4, 0, 2], "ValueError: lengths must each be in 1..seq=4, got 0"),
        ([4, 5, 2], "ValueError: lengths must each be in 1..seq=4, got 5"),
        ([4, 2], "ValueError: lengths must have shape [batch=3], got [2]"),
        ([[4, 2, 1]], "ValueError: lengths must have shape [batch=3], got [1, 3]"),
        (np.array([4.0, 2.0, 1.0]), "expected int64 data (descr '<i8'), got '<f8'"),
    ],
    ids=["zero", "above-seq", "short", "2d", "float64"],
)
def test_bad_lengths_are_one_line(
    binary: Path, model_pt: Path, tmp_path: Path, lengths, message: str
) -> None:
    x = _save(tmp_path / "x.npy", np.zeros((4, 3, INPUT), np.float32))
    path = tmp_path / "lengths.npy"
    np.save(path, np.asarray(lengths) if isinstance(lengths, np.ndarray) else np.int64(lengths))
    line = _one_line_error(_lstm_run(binary, model_pt, "--x", x, "--lengths", path))
    assert message in line, line


def test_lengths_and_chunks_are_refused_where_undefined(binary: Path, tmp_path: Path) -> None:
    x = _save(tmp_path / "x.npy", np.zeros((4, 3, INPUT), np.float32))
    lengths = _save(tmp_path / "l.npy", np.array([4, 1, 2]))
    bidirectional = _layout_model((False, False, True), seed=2)
    save_torchscript(bidirectional, tmp_path / "model.pt")
    model = tmp_path / "model.pt"
    line = _one_line_error(
        _lstm_run(binary, model, "--x", x, "--lengths", lengths, "--chunk", 2), expected_code=2
    )
    assert "a padded batch with --lengths runs whole" in line
    line = _one_line_error(_lstm_run(binary, model, "--x", x, "--chunk", 2), expected_code=2)
    assert "this model is bidirectional" in line and "drop --chunk" in line
    line = _one_line_error(_lstm_run(binary, model, "--lengths", lengths), expected_code=2)
    assert "--lengths needs --x" in line
    with pytest.raises(UsageError, match="give chunk or lengths, not both"):
        cpp.run(binary, model, np.zeros((4, 3, INPUT)), chunk=2, lengths=[4, 1, 2])
    with pytest.raises(UsageError, match="lengths must be an integer array"):
        cpp.run(binary, model, np.zeros((4, 3, INPUT)), lengths=[4.0, 1.0, 2.0])
    with pytest.raises(cpp.CppRunError, match=r"lengths must each be in 1\.\.seq=4, got 9"):
        cpp.run(binary, model, np.zeros((4, 3, INPUT)), lengths=torch.tensor([4, 9, 2]))
    samples = cpp.time_forward(binary, model, 4, 3, repeats=2, warmup=0, lengths=[4, 1, 2])
    assert len(samples) == 2


def test_cpp_check_of_a_bidirectional_batch_first_folder_and_of_one_from_before_lengths(
    binary: Path, tmp_path: Path
) -> None:
    """No stream for a bidirectional model, no ragged case for a forward without lengths."""
    eager = _layout_model((True, True, True), seed=9)
    save_torchscript(eager, tmp_path / "model.pt")
    report = cpp_check(tmp_path)
    assert report.passed, str(report)
    assert report.cpp_config == eager.config()
    cases = [r.case for r in report.parity.results if r.backend == CPP_BACKEND]
    assert cases == ["9x3 zeros", "9x3 h0/c0", "1x1 zeros", "9x3 h0/c0 ragged"]
    old = cpp_check(DATA / "export_v2_plain")
    assert old.passed, str(old)
    cases = [r.case for r in old.parity.results if r.backend == CPP_BACKEND]
    assert cases == ["9x3 zeros", "9x3 h0/c0", "9x3 h0/c0 chunks 4+4+1", "1x1 zeros"]


# --- model.pt2 (export --pt2): AOTIModelPackageLoader ------------------------------------

PT2_FOLDERS = ["pt2_export", "plain_pt2_export"]


@pytest.fixture(scope="session")
def kernels() -> Path:
    """Our build of the op library model.pt2 calls, never an export folder's copy."""
    from lstm_export.native.torch_kernel import build_kernel

    return build_kernel()


def _pt2_folder(request: pytest.FixtureRequest, name: str) -> Path:
    return Path(request.getfixturevalue(name))


def _eager_from_folder(folder: Path) -> LSTM:
    """The independent reference: the eager model rebuilt from the config and model.pt's
    weights (model.pt2 is compiled code, its weights are not read back from it)."""
    from lstm_export.exporters.torchscript import load_torchscript

    scripted, config = load_torchscript(folder / "model.pt")
    eager = LSTM.from_config(config)
    eager.load_state_dict(scripted.state_dict())
    return eager.eval()


def _pt2_inputs(config: LSTMConfig, lengths: list[int], seq: int = 9, seed: int = 0):
    """x in the model's layout, a random (h0, c0) and int64 lengths, for any config."""
    rng = np.random.default_rng(seed)
    batch = len(lengths)
    shape = (
        (batch, seq, config.input_size) if config.batch_first else (seq, batch, config.input_size)
    )
    x = rng.standard_normal(shape, dtype=np.float32)
    state_shape = (config.num_layers * config.num_directions, batch, config.hidden_size)
    state = tuple(rng.standard_normal(state_shape, dtype=np.float32) for _ in "hc")
    return x, state, np.array(lengths, dtype=np.int64)


def test_is_package_and_the_config_read_from_pt2_metadata(
    binary: Path, kernels: Path, request: pytest.FixtureRequest
) -> None:
    assert cpp.is_package("a/model.pt2") and cpp.is_package(Path("other.pt2"))
    assert not cpp.is_package("a/model.pt") and not cpp.is_package("a/export")
    for name in PT2_FOLDERS:
        folder = _pt2_folder(request, name)
        expected = _eager_from_folder(folder).config()
        assert cpp.model_config(binary, folder / PT2_FILE, kernels=kernels) == expected
        # The folder keeps meaning its model.pt, which reads the same config.
        assert cpp.model_config(binary, folder) == expected


@pytest.mark.parametrize("name", PT2_FOLDERS)
def test_cpp_check_runs_model_pt2_as_its_own_row(
    binary: Path, request: pytest.FixtureRequest, name: str
) -> None:
    folder = _pt2_folder(request, name)
    report = cpp_check(folder)
    assert report.passed, str(report)
    assert report.pt2_config == report.config == report.cpp_config
    rows = [r for r in report.parity.results if r.backend == PT2_CPP_BACKEND]
    expected = ["9x3 zeros", "9x3 h0/c0", "9x3 h0/c0 chunks 4+4+1", "1x1 zeros", "9x3 h0/c0 ragged"]
    if report.config.bidirectional:  # no stream for a bidirectional model
        expected.remove("9x3 h0/c0 chunks 4+4+1")
    assert [r.case for r in rows] == expected
    assert [r.case for r in report.parity.results if r.backend == CPP_BACKEND] == expected
    assert f"config read in C++ from {PT2_FILE}" in str(report)
    assert report.to_dict()["pt2_config"] == report.config.to_dict()


@pytest.mark.parametrize(
    ("with_state", "with_lengths"),
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["model", "model_state", "model_lengths", "model_state_lengths"],
)
@pytest.mark.parametrize("name", PT2_FOLDERS)
def test_pt2_in_cpp_equals_python_pt2_and_eager_float64(
    binary: Path,
    kernels: Path,
    request: pytest.FixtureRequest,
    name: str,
    with_state: bool,
    with_lengths: bool,
) -> None:
    """Each of the package's four compiled models, picked by the call's form."""
    from lstm_export.runtime.pt2 import Pt2LSTM

    folder = _pt2_folder(request, name)
    eager = _eager_from_folder(folder)
    x, state, lengths = _pt2_inputs(eager.config(), RAGGED, seed=7)
    state = state if with_state else None
    lengths = lengths if with_lengths else None
    y, (h, c) = cpp.run(binary, folder / PT2_FILE, x, state, kernels=kernels, lengths=lengths)
    expected = _eager64(eager, x, state, lengths)
    if with_lengths:  # the lengths must matter for this to test them
        assert np.abs(expected[1] - _eager64(eager, x, state, None)[1]).max() > 1e-2
    _assert_close((y, h, c), expected)
    python = Pt2LSTM(folder)(
        torch.from_numpy(x),
        None if state is None else tuple(map(torch.from_numpy, state)),
        None if lengths is None else torch.from_numpy(lengths),
    )
    # The same compiled code on the same input: the same numbers up to a rounding.
    _assert_close((y, h, c), (python[0].numpy(), *(t.numpy() for t in python[1])), atol=1e-6)


@pytest.mark.parametrize(("chunk", "with_state"), [(4, True), (1, False), (40, True)])
def test_pt2_streams_in_chunks_carrying_the_state(
    binary: Path, kernels: Path, pt2_export: Path, chunk: int, with_state: bool
) -> None:
    eager = _eager_from_folder(pt2_export)
    x, state, _ = _pt2_inputs(eager.config(), [9, 9, 9], seq=9, seed=chunk)
    state = state if with_state else None
    model = pt2_export / PT2_FILE
    whole = cpp.run(binary, model, x, state, kernels=kernels)
    y, (h, c) = cpp.run(binary, model, x, state, chunk, kernels=kernels)
    _assert_close((y, h, c), (whole[0], *whole[1]), atol=1e-5)
    _assert_close((y, h, c), _eager64(eager, x, state, None))


def _pt2_error(binary: Path, model: Path, *args: object, code: int = 1) -> str:
    return _one_line_error(_lstm_run(binary, model, *args), expected_code=code)


def test_pt2_bad_inputs_are_one_line_errors_before_the_compiled_model_runs(
    binary: Path, kernels: Path, pt2_export: Path, tmp_path: Path
) -> None:
    """The compiled model checks nothing itself: every one of these would read garbage."""
    model = pt2_export / PT2_FILE
    cfg = _eager_from_folder(pt2_export).config()
    x = _save(tmp_path / "x.npy", np.zeros((4, 3, cfg.input_size), np.float32))
    k = ["--kernels", kernels]

    def save(name: str, array: np.ndarray) -> Path:
        return _save(tmp_path / f"{name}.npy", array)

    wrong_x = save("wrong_x", np.zeros((4, 3, cfg.input_size + 1), np.float32))
    for chunk in ([], ["--chunk", 2]):
        line = _pt2_error(binary, model, *k, "--x", wrong_x, *chunk)
        assert line == (
            "lstm_run: error: ValueError: x must have shape [seq>=1, batch>=1, "
            f"input_size={cfg.input_size}], got [4, 3, {cfg.input_size + 1}]"
        )
    line = _pt2_error(binary, model, *k, "--x", save("flat", np.zeros((4, cfg.input_size), "f4")))
    assert line.endswith(f"got [4, {cfg.input_size}]")

    good = save("good", np.zeros((cfg.num_layers, 3, cfg.hidden_size), np.float32))
    bad = save("bad", np.zeros((cfg.num_layers, 2, cfg.hidden_size), np.float32))
    for chunk in ([], ["--chunk", 2]):
        line = _pt2_error(binary, model, *k, "--x", x, "--h0", good, "--c0", bad, *chunk)
        assert line.endswith(
            f"ValueError: c0 must have shape [num_layers={cfg.num_layers}, batch=3, "
            f"hidden_size={cfg.hidden_size}], got [{cfg.num_layers}, 2, {cfg.hidden_size}]"
        )

    for lengths, message in [
        (np.array([4, 1, 2], np.int32), "expected int64 data (descr '<i8'), got '<i4'"),
        (np.array([4, 0, 2]), "ValueError: lengths must each be in 1..seq=4, got 0"),
        (np.array([4, 5, 2]), "ValueError: lengths must each be in 1..seq=4, got 5"),
        (np.array([4, 2]), "ValueError: lengths must have shape [batch=3], got [2]"),
    ]:
        line = _pt2_error(binary, model, *k, "--x", x, "--lengths", save("lengths", lengths))
        assert message in line, line
    # The same refusals through the Python helper, as a CppRunError with the exit code.
    with pytest.raises(cpp.CppRunError, match=r"lengths must each be in 1\.\.seq=4, got 9") as e:
        cpp.run(binary, model, np.zeros((4, 3, cfg.input_size)), lengths=[4, 9, 2], kernels=kernels)
    assert e.value.returncode == 1


def test_pt2_without_its_op_library_says_to_pass_kernels(
    binary: Path, pt2_export: Path, plain_pt2_export: Path, tmp_path: Path
) -> None:
    for folder in (pt2_export, plain_pt2_export):
        line = _pt2_error(binary, folder / PT2_FILE)
        assert "Could not find schema for lstm_export::" in line, line
        assert line.endswith("load its op library with --kernels lstm_export_kernels.so")
    junk = tmp_path / "junk.pt2"
    junk.write_text("not a package\n")
    line = _pt2_error(binary, junk)
    assert f"cannot load model 'model' of '{junk}' as an AOTInductor package" in line
    line = _pt2_error(binary, tmp_path / "missing.pt2")
    assert f"model file '{tmp_path / 'missing.pt2'}' does not exist" in line


def _with_config(source: Path, target: Path, config: str | None) -> Path:
    """A copy of `source` whose models' metadata hold `config` (None: no config at all)."""
    import json
    import zipfile

    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("_metadata.json"):
                meta = json.loads(data)
                meta.pop("lstm_export.config")
                if config is not None:
                    meta["lstm_export.config"] = config
                data = json.dumps(meta).encode()
            zout.writestr(info, data)
    return target


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (None, "is an AOTInductor package but not an lstm_export one"),
        ('{"input_size": 5}', '(no "hidden_size")'),
        (
            '{"input_size": 5, "hidden_size": 8, "num_layers": 2, "layer_norm": false, "x": 1}',
            '(unknown key "x")',
        ),
        (
            '{"input_size": 5, "hidden_size": 8, "num_layers": 0, "layer_norm": false}',
            '("num_layers" must be a whole number >= 1)',
        ),
        (
            '{"input_size": 5, "hidden_size": 8, "num_layers": 2, "layer_norm": "no"}',
            '("layer_norm" is not a whole number, true or false)',
        ),
        (
            '{"input_size": 5, "hidden_size": 8, "num_layers": 2, "layer_norm": 1}',
            '("layer_norm" must be true or false)',
        ),
        ('{"input_size": 5, "input_size": 5}', '("input_size" given twice)'),
        ('{"input_size": 5.5}', "(expected '}' at character 16)"),
        ("[]", "(expected '{' at character 0)"),
        ('{"input_size": 5} {}', "(text after the object)"),
    ],
    ids=[
        "none",
        "missing",
        "unknown",
        "zero",
        "string",
        "int-flag",
        "twice",
        "float",
        "list",
        "trailing",
    ],
)
def test_pt2_config_metadata_is_read_strictly(
    binary: Path, kernels: Path, plain_pt2_export: Path, tmp_path: Path, config, message: str
) -> None:
    bad = _with_config(plain_pt2_export / PT2_FILE, tmp_path / "bad.pt2", config)
    line = _pt2_error(binary, bad, "--kernels", kernels)
    assert message in line, line
    if config is not None:
        assert line.startswith(f"lstm_run: error: '{bad}' has an invalid lstm_export.config")


def test_pt2_chunks_refused_for_a_bidirectional_model_and_timing(
    binary: Path, kernels: Path, plain_pt2_export: Path, tmp_path: Path
) -> None:
    model = plain_pt2_export / PT2_FILE
    x = _save(tmp_path / "x.npy", np.zeros((3, 4, INPUT), np.float32))  # batch-first
    line = _pt2_error(binary, model, "--kernels", kernels, "--x", x, "--chunk", 2, code=2)
    assert "this model is bidirectional" in line and "drop --chunk" in line
    result = _lstm_run(binary, model, "--kernels", kernels, "--time-seq", 6, "--time-batch", 2)
    assert result.returncode == 0, result.stderr
    assert "timed forward(x [2, 6, 5], None): 3 warmup + 15 timed calls, 1 thread(s)" in (
        result.stdout
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("timing_ms:")]
    assert len(lines) == 1 and len(lines[0].split()) == 16
    samples = cpp.time_forward(binary, model, 6, 2, repeats=3, kernels=kernels, lengths=[6, 1])
    assert len(samples) == 3 and all(math.isfinite(ms) and ms > 0 for ms in samples)


def test_pt2_config_metadata_with_control_characters_is_shown_escaped(
    binary: Path, kernels: Path, plain_pt2_export: Path, tmp_path: Path
) -> None:
    """Text from the package reaches the terminal with its control characters escaped."""
    config = '{"input_size": 5, "\x1b[31mred": 1,\n"x": 2}'
    bad = _with_config(plain_pt2_export / PT2_FILE, tmp_path / "bad.pt2", config)
    result = _lstm_run(binary, bad, "--kernels", kernels)
    assert result.returncode == 1
    assert "\x1b" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert '"\\x1b[31mred": 1,\\x0a"x": 2}' in result.stderr, result.stderr
