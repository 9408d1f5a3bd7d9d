"""verify: prove an export folder's artifacts compute the model, with the parity engine.

The artifacts are loaded back from disk and run by the parity engine (`verification.parity`)
as its backends (`verification.backends`): TorchScript (`model.pt`, and `model.fused.pt` when
there is one), onnxruntime on `model.onnx` (streamed through `OnnxLSTM.stream`, as users
stream) and on `model.fused.onnx` when there is one (`OnnxLSTM(..., fused=True)`, with our own
build of its op library), and onnxruntime on the batch-first variant Triton serves. The
reference is the eager model, rebuilt from `model.pt`'s weights, in float64. The kernel
libraries in a folder are native code: they are checked by sha256, never loaded.

The manifest is a claim, checked like one: its hashes against the files, its config against
the artifacts' own (model.pt's config.json and attributes, model.onnx's metadata, the
weights' shapes), its name against the one name rule. What cannot be checked (the versions
and name it records, the parity report of the export) is shown as recorded at export and
never used: parity is always recomputed. A claim found false is a problem (exit 1, a
failed proof); a manifest or artifact that cannot be read as ours is a UsageError (exit 2).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lstm_export.artifacts import (
    ATOL,
    FACTOR,
    FUSED_ONNX_FILE,
    FUSED_TORCHSCRIPT_FILE,
    KERNEL_LIBRARY,
    MANIFEST_FILE,
    ONNX_FILE,
    ORT_KERNEL_LIBRARY,
    PT2_FILE,
    TORCHSCRIPT_FILE,
    check_model_name,
)
from lstm_export.config import LSTMConfig
from lstm_export.errors import UsageError
from lstm_export.exporters.batch_first import batch_first_onnx
from lstm_export.files import check_export_folder, read_manifest, sha256
from lstm_export.model import LSTM
from lstm_export.native.ort_kernel import INCLUDE_ENV
from lstm_export.runtime.onnx import OnnxLSTM, load_onnx
from lstm_export.runtime.pt2 import Pt2LSTM
from lstm_export.verification.backends import (
    BATCH_FIRST_BACKEND,
    FUSED_BACKEND,
    FUSED_ONNX_BACKEND,
    ONNX_BACKEND,
    PT2_BACKEND,
    TORCHSCRIPT_BACKEND,
    batch_first_backend,
    onnx_backend,
    torch_backend,
)
from lstm_export.verification.cases import default_cases
from lstm_export.verification.parity import ParityReport, Reference, Tolerance, check_parity

NO_FUSED_ONNX = (
    f"{FUSED_TORCHSCRIPT_FILE} has no {FUSED_ONNX_FILE} beside it: the export predates it, or "
    f"could not build {ORT_KERNEL_LIBRARY} (no compiler, or none of onnxruntime's headers: set "
    f"{INCLUDE_ENV}, or install npm, and export again); the rest was checked"
)
"""verify's remark on a fused export without model.fused.onnx (not a failure)."""
NAME_MAX = 255
"""The longest file name (in bytes) of common filesystems; a longer manifest entry is not ours."""


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def verify_artifacts(
    torchscript_path: Path | None,
    onnx_path: Path,
    tolerance: Tolerance | None = None,
    fused_path: Path | None = None,
    fused_onnx_path: Path | None = None,
    pt2_path: Path | None = None,
    *,
    model: LSTM | None = None,
) -> ParityReport:
    """Parity of saved `model.pt`, `model.onnx` (and `model.fused.pt`, `model.fused.onnx`,
    `model.pt2`, if given) with the eager model on the .pt's weights, in float64.

    `model`: the eager model to hold them to instead, for an export whose model.pt could
    not be written (`torchscript_path` None: torch.jit.script refused).
    """
    return _check_artifacts(
        torchscript_path, onnx_path, tolerance, fused_path, fused_onnx_path, pt2_path, model
    )[0]


