"""The export pipeline: model -> artifacts (model.pt, model.onnx) -> validation -> manifest.

Each step is a function of its own (`lstm_export.exporters` writes, `lstm_export.verification`
proves); `export` runs them into a staging folder beside the destination and moves it into
place only once parity holds, so a failed export leaves nothing behind and never
half-replaces an old one. It sits above both: the one module that writes and then proves.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from lstm_export.artifacts import (
    ATOL,
    FACTOR,
    FUSED_ONNX_FILE,
    FUSED_TORCHSCRIPT_FILE,
    KERNEL_LIBRARY,
    MANIFEST_FILE,
    ONNX_FILE,
    OPSET,
    ORT_KERNEL_LIBRARY,
    PARITY_REPORT_FILE,
    PT2_FILE,
    TORCHSCRIPT_FILE,
    check_model_name,
)
from lstm_export.config import DEFAULT_LIMITS, SizeLimits, check_size
from lstm_export.errors import UsageError
from lstm_export.exporters.manifest import build_manifest
from lstm_export.exporters.onnx_fused import save_fused_onnx
from lstm_export.exporters.onnx_graph import save_onnx
from lstm_export.exporters.pt2_package import save_pt2
from lstm_export.exporters.torchscript import (
    TorchScriptRefused,
    config_of,
    forward_signature,
    own_weights,
    save_torchscript,
)
from lstm_export.files import (
    check_destination,
    check_keep_failed,
    replaceable_export,
    write_json,
)
from lstm_export.model import LSTM, LSTMCell
from lstm_export.native import ort_kernel
from lstm_export.native.torch_kernel import build_kernel
from lstm_export.staging import staged_folder
from lstm_export.verification.folder import verify_artifacts
from lstm_export.verification.parity import ParityReport, Tolerance

Progress = Callable[[str], None]


@dataclass
class ExportResult:
    out_dir: Path
    manifest: dict
    report: ParityReport
    warnings: list[str] = field(default_factory=list)
    """What was not written, and why (each one line; the export itself succeeded)."""


def ort_library_warning(error: UsageError) -> str:
    """The one line an export with the fused kernel says when the onnxruntime op library
    could not be built: what was left out, why, and how to get it."""
    why = str(error)
    if ort_kernel.INCLUDE_ENV not in why:
        why += f" (onnxruntime's headers come from {ort_kernel.INCLUDE_ENV} or npm)"
    return (
        f"{FUSED_ONNX_FILE} and {ORT_KERNEL_LIBRARY} were not written, the rest of the export "
        f"is complete and verified: {why}"
    )


def no_torchscript_warning(error: TorchScriptRefused, fused_kernel: bool) -> str:
    """The one line an export says when torch would not script the model: what was left
    out, why, and what C++ programs load instead."""
    left_out = TORCHSCRIPT_FILE + (f" and {FUSED_TORCHSCRIPT_FILE}" if fused_kernel else "")
    return (
        f"{left_out} not written ({error}); the rest of the export is complete and verified "
        f"against the eager model; for libtorch, export --pt2 writes {PT2_FILE}"
    )


def _check_float32(model: LSTM) -> None:
    """Refuse other dtypes up front: the artifacts and the parity matrix are float32 only.

    Converting silently would export numbers other than the caller's model computes.
    """
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in own_weights(model).values()})
    if dtypes != ["float32"]:
        got = ", ".join(d for d in dtypes if d != "float32")
        raise UsageError(f"export needs a float32 model, got {got}; call model.float()")


_LAYER_NORM_EPS = nn.LayerNorm(1).eps
"""The eps `LSTMCell` builds its LayerNorms with (torch's default), which every artifact uses."""
_OWN_METHODS = {LSTM: ("forward", "_checked", "_output"), LSTMCell: ("forward", "scan")}
"""The methods whose code is the equations: every artifact computes these, from the weights."""


def _check_own_equations(model: LSTM) -> None:
    """Refuse a model that computes something other than `LSTM`'s equations on its weights:
    a subclass overriding them, a cell's module swapped or LayerNorm's eps changed. The
    artifacts (and the reference `verify` rebuilds from model.pt) would compute the plain
    model, so such an export would pass parity against the wrong model."""
    for name, module, base in [("the model", model, LSTM)] + [
        (f"{part}.{k}", cell, LSTMCell)
        for part in ("cells", "reverse_cells")
        for k, cell in enumerate(getattr(model, part))
    ]:
        kind = type(module).__name__
        if not isinstance(module, base):
            raise UsageError(f"cannot export: {name} is a {kind}, not an {base.__name__}")
        for method in _OWN_METHODS[base]:
            if getattr(type(module), method) is not getattr(base, method):
                raise UsageError(
                    f"cannot export: {name} ({kind}) overrides {base.__name__}.{method}, and "
                    f"the artifacts compute {base.__name__}'s own equations from the weights"
                )
        if base is LSTMCell:
            _check_cell_parts(name, module, model.layer_norm)


def _check_cell_parts(name: str, cell: LSTMCell, layer_norm: bool) -> None:
    """A cell's parts are the modules `LSTMCell` builds, LayerNorm with its default eps."""
    norm = nn.LayerNorm if layer_norm else nn.Identity
    parts = {"input_lin": nn.Linear, "hidden_lin": nn.Linear, "layer_norm_c": norm}
    parts |= {f"layer_norm.{k}": norm for k in range(4)}
    for part, expected in parts.items():
        module = cell.get_submodule(part)
        if type(module) is not expected:
            got = type(module).__name__
            raise UsageError(
                f"cannot export: {name}.{part} is a {got}, where the artifacts compute an "
                f"nn.{expected.__name__}"
            )
        eps = getattr(module, "eps", _LAYER_NORM_EPS)
        if eps != _LAYER_NORM_EPS:
            raise UsageError(
                f"cannot export: {name}.{part} has eps {eps:g}, and the artifacts compute "
                f"LayerNorm with eps {_LAYER_NORM_EPS:g}"
            )


def _keep(staging: Path, keep_failed: Path, report: ParityReport) -> None:
    """Copy the artifacts that failed parity and the report into `keep_failed`, atomically."""
    with staged_folder(keep_failed) as kept:
        for path in staging.iterdir():
            if path.is_file():
                shutil.copyfile(path, kept / path.name)
        write_json(kept / PARITY_REPORT_FILE, report.to_dict())


def export(
    model: LSTM,
    out_dir: Path | str,
    *,
    name: str | None = None,
    force: bool = False,
    opset: int = OPSET,
    atol: float = ATOL,
    factor: float = FACTOR,
    fused_kernel: bool = False,
    pt2: bool = False,
    keep_failed: Path | str | None = None,
    limits: SizeLimits = DEFAULT_LIMITS,
    progress: Progress | None = None,
) -> ExportResult:
    """Write model.pt, model.onnx and manifest.json into `out_dir`, verified.

    Every artifact must agree with the eager model in float64 within
    `max(atol, factor x float32 floor)` on the parity matrix (`lstm_export.verification.parity`).
    `fused_kernel` (LayerNorm models) adds `model.fused.pt`, which runs each layer in
    the fused kernel, and `lstm_export_kernels.so`, the library it needs, both verified;
    and `model.fused.onnx` with `liblstm_export_ort_ops.so`, the same kernel for
    onnxruntime, verified too. Where that op library cannot be built (no onnxruntime
    headers: `LSTM_EXPORT_ORT_INCLUDE`, or npm to fetch them), those two are left out and
    `ExportResult.warnings` says why; everything else is written and proven as usual.
    `pt2` adds `model.pt2` (torch.export + AOTInductor, `lstm_export.exporters.pt2`; tens of
    seconds of compiling) and the kernel library it calls, verified like the rest.

    Raises `UsageError` if `out_dir` exists and `force` is False (or it is not an
    export or empty, see `check_destination`), if another export writes there now, if
    `model` is not float32 (it is refused, not converted) or beyond `limits`
    (`lstm_export.config.SizeLimits`), or if `atol`/`factor` is not a finite number >= 0;
    and `ParityError` (with the report) if the backends disagree. In every case nothing
    is written to `out_dir`. With `keep_failed`, a refused export's artifacts and its
    parity report (`parity.json`) go to that new folder.
    """
    out_dir = Path(out_dir)
    step = progress or (lambda _message: None)
    tolerance = Tolerance(atol, factor)
    _check_own_equations(model)
    _check_float32(model)
    check_destination(out_dir, force)
    name = check_model_name(
        name or out_dir.resolve().name, "the model name (--name, else the --out folder's name)"
    )
    if keep_failed is not None:
        keep_failed = check_keep_failed(keep_failed, out_dir)
    model = model.eval()
    config = config_of(model)
    check_size(config, limits, "the model")  # bounds the artifacts and the parity work
    if fused_kernel and not config.layer_norm:
        raise UsageError(
            "the fused kernel is for layer_norm=True models; this one is plain, and its "
            "model.pt already runs aten's fused LSTM kernel"
        )
    with staged_folder(out_dir, replaceable_export if force else None) as staging:
        step("Scripting model.pt")
        scripted, warnings = None, []
        try:
            scripted = save_torchscript(model, staging / TORCHSCRIPT_FILE)
        except TorchScriptRefused as exc:  # deprecated upstream: the rest goes on
            warnings.append(no_torchscript_warning(exc, fused_kernel))
        fused_path = fused_onnx = None
        if fused_kernel:
            step("Building the fused LayerNorm-LSTM kernel")
            shutil.copyfile(build_kernel(), staging / KERNEL_LIBRARY)
            if scripted is not None:
                fused_path = staging / FUSED_TORCHSCRIPT_FILE
                save_torchscript(model, fused_path, fused_kernel=True)
            step("Building the fused kernel's onnxruntime op library")
            try:
                library = ort_kernel.build_ort_library()
            except UsageError as exc:  # no headers, npm or compiler: the rest goes on
                warnings.append(ort_library_warning(exc))
            else:
                shutil.copyfile(library.path, staging / ORT_KERNEL_LIBRARY)
                step(f"Building {FUSED_ONNX_FILE}")
                fused_onnx = (save_fused_onnx(model, staging / FUSED_ONNX_FILE, opset), library)
        pt2_path = None
        if pt2:
            if not (staging / KERNEL_LIBRARY).exists():
                step("Building the kernel library model.pt2 calls")
                shutil.copyfile(build_kernel(), staging / KERNEL_LIBRARY)
            pt2_path = staging / PT2_FILE
            save_pt2(model, pt2_path, step)
        step("Building model.onnx")
        onnx_model = save_onnx(model, staging / ONNX_FILE, opset)
        step("Verifying parity: every artifact against the eager model in float64")
        report = verify_artifacts(
            None if scripted is None else staging / TORCHSCRIPT_FILE,
            staging / ONNX_FILE,
            tolerance,
            fused_path,
            None if fused_onnx is None else staging / FUSED_ONNX_FILE,
            pt2_path,
            model=model,
        )
        if not report.passed:
            kept = ""
            if keep_failed is not None:
                try:
                    _keep(staging, keep_failed, report)
                    kept = f"; the artifacts and {PARITY_REPORT_FILE} are in {keep_failed}"
                except UsageError as exc:  # the breach is the news; say why nothing was kept
                    kept = f"; nothing kept either: {exc}"
            report.raise_if_failed(
                f"the export to {out_dir}", f"nothing written to {out_dir}{kept}"
            )
        schema = None if scripted is None else forward_signature(scripted)
        manifest = build_manifest(
            staging, config, onnx_model, schema, report.to_dict(), name, fused_onnx, warnings
        )
        write_json(staging / MANIFEST_FILE, manifest)
        step(f"Writing {out_dir}")
    return ExportResult(out_dir, manifest, report, warnings)
