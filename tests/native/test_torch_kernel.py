"""The fused LayerNorm-LSTM kernel against the eager reference (the equations written out).

The kernel has AVX2 blocks and scalar tails; the sizes below hit both: hidden 8
(whole vectors), 13 and 20 (tails), 1 (tails only), 36 (several row blocks).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import helpers
from helpers import interrupt_once_started, run_cli, run_python, small_model, wait_until_gone
from lstm_export.artifacts import ATOL as TOLERANCE
from lstm_export.artifacts import FUSED_TORCHSCRIPT_FILE, MANIFEST_FILE, TORCHSCRIPT_FILE
from lstm_export.checkpoints import build_model
from lstm_export.config import LSTMConfig
from lstm_export.errors import UsageError
from lstm_export.exporters.routes import KernelLayer, KernelLSTM
from lstm_export.exporters.torchscript import script
from lstm_export.native import build
from lstm_export.native import torch_kernel as kernels
from lstm_export.pipeline import export
from lstm_export.verification.backends import FUSED_BACKEND, torch_backend
from lstm_export.verification.cases import Case
from lstm_export.verification.folder import verify
from lstm_export.verification.parity import Reference, check_parity

# Every test here needs the kernel, which is compiled C++ (about 15 s where no cache holds it);
# many also export with it or start Python processes. `-m "not slow"` leaves them out.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _kernel() -> Path:
    """The kernel library, built (or found in the cache) and loaded once for this module."""
    return kernels.build_kernel()


@pytest.fixture(scope="module")
def fused_export(_kernel, tmp_path_factory) -> Path:
    """One export with model.fused.pt, shared by the tests that only read it (copy to edit)."""
    return export(
        small_model(True, 2), tmp_path_factory.mktemp("fused") / "m", fused_kernel=True
    ).out_dir


@pytest.mark.parametrize(
    "sizes", [(5, 13, 3), (3, 8, 1), (7, 1, 2), (4, 20, 1), (16, 36, 2)], ids=str
)
def test_kernel_matches_the_eager_equations(sizes):
    """The parity engine's rule against the eager model in float64, batches 1 to 5 (the
    dot-product route at 1, packed weight panels from 2), with and without a state."""
    model = build_model(LSTMConfig(*sizes, layer_norm=True), seed=sum(sizes))
    fused = script(KernelLSTM(model))
    cases = [Case(s, b, st) for s in (1, 2, 17) for b in (1, 2, 3, 4, 5) for st in (False, True)]
    report = check_parity(Reference(model), [torch_backend("kernel", fused)], cases)
    assert report.passed, report.summary()
    assert sum(r.backend == "kernel" for r in report.results) == len(cases)


@pytest.mark.parametrize("hidden", [8, 13, 16])
def test_kernel_carries_state_across_chunks_like_one_run(hidden):
    model = build_model(LSTMConfig(6, hidden, 2, True), seed=hidden)
    fused = script(KernelLSTM(model))
    x = torch.randn(23, 3, 6)
    with torch.inference_mode():
        whole, (h_whole, c_whole) = model(x)
        first, state = fused(x[:9])  # 9 steps: the packed-panel route; 1 and 13: dot products
        second, state = fused(x[9:10], state)
        third, (h, c) = fused(x[10:], state)
    assert torch.allclose(torch.cat([first, second, third]), whole, atol=TOLERANCE, rtol=0)
    assert torch.allclose(h, h_whole, atol=TOLERANCE, rtol=0)
    assert torch.allclose(c, c_whole, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("hidden", [8, 13])
def test_nan_and_inf_propagate_as_in_eager(hidden):
    """Bad numbers must not come out looking like good ones (the vector exp once clamped NaN)."""
    model = build_model(LSTMConfig(4, hidden, 2, True), seed=2)
    fused = script(KernelLSTM(model))
    x = torch.randn(12, 4, 4)
    x[3, 0, 1] = float("nan")
    x[7, 2, 0] = float("inf")
    with torch.inference_mode():
        outputs, expected = fused(x), model(x)
    for got, want in zip((outputs[0], *outputs[1]), (expected[0], *expected[1]), strict=True):
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        assert torch.isnan(want).any() and not torch.isnan(want[:, 1]).any()
        finite = ~torch.isnan(want)
        assert torch.allclose(got[finite], want[finite], atol=TOLERANCE, rtol=0)


def _float64_outputs(model, x, state, lengths):
    """The independent reference: the eager model (LSTMCell.scan's masking) in float64."""
    model64 = copy.deepcopy(model).double()
    given = None if state is None else tuple(s.double() for s in state)
    with torch.inference_mode():
        y, (h, c) = model64(x.double(), given, lengths)
    return y, h, c


def _worst_error(got, expected) -> float:
    return max((g.double() - e).abs().max().item() for g, e in zip(got, expected, strict=True))


def _ragged_inputs(model, seq: int, lengths: list[int], with_state: bool):
    """x in the model's layout, (h0, c0) or None, and int64 lengths."""
    batch = len(lengths)
    x = torch.randn(batch, seq, 5) if model.batch_first else torch.randn(seq, batch, 5)
    state = None
    if with_state:
        layers = model.num_layers * model.num_directions
        state = (
            torch.randn(layers, batch, model.hidden_size),
            torch.randn(layers, batch, model.hidden_size),
        )
    return x, state, torch.tensor(lengths)


# A full sequence beside a length-1 one, and lengths in between; 9 steps: the panel route.
_RAGGED = [11, 1, 6, 11, 3]
_LAYOUTS = pytest.mark.parametrize(
    ("batch_first", "bidirectional"),
    [(False, False), (False, True), (True, False), (True, True)],
    ids=["time-major", "bidirectional", "batch-first", "batch-first-bidirectional"],
)


@_LAYOUTS
@pytest.mark.parametrize("with_state", [False, True], ids=["zeros", "h0c0"])
def test_kernel_route_matches_eager_float64_on_ragged_batches(
    batch_first, bidirectional, with_state
):
    """model.fused.pt's route with lengths: padding carries (h, c) and outputs 0 in the op,
    the reverse direction starts at each sequence's own end (the stack's reversal)."""
    config = LSTMConfig(5, 13, 2, True, batch_first, bidirectional)
    model = build_model(config, seed=3).eval()
    fused = script(KernelLSTM(model))
    for batch_lengths in (_RAGGED, [1, 11]):  # batch 5: panels; batch 2 with a length 1
        x, state, lengths = _ragged_inputs(model, 11, batch_lengths, with_state)
        with torch.inference_mode():
            y, (h, c) = fused(x, state, lengths)
        expected = _float64_outputs(model, x, state, lengths)
        assert _worst_error((y, h, c), expected) <= TOLERANCE
        time_axis = 1 if batch_first else 0
        short = batch_lengths.index(1)  # its 10 padding steps output exactly 0
        assert not y.narrow(time_axis, 1, 10).select(1 - time_axis, short).any()


class _MaskIgnoringLayer(KernelLayer):
    """A broken kernel route: the op never sees the mask."""

    def scan(self, x, state, valid=None):
        return super().scan(x, state, None)


@_LAYOUTS
def test_the_ragged_comparison_catches_a_kernel_that_ignores_the_mask(batch_first, bidirectional):
    model = build_model(LSTMConfig(5, 13, 2, True, batch_first, bidirectional), seed=3).eval()
    broken = KernelLSTM(model)
    broken.cells = nn.ModuleList([_MaskIgnoringLayer(cell) for cell in model.cells])
    broken.reverse_cells = nn.ModuleList([_MaskIgnoringLayer(cell) for cell in model.reverse_cells])
    x, state, lengths = _ragged_inputs(model, 11, _RAGGED, True)
    with torch.inference_mode():
        y, (h, c) = broken(x, state, lengths)
    assert _worst_error((y, h, c), _float64_outputs(model, x, state, lengths)) > 100 * TOLERANCE


def test_the_mask_argument_of_the_op():
    """All valid is the unmasked op bit for bit; all padding leaves (h0, c0) and outputs 0;
    a mask of the wrong dtype or shape names the expected one."""
    op = torch.ops.lstm_export.layer_norm_lstm_layer
    x_proj, h0, c0 = torch.randn(9, 3, 32), torch.randn(3, 8), torch.randn(3, 8)
    w_h = torch.randn(32, 8)
    norms = (torch.ones(32), torch.zeros(32), torch.ones(8), torch.zeros(8))
    unmasked = op(x_proj, h0, c0, w_h, *norms, 1e-5)
    for got, want in zip(
        op(x_proj, h0, c0, w_h, *norms, 1e-5, torch.ones(9, 3, dtype=torch.bool)),
        unmasked,
        strict=True,
    ):
        assert torch.equal(got, want)
    y, h, c = op(x_proj, h0, c0, w_h, *norms, 1e-5, torch.zeros(9, 3, dtype=torch.bool))
    assert torch.equal(h, h0) and torch.equal(c, c0) and not y.any()
    with pytest.raises(RuntimeError, match=r"valid must have shape \[9, 3\], got \[9, 3, 1\]"):
        op(x_proj, h0, c0, w_h, *norms, 1e-5, torch.ones(9, 3, 1, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="valid must be a bool CPU tensor, got Long"):
        op(x_proj, h0, c0, w_h, *norms, 1e-5, torch.ones(9, 3, dtype=torch.int64))


class _NineArgumentLayer(KernelLayer):
    """KernelLayer as it was before the mask: the op called with its nine old arguments."""

    def scan(
        self,
        x: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor],
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        gamma, beta = self._gate_norms()
        norm_c = self.layer_norm_c
        y, h, c = torch.ops.lstm_export.layer_norm_lstm_layer(
            self._project(x),
            state[0],
            state[1],
            self.hidden_lin.weight,
            gamma.reshape(-1),
            beta.reshape(-1),
            norm_c.weight,
            norm_c.bias,
            norm_c.eps,
        )
        return y, (h, c)


def test_a_model_fused_pt_saved_before_the_mask_still_loads_and_runs(tmp_path):
    """Its code calls the op with nine arguments; the mask's default fills the tenth."""
    model = build_model(LSTMConfig(5, 13, 2, True), seed=8).eval()
    old = KernelLSTM(model)
    old.cells = nn.ModuleList([_NineArgumentLayer(cell) for cell in model.cells])
    path = tmp_path / FUSED_TORCHSCRIPT_FILE
    script(old).save(str(path))
    with zipfile.ZipFile(path) as archive:
        code = "".join(
            archive.read(name).decode() for name in archive.namelist() if name.endswith(".py")
        )
    call = code.split("layer_norm_lstm_layer(")[1].split(")")[0]
    assert len(call.split(", ")) == 9, call  # what an old export holds
    loaded = torch.jit.load(str(path))
    x = torch.randn(11, 3, 5)
    with torch.inference_mode():
        y, (h, c) = loaded(x)
    assert _worst_error((y, h, c), _float64_outputs(model, x, None, None)) <= TOLERANCE


def test_kernel_refuses_wrong_shapes_and_dtypes_with_the_expected_one():
    op = torch.ops.lstm_export.layer_norm_lstm_layer
    x_proj, h0, w_h = torch.zeros(3, 2, 32), torch.zeros(2, 8), torch.zeros(32, 8)
    norms = (torch.ones(32), torch.zeros(32), torch.ones(8), torch.zeros(8))
    with pytest.raises(RuntimeError, match=r"w_h must have shape \[32, 8\], got \[8, 32\]"):
        op(x_proj, h0, h0, w_h.t(), *norms, 1e-5)
    with pytest.raises(RuntimeError, match="h0 must be a float32 CPU tensor"):
        op(x_proj, h0.double(), h0, w_h, *norms, 1e-5)
    with pytest.raises(RuntimeError, match=r"x_proj must be \[seq, batch, 4 \* hidden\]"):
        op(torch.zeros(3, 2, 30), h0, h0, w_h, *norms, 1e-5)
    y, h, c = op(x_proj, h0, h0, w_h, *norms, 1e-5)
    assert y.shape == (3, 2, 8) and h.shape == c.shape == (2, 8)
    empty = torch.zeros(0)
    with pytest.raises(RuntimeError, match="hidden size must be >= 1, got 0"):
        op(
            torch.zeros(3, 2, 0),
            torch.zeros(2, 0),
            torch.zeros(2, 0),
            torch.zeros(0, 0),
            empty,
            empty,
            empty,
            empty,
            1e-5,
        )


def test_backward_through_the_kernel_raises_rather_than_returning_nothing():
    model = build_model(LSTMConfig(3, 8, 1, True), seed=4).train()
    y, _ = KernelLSTM(model)(torch.randn(5, 2, 3))
    assert y.requires_grad
    with pytest.raises(RuntimeError, match="not implemented"):
        y.sum().backward()


def test_export_with_fused_kernel_writes_verified_artifacts(tmp_path):
    model = build_model(LSTMConfig(5, 12, 2, True), seed=7)
    result = export(model, tmp_path / "m", fused_kernel=True)
    folder = result.out_dir
    artifacts = result.manifest["artifacts"]
    assert artifacts[FUSED_TORCHSCRIPT_FILE]["requires"] == kernels.KERNEL_LIBRARY
    assert kernels.KERNEL_LIBRARY in artifacts and (folder / kernels.KERNEL_LIBRARY).is_file()
    fused_rows = [r for r in result.report.results if r.backend == FUSED_BACKEND]
    assert len(fused_rows) >= 19 and all(r.passed for r in fused_rows)
    assert verify(folder).passed


def test_verify_never_loads_the_folders_library_and_flags_it_when_changed(fused_export, tmp_path):
    folder = Path(shutil.copytree(fused_export, tmp_path / "m"))
    (folder / kernels.KERNEL_LIBRARY).write_bytes(b"not a shared library")
    report = verify(folder)
    assert any("lstm_export_kernels.so does not match" in p for p in report.problems)
    # Had verify loaded the folder's copy, model.fused.pt could not have run at all.
    fused_rows = [r for r in report.results if r.backend == FUSED_BACKEND]
    assert fused_rows and all(r.passed for r in fused_rows)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    del manifest["artifacts"][FUSED_TORCHSCRIPT_FILE]
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    report = verify(folder)
    assert any("model.fused.pt is not listed" in p for p in report.problems)


def test_verify_flags_a_kernel_library_nobody_listed(tmp_path):
    folder = export(small_model(True, 1), tmp_path / "m").out_dir
    (folder / kernels.KERNEL_LIBRARY).write_bytes(b"planted")
    report = verify(folder)
    assert not report.passed
    assert any("lstm_export_kernels.so is not listed" in p for p in report.problems)


def test_verify_without_a_compiler_or_cache_still_checks_the_rest(fused_export, tmp_path):
    folder = fused_export
    env = {k: v for k, v in os.environ.items() if k != "CXX"}
    env["PATH"] = os.path.dirname(sys.executable)
    env[build.CACHE_ENV] = str(tmp_path / "empty-cache")
    done = run_cli("verify", folder, "--json", env=env)
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert any(p.startswith("model.fused.pt was not checked: ") for p in report["problems"])
    assert {r["backend"] for r in report["results"]} >= {"torchscript", "onnxruntime"}


def test_fused_kernel_is_refused_for_a_plain_model_and_nothing_is_written(tmp_path):
    with pytest.raises(UsageError, match="the fused kernel is for layer_norm=True models"):
        export(small_model(False, 1), tmp_path / "m", fused_kernel=True)
    assert not (tmp_path / "m").exists()
    done = run_cli("export", "--no-layer-norm", "--fused-kernel", "--out", tmp_path / "m")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "the fused kernel is for layer_norm=True models" in lines[0]
    assert not (tmp_path / "m").exists()


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty kernel cache and no library loaded by us yet: the next build compiles."""
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "_loaded", None)
    return tmp_path / "cache"


def test_a_missing_compiler_is_one_clear_line(tmp_path, fresh_cache, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CXX", "ccache g++")
    with pytest.raises(UsageError, match=r"needs a C\+\+ compiler; 'ccache g\+\+' is not on PATH"):
        kernels.build_kernel()
    assert not any(fresh_cache.rglob("*.so"))


def test_a_failing_compiler_is_one_line_naming_its_error(tmp_path, fresh_cache, monkeypatch):
    broken = tmp_path / "broken.cpp"
    broken.write_text("int main( {\n")
    monkeypatch.setattr(kernels, "SOURCE", broken)
    with pytest.raises(UsageError, match=r"compiling the fused kernel failed: .*error: ") as info:
        kernels.build_kernel()
    assert "\n" not in str(info.value)
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(UsageError, match="the compiler exited with code 1"):
        kernels.build_kernel()
    assert not any(fresh_cache.rglob("*.so")) and not any(fresh_cache.rglob("*.partial"))


def test_a_cache_that_is_a_file_is_one_clear_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "file"))
    monkeypatch.setattr(kernels, "_loaded", None)
    with pytest.raises(UsageError, match="cannot build the fused kernel in"):
        kernels.build_kernel()


def test_a_cached_kernel_needs_no_compiler():
    """Only the first build needs g++: a deployment host may have none."""
    code = "from lstm_export.native import torch_kernel as kernels; print(kernels.build_kernel())"
    env = {k: v for k, v in os.environ.items() if k != "CXX"}
    env["PATH"] = os.path.dirname(sys.executable)  # no c++ there
    done = run_python(code, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(kernels.build_kernel())


def test_the_library_needs_libtorch_alone_not_torch_python():
    dynamic = subprocess.run(
        ["readelf", "-d", str(kernels.build_kernel())], capture_output=True, text=True, check=True
    ).stdout
    needed = [line.split("[")[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert "libtorch_cpu.so" in needed and not any("python" in name for name in needed)


_DEPLOYED = """
import sys, torch
folder = sys.argv[1]
torch.ops.load_library(folder + "/lstm_export_kernels.so")  # the shipped copy, as C++ would
fused = torch.jit.load(folder + "/model.fused.pt")
plain = torch.jit.load(folder + "/model.pt")  # the reference route, no kernel
torch.manual_seed(0)
x = torch.randn(11, 3, fused.input_size)
with torch.inference_mode():
    (y1, (h1, c1)), (y2, (h2, c2)) = fused(x), plain(x)
print(max((a - b).abs().max().item() for a, b in ((y1, y2), (h1, h2), (c1, c2))))
"""


def test_the_shipped_library_runs_model_fused_pt_in_a_fresh_interpreter(tmp_path):
    """No lstm_export import: the export folder alone, as a deployment would use it."""
    folder = export(
        build_model(LSTMConfig(4, 24, 2, True), 5), tmp_path / "m", fused_kernel=True
    ).out_dir
    done = run_python(_DEPLOYED, folder)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) <= TOLERANCE


def test_without_the_library_model_fused_pt_does_not_load(fused_export):
    folder = fused_export
    code = "import sys, torch; torch.jit.load(sys.argv[1])"
    done = run_python(code, folder / FUSED_TORCHSCRIPT_FILE)
    assert done.returncode != 0 and kernels.OP_NAME in done.stderr
    assert (folder / TORCHSCRIPT_FILE).is_file()  # the pure-libtorch model.pt is always there


def test_cli_verify_loads_the_kernel_from_source_in_a_fresh_process(fused_export):
    folder = fused_export
    done = run_cli("verify", folder, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert FUSED_BACKEND in done.stdout and "Parity passed" in done.stdout


_ROUTE = """
import sys
import torch
from lstm_export.native import torch_kernel as kernels
from lstm_export.native import build
from lstm_export.checkpoints import build_model
from lstm_export.config import LSTMConfig
from lstm_export.exporters.routes import KernelLayer, KernelLSTM
from lstm_export.exporters.torchscript import script
assert build.isa() == sys.argv[1]
assert [f for f in kernels.compile_flags() if f.startswith("-m")] == build.ISA_FLAGS[sys.argv[1]]
kernels.build_kernel()
worst = 0.0
for sizes in ((5, 13, 2), (3, 16, 1), (4, 33, 1), (3, 256, 1)):
    model = build_model(LSTMConfig(*sizes, layer_norm=True), seed=1).eval()
    fused = script(KernelLSTM(model))
    for seq, batch in ((1, 1), (17, 3), (9, 17)):
        x = torch.randn(seq, batch, sizes[0])
        with torch.inference_mode():
            (y, (h, c)), (y2, (h2, c2)) = fused(x), model(x)
        worst = max(worst, *((a - b).abs().max().item() for a, b in ((y, y2), (h, h2), (c, c2))))
print(worst)
"""


def test_the_portable_and_the_avx2_route_match_too():
    """What a CPU without AVX2 builds (the kernel's scalar code alone), and the AVX2 route
    where this CPU would take AVX-512 (LSTM_EXPORT_KERNEL_ISA=avx2): each its own library,
    in a process of its own (torch loads one per process); the two build at once, as each
    build is one single-threaded compiler."""
    routes = ["portable"]
    if {"avx2", "fma"} <= build.cpu_features():  # else the portable route is this CPU's own
        routes.append("avx2")
    runs = {}
    for route in routes:
        env = {**os.environ, build.ISA_ENV: route}
        env.pop(build.PORTABLE_ENV, None)
        if route == "portable":
            env[build.PORTABLE_ENV] = "1"
        command = [sys.executable, "-c", _ROUTE, route]
        runs[route] = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    try:
        for route, run in runs.items():
            out, err = run.communicate(timeout=600)
            assert run.returncode == 0, f"{route}: {err}"
            assert float(out) <= TOLERANCE, route
    finally:
        for run in runs.values():
            run.kill()
            run.wait()


def test_inspect_lists_model_fused_pt_in_a_folder(fused_export):
    from lstm_export.inspection import inspect

    folder = fused_export
    files = inspect(folder)["files"]
    assert files[FUSED_TORCHSCRIPT_FILE]["config"] == files[TORCHSCRIPT_FILE]["config"]


def test_a_damaged_cached_library_is_rebuilt_not_loaded(_kernel, fresh_cache):
    """A truncated .so can kill the process when loaded (SIGBUS); the stamp catches it."""
    # The fresh cache starts with a copy of the module's build (library and stamp), so that
    # the rebuild is the one compile here. The op is loaded already: no copy is loaded.
    library = kernels._cache_dir() / kernels.KERNEL_LIBRARY  # same key, the fresh root
    library.parent.mkdir(parents=True)
    for name in (kernels.KERNEL_LIBRARY, build.STAMP):
        shutil.copy2(_kernel.parent / name, library.parent / name)
    assert kernels.build_kernel() == library and build.intact(library)  # the copy is used
    intact = library.read_bytes()
    library.write_bytes(intact[: len(intact) // 3])
    assert kernels.build_kernel() == library
    assert build.intact(library) and library.stat().st_size == len(intact)  # rebuilt


def test_the_cache_key_includes_the_core_header(tmp_path, monkeypatch):
    """The arithmetic lives in the header: a changed header is a new build, not a stale one."""
    before = kernels._cache_dir()
    changed = tmp_path / "layer_norm_lstm_core.h"
    shutil.copy(build.CORE_HEADER, changed)
    with open(changed, "a") as header:
        header.write("// changed\n")
    monkeypatch.setattr(build, "CORE_HEADER", changed)
    assert kernels._cache_dir() != before


def test_a_cached_library_loads_even_where_the_lock_cannot_be_taken():
    """A read-only shared cache: loading needs no lock, only building does."""
    code = """
import shutil, sys
from pathlib import Path
from lstm_export.native import torch_kernel as kernels
from lstm_export.native import build
cached = kernels.build_kernel.__globals__["_cache_dir"]()
copy = Path(sys.argv[1]) / cached.name
shutil.copytree(cached, copy)
(copy / ".lock").unlink(missing_ok=True)
(copy / ".lock").mkdir()  # flock on it would fail
import os; os.environ[build.CACHE_ENV] = sys.argv[1]
print(kernels.build_kernel())
"""
    with tempfile.TemporaryDirectory() as tmp:
        done = run_python(code, tmp)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().startswith(tmp)


def test_loading_the_folders_library_by_hand_then_exporting_does_not_abort(fused_export, tmp_path):
    """torch aborts on a second registration of the op; build_kernel must not cause one."""
    folder = fused_export
    code = f"""
import torch
torch.ops.load_library({str(folder / kernels.KERNEL_LIBRARY)!r})
from helpers import small_model
from lstm_export.pipeline import export
result = export(small_model(True, 1), {str(tmp_path / "again")!r}, fused_kernel=True)
print(result.report.passed)
"""
    env = {**os.environ, "PYTHONPATH": os.path.dirname(helpers.__file__)}
    done = run_python(code, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


def _compilers_of_our_source() -> list[str]:
    """cc1plus processes compiling the kernel's source (ours: nothing else compiles it)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"cc1plus") and str(kernels.SOURCE).encode() in argv:
            found.append(proc.name)
    return found


def test_sigterm_during_the_kernel_build_stops_the_compiler_and_leaves_nothing(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, build.CACHE_ENV: str(cache)}
    command = [sys.executable, "-m", "lstm_export.cli", "export", "--fused-kernel"]
    log = tmp_path / "log"
    returncode = interrupt_once_started(
        [*command, "--out", str(tmp_path / "m")],
        log,
        lambda: bool(_compilers_of_our_source()),
        "the kernel build",
        env=env,
        start_timeout=120,
    )
    assert returncode == 143, log.read_text()
    assert "Traceback" not in log.read_text()
    # A killed compiler is reaped at once; an orphan lives on.
    assert wait_until_gone(lambda: bool(_compilers_of_our_source()), 0.5)
    assert not (tmp_path / "m").exists()
    assert not list(cache.rglob("*.so")) and not list(cache.rglob("*.partial"))