def _check_artifacts(
    torchscript_path: Path | None,
    onnx_path: Path,
    tolerance: Tolerance | None,
    fused_path: Path | None,
    fused_onnx_path: Path | None = None,
    pt2_path: Path | None = None,
    model: LSTM | None = None,
) -> tuple[ParityReport, dict[str, LSTMConfig]]:
    """`verify_artifacts`'s report, and the config each artifact holds (for the manifest's
    claim to be checked against, without loading them twice)."""
    from lstm_export.exporters.torchscript import config_of, load_torchscript, takes_lengths

    tolerance = tolerance or Tolerance()
    runtime = OnnxLSTM(onnx_path)  # metadata config against the graph's dims
    configs = {onnx_path.name: runtime.config}
    backends = []
    if torchscript_path is not None:
        scripted, config = load_torchscript(torchscript_path)  # config.json, attributes, weights
        configs[torchscript_path.name] = config
        reference = Reference.from_scripted(scripted, config)
        backends.append(torch_backend(TORCHSCRIPT_BACKEND, scripted))
        ragged = takes_lengths(scripted) and runtime.has_lengths  # False: exported before them
    elif model is not None:
        config, reference, ragged = config_of(model), Reference(model), runtime.has_lengths
    else:
        raise UsageError(f"no {TORCHSCRIPT_FILE} and no model to take the weights from")
    report = ParityReport(tolerance)
    if runtime.config != config:
        report.problems.append(
            f"model.pt config {config.to_dict()} differs from model.onnx's "
            f"{runtime.config.to_dict()}"
        )
        return report, configs
    backends += [
        onnx_backend(ONNX_BACKEND, runtime),
        # The batch-first variant Triton serves (lstm-export triton), derived from model.onnx.
        batch_first_backend(batch_first_onnx(load_onnx(onnx_path)), BATCH_FIRST_BACKEND),
    ]
    if fused_path is not None:
        try:
            fused, fused_config = load_torchscript(fused_path)
        except UsageError as exc:  # e.g. no compiler for the kernel: check the rest anyway
            report.problems.append(f"{fused_path.name} was not checked: {exc}")
        else:
            if fused_config != config or not _same_weights(fused, reference.model):
                report.problems.append(f"{fused_path.name} is not the model in {TORCHSCRIPT_FILE}")
                return report, configs
            backends.append(torch_backend(FUSED_BACKEND, fused))
    if fused_onnx_path is not None:
        try:  # our own build of the op library, never the folder's copy
            fused_onnx = OnnxLSTM(fused_onnx_path, fused=True)
        except UsageError as exc:  # e.g. no headers for the library: check the rest anyway
            report.problems.append(f"{fused_onnx_path.name} was not checked: {exc}")
        else:
            configs[fused_onnx_path.name] = fused_onnx.config
            if fused_onnx.config != config or not fused_onnx.has_lengths:
                report.problems.append(
                    f"{fused_onnx_path.name} is not the model in {TORCHSCRIPT_FILE}"
                )
                return report, configs
            backends.append(onnx_backend(FUSED_ONNX_BACKEND, fused_onnx))
    if pt2_path is not None:
        try:  # with our own build of the op library, never the folder's copy
            package = Pt2LSTM(pt2_path)
        except UsageError as exc:  # e.g. another torch version: check the rest anyway
            report.problems.append(f"{pt2_path.name} was not checked: {exc}")
        else:
            configs[pt2_path.name] = package.config
            if package.config != config:
                report.problems.append(f"{pt2_path.name} is not the model in {TORCHSCRIPT_FILE}")
                return report, configs
            backends.append(torch_backend(PT2_BACKEND, package))
    cases = default_cases(config, lengths=ragged)
    checked = check_parity(reference, backends, cases, tolerance=tolerance)
    checked.problems[:0] = report.problems
    if not ragged:
        checked.remarks.append(
            "these artifacts predate padded batches (no lengths input), so no ragged case was "
            "run; export again to serve batches of different lengths"
        )
    return checked, configs


