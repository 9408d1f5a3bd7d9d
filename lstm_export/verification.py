"""verify: prove an export folder's artifacts compute the model, with the parity engine.

The artifacts are loaded back from disk and run as backends of `lstm_export.parity`:
TorchScript (`model.pt`, and `model.fused.pt` when there is one), onnxruntime on
`model.onnx` (streamed through `OnnxLSTM.stream`, as users stream), and onnxruntime on the
batch-first variant Triton serves. The reference is the eager model, rebuilt from
`model.pt`'s weights, in float64. The manifest's hashes are checked too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch

from lstm_export.artifacts import (
    FUSED_TORCHSCRIPT_FILE,
    MANIFEST_FILE,
    ONNX_FILE,
    TORCHSCRIPT_FILE,
)
from lstm_export.errors import UsageError
from lstm_export.files import check_export_folder, sha256
from lstm_export.kernels import KERNEL_LIBRARY
from lstm_export.parity import (
    ATOL,
    FACTOR,
    Backend,
    Outputs,
    ParityReport,
    Reference,
    State,
    Tolerance,
    check_parity,
    torch_backend,
)
from lstm_export.runtime import OnnxLSTM
from lstm_export.triton import BATCH_FIRST_BACKEND, batch_first_backend, batch_first_onnx

FUSED_BACKEND = "torchscript (fused kernel)"


def onnx_backend(name: str, runtime: OnnxLSTM) -> Backend:
    """`model.onnx` under onnxruntime; streamed cases go through `OnnxLSTM.stream`."""

    def run(x: np.ndarray, state: State | None) -> Outputs:
        y, (h, c) = runtime.run(x, state)
        return y, h, c

    def run_chunks(x: np.ndarray, state: State | None, chunks: tuple[int, ...]) -> Outputs:
        stream, ys, start = runtime.stream(state), [], 0
        for length in chunks:
            ys.append(stream.step(x[start : start + length]))
            start += length
        assert stream.state is not None
        return np.concatenate(ys), *stream.state

    return Backend(name, run, run_chunks)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def verify_artifacts(
    torchscript_path: Path,
    onnx_path: Path,
    tolerance: Tolerance | None = None,
    fused_path: Path | None = None,
) -> ParityReport:
    """Parity of saved `model.pt`, `model.onnx` (and `model.fused.pt`, if given) with the
    eager model on the .pt's weights, in float64."""
    from lstm_export.torchscript import load_torchscript

    tolerance = tolerance or Tolerance()
    scripted, config = load_torchscript(torchscript_path)
    runtime = OnnxLSTM(onnx_path)
    report = ParityReport(tolerance)
    if runtime.config != config:
        report.problems.append(
            f"model.pt config {config.to_dict()} differs from model.onnx's "
            f"{runtime.config.to_dict()}"
        )
        return report
    backends = [
        torch_backend("torchscript", scripted),
        onnx_backend("onnxruntime", runtime),
        # The batch-first variant Triton serves (lstm-export triton), derived from model.onnx.
        batch_first_backend(batch_first_onnx(onnx.load(str(onnx_path))), BATCH_FIRST_BACKEND),
    ]
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
            backends.append(torch_backend(FUSED_BACKEND, fused))
    reference = Reference.from_scripted(scripted, config)
    checked = check_parity(reference, backends, tolerance=tolerance)
    checked.problems[:0] = report.problems
    return checked


def verify(out_dir: Path | str, *, atol: float = ATOL, factor: float = FACTOR) -> ParityReport:
    """Check an export folder: artifacts match the manifest's sha256, and all backends agree
    with the float64 reference within `max(atol, factor x float32 floor)`."""
    tolerance = Tolerance(atol, factor)
    out_dir = Path(out_dir)
    check_export_folder(out_dir)
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
    recorded = _recorded_tolerance(manifest_path)
    if recorded is not None and recorded != (tolerance.atol, tolerance.factor):
        report.remarks.append(
            f"the export was accepted with atol {recorded[0]:g}, factor {recorded[1]:g} "
            f"(manifest); this check used atol {tolerance.atol:g}, factor {tolerance.factor:g}"
        )
    return report


def _recorded_tolerance(manifest_path: Path) -> tuple[float, float] | None:
    """The (atol, factor) an export was accepted with, if its manifest says; shown, never used:
    a manifest is not trusted to loosen the check."""
    try:
        recorded = json.loads(manifest_path.read_text(encoding="utf-8"))["parity"]["tolerance"]
        return float(recorded["atol"]), float(recorded["factor"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
