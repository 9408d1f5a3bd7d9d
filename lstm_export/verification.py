"""Parity: eager PyTorch vs TorchScript vs onnxruntime over a matrix of shapes.

Every backend runs the same inputs; each output (y, h, c) is compared with the
eager model's by max abs error. The matrix covers seq in {1, 2, 17, 128},
batch in {1, 3}, with and without an initial state, plus streaming: a sequence
fed in chunks with (h, c) carried between them must equal the whole run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from lstm_export.config import LSTMConfig
from lstm_export.errors import UsageError
from lstm_export.files import sha256
from lstm_export.kernels import KERNEL_LIBRARY
from lstm_export.model import LSTM
from lstm_export.runtime import ONNX_FILE, OnnxLSTM

TOLERANCE = 1e-5
BATCH_FIRST_BACKEND = "onnxruntime batch-first"
TORCHSCRIPT_FILE = "model.pt"
FUSED_TORCHSCRIPT_FILE = "model.fused.pt"
FUSED_BACKEND = "torchscript (fused kernel)"
MANIFEST_FILE = "manifest.json"

Array = np.ndarray
Outputs = tuple[Array, Array, Array]
# A backend: (x, state or None) -> (y, h, c), all float32 numpy arrays.
Backend = Callable[[Array, "tuple[Array, Array] | None"], Outputs]


@dataclass(frozen=True)
class Case:
    """One input shape; `chunks` makes it a streaming case (chunk lengths summing to seq)."""

    seq: int
    batch: int
    initial_state: bool
    chunks: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        state = "h0/c0" if self.initial_state else "zeros"
        stream = f" chunks={'+'.join(map(str, self.chunks))}" if self.chunks else ""
        return f"seq={self.seq} batch={self.batch} state={state}{stream}"


def default_cases() -> list[Case]:
    """The matrix: every seq x batch x state, plus streaming cases."""
    cases = [
        Case(seq, batch, state)
        for seq in (1, 2, 17, 128)
        for batch in (1, 3)
        for state in (False, True)
    ]
    cases += [
        Case(17, 3, False, (1, 7, 9)),
        Case(17, 1, True, (5, 1, 11)),
        Case(128, 3, True, (64, 1, 63)),
    ]
    return cases


@dataclass
class CaseResult:
    backend: str
    case: str
    max_abs_error: dict[str, float]
    passed: bool


@dataclass
class ParityReport:
    """What `verify` found; `passed` is False on any breach of the tolerance or any problem."""

    tolerance: float
    results: list[CaseResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems and bool(self.results) and all(r.passed for r in self.results)

    @property
    def worst(self) -> float:
        return max((max(r.max_abs_error.values()) for r in self.results), default=float("nan"))

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "tolerance": self.tolerance,
            "worst_max_abs_error": self.worst,
            "problems": list(self.problems),
            "results": [asdict(r) for r in self.results],
        }


def _inputs(config: LSTMConfig, case: Case, seed: int) -> tuple[Array, tuple[Array, Array] | None]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((case.seq, case.batch, config.input_size), dtype=np.float32)
    if not case.initial_state:
        return x, None
    shape = (config.num_layers, case.batch, config.hidden_size)
    h0 = 0.5 * rng.standard_normal(shape, dtype=np.float32)
    c0 = rng.standard_normal(shape, dtype=np.float32)
    return x, (h0, c0)


def _run_chunked(backend: Backend, x: Array, state, chunks: tuple[int, ...]) -> Outputs:
    ys, start = [], 0
    for length in chunks:
        y, h, c = backend(x[start : start + length], state)
        ys.append(y)
        state, start = (h, c), start + length
    return np.concatenate(ys), state[0], state[1]


def check_parity(
    config: LSTMConfig,
    reference: Backend,
    backends: Mapping[str, Backend],
    cases: list[Case] | None = None,
    tolerance: float = TOLERANCE,
) -> ParityReport:
    """Compare each backend with `reference` on every case; streaming cases also check it."""
    report = ParityReport(tolerance)
    for index, case in enumerate(cases or default_cases()):
        x, state = _inputs(config, case, seed=index)
        expected = reference(x, state)
        runs = dict(backends)
        if case.chunks:  # the reference itself must stream correctly too
            runs = {"eager": reference, **runs}
        for name, backend in runs.items():
            chunked = case.chunks
            got = _run_chunked(backend, x, state, chunked) if chunked else backend(x, state)
            errors = {
                out: float(np.max(np.abs(g - e))) if g.shape == e.shape else float("inf")
                for out, g, e in zip(("y", "h", "c"), got, expected, strict=True)
            }
            passed = all(err <= tolerance for err in errors.values())  # NaN fails too
            report.results.append(CaseResult(name, case.label, errors, passed))
    return report


def torch_backend(module: torch.nn.Module) -> Backend:
    """An eager or scripted model as a numpy backend."""

    def run(x: Array, state: tuple[Array, Array] | None) -> Outputs:
        with torch.inference_mode():
            torch_state = None
            if state is not None:
                torch_state = (torch.from_numpy(state[0]), torch.from_numpy(state[1]))
            y, (h, c) = module(torch.from_numpy(x), torch_state)
        return y.numpy(), h.numpy(), c.numpy()

    return run


def onnx_backend(runtime: OnnxLSTM) -> Backend:
    def run(x: Array, state: tuple[Array, Array] | None) -> Outputs:
        y, (h, c) = runtime.run(x, state)
        return y, h, c

    return run


def eager_from_scripted(scripted: torch.jit.ScriptModule, config: LSTMConfig) -> LSTM:
    """Rebuild the eager reference model from a scripted module's weights."""
    model = LSTM(config.input_size, config.hidden_size, config.num_layers, config.layer_norm)
    model.load_state_dict(scripted.state_dict())
    return model.eval()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def check_tolerance(tolerance: object) -> float:
    """Refuse a tolerance no comparison can honour: negative, NaN (every check fails) or inf."""
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, int | float)
        or not math.isfinite(tolerance)
        or tolerance < 0
    ):
        raise UsageError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    return float(tolerance)