def verify(out_dir: Path | str, *, atol: float = ATOL, factor: float = FACTOR) -> ParityReport:
    """Check an export folder: what its manifest claims (hashes, config, name) holds, and all
    backends agree with the float64 reference within `max(atol, factor x float32 floor)`.

    The manifest is read once; the parity report it records is never used, only shown in
    a note when its verdict differs from this run's.
    """
    tolerance = Tolerance(atol, factor)
    out_dir = Path(out_dir)
    check_export_folder(out_dir)
    manifest = read_manifest(out_dir)
    if manifest is None:
        problems = [f"{MANIFEST_FILE} is missing"]
    else:
        problems = check_manifest(out_dir, manifest)
    fused, fused_onnx = out_dir / FUSED_TORCHSCRIPT_FILE, out_dir / FUSED_ONNX_FILE
    pt2 = out_dir / PT2_FILE
    report, configs = _check_artifacts(
        out_dir / TORCHSCRIPT_FILE,
        out_dir / ONNX_FILE,
        tolerance,
        fused if fused.is_file() else None,
        fused_onnx if fused_onnx.is_file() else None,
        pt2 if pt2.is_file() else None,
    )
    if manifest is not None:
        problems += check_claims(manifest, configs)
    report.problems[:0] = problems
    if fused.is_file() and not os.path.lexists(fused_onnx):
        report.remarks.append(NO_FUSED_ONNX)
    if manifest is not None:
        report.remarks += recorded_remarks(manifest, tolerance, report.passed)
    return report


def _shown(value: Any, limit: int = 60) -> str:
    """A recorded value's repr, one short line (control characters escaped by repr)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_problems(manifest: dict, configs: dict[str, LSTMConfig]) -> list[str]:
    """The manifest's config against each artifact's own (`configs`, by file name); checked
    strictly, as a config is read from a file (JSON's 1 is not true)."""
    try:
        claimed = LSTMConfig.from_dict(manifest.get("config"), source=f"its {MANIFEST_FILE}")
    except UsageError as exc:
        return [f"{MANIFEST_FILE} records no config of a model: {exc}"]
    return [
        f"{MANIFEST_FILE} records config {claimed.to_dict()}, but {name} holds {config.to_dict()}"
        for name, config in configs.items()
        if config != claimed
    ]


def check_claims(manifest: dict, configs: dict[str, LSTMConfig]) -> list[str]:
    """What the manifest says about the model that does not hold: its config against each
    artifact's own, and its name against the one model-name rule (`check_model_name`)."""
    problems = config_problems(manifest, configs)
    try:
        check_model_name(manifest.get("name"), f"the name {MANIFEST_FILE} records")
    except UsageError as exc:
        problems.append(str(exc))
    return problems


def recorded_remarks(manifest: dict, tolerance: Tolerance, passed: bool) -> list[str]:
    """Notes on what the manifest records but nothing can check: the name and versions of
    the export, the tolerance and verdict of its parity report; shown, never used."""
    remarks = [
        f"recorded at export, not verified: name {_shown(manifest.get('name'))}, "
        f"versions {_shown(manifest.get('versions'), 300)}"
    ]
    recorded = _recorded_tolerance(manifest)
    if recorded is not None and recorded != (tolerance.atol, tolerance.factor):
        remarks.append(
            f"the export was accepted with atol {recorded[0]:g}, factor {recorded[1]:g} "
            f"(manifest); this check used atol {tolerance.atol:g}, factor {tolerance.factor:g}"
        )
    parity = manifest.get("parity")
    claimed = parity.get("passed") if isinstance(parity, dict) else None
    if claimed is not passed:
        remarks.append(
            f"the manifest records parity passed={_shown(claimed)} at export; this check "
            f"recomputed it (passed={passed}): a recorded report is never trusted"
        )
    return remarks


def _recorded_tolerance(manifest: dict) -> tuple[float, float] | None:
    """The (atol, factor) an export was accepted with, if its manifest says; shown, never used:
    a manifest is not trusted to loosen the check."""
    try:
        recorded = manifest["parity"]["tolerance"]
        return float(recorded["atol"]), float(recorded["factor"])
    except (ValueError, KeyError, TypeError):
        return None


def _plain_name(name: str) -> bool:
    """A file name directly in the folder: no separator, no '..', no NUL, not too long."""
    return (
        name not in ("", ".", "..", MANIFEST_FILE)
        and Path(name).name == name
        and not any(c in name for c in "\\\0")
        and len(os.fsencode(name)) <= NAME_MAX
    )


def artifact_table(out_dir: Path, manifest: dict) -> dict[str, dict]:
    """The manifest's artifacts, refused as bad input unless a table of tables whose names
    are plain file names in the folder: nothing outside it is ever read for a manifest."""
    manifest_path = out_dir / MANIFEST_FILE
    recorded = manifest.get("artifacts")
    if not isinstance(recorded, dict) or not all(isinstance(e, dict) for e in recorded.values()):
        raise UsageError(f"{manifest_path} is not a valid manifest: artifacts must be a table")
    for name in recorded:
        if not _plain_name(name):
            raise UsageError(
                f"{manifest_path} is not a valid manifest: expected artifact names that are "
                f"plain file names in {out_dir} (at most {NAME_MAX} bytes), got "
                f"{_shown(name)}" + (f" ({len(name)} characters)" if len(name) > 60 else "")
            )
    return recorded


def hash_problems(out_dir: Path, recorded: dict[str, dict], names: list[str]) -> list[str]:
    """Each of `names` against its sha256 in the manifest's artifact table `recorded`: not
    listed, a symbolic link, missing, not a regular file or changed is a problem; a file
    that cannot be read at all (no permission) is bad input."""
    problems = []
    for name in names:
        path, entry = out_dir / name, recorded.get(name)
        if entry is None:
            problems.append(f"{name} is not listed in the manifest, so nothing vouches for it")
        elif path.is_symlink():  # an export writes files; a link could point anywhere
            problems.append(f"{name} is a symbolic link, not a file the export wrote")
        elif not path.exists():
            problems.append(f"{name} is listed in the manifest but missing")
        elif not path.is_file():
            problems.append(f"{name} is listed in the manifest but is not a regular file")
        else:
            try:
                digest = sha256(path)
            except OSError as exc:
                raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
            if digest != entry.get("sha256"):
                problems.append(
                    f"{name} does not match the manifest's sha256 (changed since export)"
                )
    return problems


def check_manifest(out_dir: Path, manifest: dict) -> list[str]:
    """Hash every artifact the manifest lists; model.pt and model.onnx must be among them
    (and model.fused.pt with its kernel library, model.fused.onnx with its op library, or a
    library alone, when the folder has one).

    A manifest that cannot be read as one we wrote (see `artifact_table`) is refused as bad
    input. What it reads and finds wrong (an artifact unlisted, missing, not a regular file
    or changed) is returned as a problem, a breach like a missing manifest.
    """
    recorded = artifact_table(out_dir, manifest)
    # A kernel library in the folder is native code a deployment loads: it must be vouched
    # for whenever it is there, and model.fused.pt (model.fused.onnx) never comes without it.
    required = [TORCHSCRIPT_FILE, ONNX_FILE]
    for model, library in (
        (FUSED_TORCHSCRIPT_FILE, KERNEL_LIBRARY),
        (PT2_FILE, KERNEL_LIBRARY),
        (FUSED_ONNX_FILE, ORT_KERNEL_LIBRARY),
    ):
        if (out_dir / model).exists():
            required += [model, library]
        elif (out_dir / library).exists():
            required.append(library)
    required = list(dict.fromkeys(required))  # model.fused.pt and model.pt2 share the library
    listed = list(recorded)
    return hash_problems(out_dir, recorded, [*[n for n in required if n not in listed], *listed])