def verify_artifacts(
    torchscript_path: Path,
    onnx_path: Path,
    tolerance: float = TOLERANCE,
    fused_path: Path | None = None,
) -> ParityReport:
    """Parity of saved `model.pt`, `model.onnx` (and `model.fused.pt`, if given) with the
    eager model on the .pt's weights."""
    tolerance = check_tolerance(tolerance)
    from lstm_export.torchscript import load_torchscript
    from lstm_export.triton import batch_first_backend, batch_first_onnx

    scripted, config = load_torchscript(torchscript_path)
    runtime = OnnxLSTM(onnx_path)
    report = ParityReport(tolerance)
    if runtime.config != config:
        report.problems.append(
            f"model.pt config {config.to_dict()} differs from model.onnx's "
            f"{runtime.config.to_dict()}"
        )
        return report
    eager = eager_from_scripted(scripted, config)
    backends = {
        "torchscript": torch_backend(scripted),
        "onnxruntime": onnx_backend(runtime),
        # The batch-first variant Triton serves (lstm-export triton), derived from model.onnx.
        BATCH_FIRST_BACKEND: batch_first_backend(batch_first_onnx(onnx.load(str(onnx_path)))),
    }
    if fused_path is not None:
        try:
            fused, fused_config = load_torchscript(fused_path)
        except UsageError as exc:  # e.g. no compiler for the kernel: check the rest anyway
            report.problems.append(f"{fused_path.name} was not checked: {exc}")
        else:
            if fused_config != config or not _same_weights(fused, scripted):
                report.problems.append(
                    f"{fused_path.name} is not the model in {torchscript_path.name}"
                )
                return report
            backends[FUSED_BACKEND] = torch_backend(fused)
    checked = check_parity(config, torch_backend(eager), backends, tolerance=tolerance)
    checked.problems[:0] = report.problems
    return checked


def verify(out_dir: Path, tolerance: float = TOLERANCE) -> ParityReport:
    """Check an export folder: artifacts match the manifest's sha256, and all backends agree."""
    tolerance = check_tolerance(tolerance)
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UsageError(f"expected an export folder, but {out_dir} is not a directory")
    missing = [n for n in (TORCHSCRIPT_FILE, ONNX_FILE) if not (out_dir / n).is_file()]
    if missing:
        raise UsageError(f"export folder {out_dir} lacks {', '.join(missing)}")
    manifest_path = out_dir / MANIFEST_FILE
    problems = check_manifest(out_dir) if manifest_path.is_file() else []
    if not manifest_path.is_file():
        problems.append(f"{MANIFEST_FILE} is missing")
    fused = out_dir / FUSED_TORCHSCRIPT_FILE
    report = verify_artifacts(
        out_dir / TORCHSCRIPT_FILE,
        out_dir / ONNX_FILE,
        tolerance,
        fused_path=fused if fused.is_file() else None,
    )
    report.problems[:0] = problems
    return report


def check_manifest(out_dir: Path) -> list[str]:
    """Hash every artifact the manifest lists; model.pt and model.onnx must be among them
    (and model.fused.pt with its kernel library, or a kernel library alone, when the folder
    has one).

    A manifest that cannot be read as one we wrote (not JSON, artifacts not a table of
    tables, an artifact name that is not a plain file name in the folder) is refused as
    bad input: verify never reads a path a manifest points it to outside the folder.
    What it reads and finds wrong (an artifact unlisted, missing or changed) is returned
    as a problem, a breach like a missing manifest.
    """
    manifest_path = out_dir / MANIFEST_FILE
    try:
        recorded = json.loads(manifest_path.read_text(encoding="utf-8"))["artifacts"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{manifest_path} is not a valid manifest: {exc}") from None
    if not isinstance(recorded, dict) or not all(isinstance(e, dict) for e in recorded.values()):
        raise UsageError(f"{manifest_path} is not a valid manifest: artifacts must be a table")
    for name in recorded:
        if name in ("", ".", "..", MANIFEST_FILE) or Path(name).name != name or "\\" in name:
            raise UsageError(
                f"{manifest_path} is not a valid manifest: expected artifact names that are "
                f"plain file names in {out_dir}, got {name!r}"
            )
    # A kernel library in the folder is native code a deployment loads: it must be vouched
    # for whenever it is there, and model.fused.pt never comes without it.
    required = [TORCHSCRIPT_FILE, ONNX_FILE]
    if (out_dir / FUSED_TORCHSCRIPT_FILE).exists():
        required += [FUSED_TORCHSCRIPT_FILE, KERNEL_LIBRARY]
    elif (out_dir / KERNEL_LIBRARY).exists():
        required.append(KERNEL_LIBRARY)
    problems = [
        f"{name} is not listed in the manifest, so nothing vouches for it"
        for name in required
        if name not in recorded
    ]
    for name, entry in recorded.items():
        path = out_dir / name
        if path.is_symlink():  # an export writes files; a link could point anywhere
            problems.append(f"{name} is a symbolic link, not a file the export wrote")
        elif not path.is_file():
            problems.append(f"{name} is listed in the manifest but missing")
        elif sha256(path) != entry.get("sha256"):
            problems.append(f"{name} does not match the manifest's sha256 (changed since export)")
    return problems
