"""The export pipeline: model -> artifacts (model.pt, model.onnx) -> validation -> manifest.

Each step is a function of its own; `export` runs them into a staging folder
beside the destination and moves it into place only once parity holds, so a
failed export leaves nothing behind and never half-replaces an old one.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import onnx

from lstm_export.artifacts import (
    FUSED_TORCHSCRIPT_FILE,
    MANIFEST_FILE,
    ONNX_FILE,
    PARITY_REPORT_FILE,
    TORCHSCRIPT_FILE,
    check_model_name,
)
from lstm_export.config import DEFAULT_LIMITS, LSTMConfig, SizeLimits, check_size
from lstm_export.errors import UsageError
from lstm_export.exporters import kernel, onnx_graph, routes
from lstm_export.exporters.onnx_graph import OPSET, build_onnx
from lstm_export.exporters.torchscript import config_of, forward_signature, save_torchscript
from lstm_export.files import check_destination, replaceable_export, sha256, write_file
from lstm_export.model import LSTM
from lstm_export.staging import staged_folder
from lstm_export.verification.folder import verify_artifacts
from lstm_export.verification.parity import ATOL, FACTOR, ParityReport, Tolerance

MANIFEST_VERSION = 2  # 2: parity against float64 (tolerance is a rule, rows carry floors)
Progress = Callable[[str], None]


@dataclass
class ExportResult:
    out_dir: Path
    manifest: dict
    report: ParityReport


def save_onnx(model: LSTM, path: Path, opset: int = OPSET) -> onnx.ModelProto:
    """Build, check (full_check) and save the ONNX graph of `model`."""
    onnx_model = build_onnx(model, opset)
    onnx.checker.check_model(onnx_model, full_check=True)
    write_file(path, onnx_model.SerializeToString())  # onnx.save, with the file named
    return onnx_model


def onnx_signature(onnx_model: onnx.ModelProto) -> dict:
    """Inputs and outputs with symbolic dims by name, read off the graph itself."""

    def describe(values) -> dict:
        described = {}
        for value in values:
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            described[value.name] = {"shape": dims, "dtype": str(dtype)}
        return described

    return {
        "inputs": describe(onnx_model.graph.input),
        "outputs": describe(onnx_model.graph.output),
    }


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("lstm-export", "torch", "onnx", "onnxruntime"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _file_entry(path: Path) -> dict:
    return {"sha256": sha256(path), "bytes": path.stat().st_size}


def fused_kernel_entries(folder: Path, config: LSTMConfig, torchscript_schema: str) -> dict:
    """Manifest entries of `model.fused.pt` and the kernel library it needs."""
    return {
        FUSED_TORCHSCRIPT_FILE: {
            **_file_entry(folder / FUSED_TORCHSCRIPT_FILE),
            "forward": torchscript_schema,
            "route": routes.route_of(config, fused_kernel=True),
            "requires": kernel.KERNEL_LIBRARY,
        },
        kernel.KERNEL_LIBRARY: {
            **_file_entry(folder / kernel.KERNEL_LIBRARY),
            "route": f"{kernel.OP_NAME}, built here with {' '.join(kernel.compile_flags())}",
            "platform": f"{platform.system()} {platform.machine()}",
        },
    }


def build_manifest(
    folder: Path,
    config: LSTMConfig,
    onnx_model: onnx.ModelProto,
    torchscript_schema: str,
    report: ParityReport,
    name: str,
) -> dict:
    """Everything a deployer needs to trust the folder without re-running the export."""
    fused = {}
    if (folder / FUSED_TORCHSCRIPT_FILE).is_file():
        fused = fused_kernel_entries(folder, config, torchscript_schema)
    return {
        "manifest_version": MANIFEST_VERSION,
        "name": name,
        "config": config.to_dict(),
        "artifacts": {
            TORCHSCRIPT_FILE: {
                **_file_entry(folder / TORCHSCRIPT_FILE),
                "forward": torchscript_schema,
                "route": routes.route_of(config),
            },
            ONNX_FILE: {
                **_file_entry(folder / ONNX_FILE),
                "opset": next(o.version for o in onnx_model.opset_import if o.domain == ""),
                "ir_version": onnx_model.ir_version,
                "route": onnx_graph.route_of(config),
            },
            **fused,
        },
        "signature": onnx_signature(onnx_model),
        "versions": _versions(),
        "parity": report.to_dict(),
    }


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False)  # strict JSON only
    write_file(path, text + "\n")


def _check_float32(model: LSTM) -> None:
    """Refuse other dtypes up front: the artifacts and the parity matrix are float32 only.

    Converting silently would export numbers other than the caller's model computes.
    """
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in model.state_dict().values()})
    if dtypes != ["float32"]:
        got = ", ".join(d for d in dtypes if d != "float32")
        raise UsageError(f"export needs a float32 model, got {got}; call model.float()")


def check_keep_failed(keep_failed: Path | str, out_dir: Path) -> Path:
    """Where a refused export's files may go: a new folder that can be made, outside the
    destination (which a refused export leaves untouched)."""
    keep_failed = Path(keep_failed)
    if keep_failed.exists() or keep_failed.is_symlink():
        raise UsageError(f"{keep_failed} already exists; --keep-failed needs a new folder")
    kept, destination = keep_failed.resolve(), Path(out_dir).resolve()
    if kept == destination or destination in kept.parents:
        raise UsageError(
            f"--keep-failed {keep_failed} is inside the export's destination {out_dir}; "
            "choose a folder elsewhere"
        )
    if kept in destination.parents:  # the export would create it on its way to out_dir
        raise UsageError(
            f"--keep-failed {keep_failed} holds the export's destination {out_dir}; "
            "choose a folder beside it instead"
        )
    parent = next(p for p in kept.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(
            f"--keep-failed {keep_failed} cannot be created: {parent} is not a writable folder"
        )
    return keep_failed


def _keep(staging: Path, keep_failed: Path, report: ParityReport) -> None:
    """Copy the artifacts that failed parity and the report into `keep_failed`, atomically."""
    with staged_folder(keep_failed) as kept:
        for path in staging.iterdir():
            if path.is_file():
                shutil.copyfile(path, kept / path.name)
        _write_json(kept / PARITY_REPORT_FILE, report.to_dict())


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
    keep_failed: Path | str | None = None,
    limits: SizeLimits = DEFAULT_LIMITS,
    progress: Progress | None = None,
) -> ExportResult:
    """Write model.pt, model.onnx and manifest.json into `out_dir`, verified.

    Every artifact must agree with the eager model in float64 within
    `max(atol, factor x float32 floor)` on the parity matrix (`lstm_export.verification.parity`).
    `fused_kernel` (LayerNorm models) adds `model.fused.pt`, which runs each layer in
    the fused kernel, and `lstm_export_kernels.so`, the library it needs, both verified.

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
        scripted = save_torchscript(model, staging / TORCHSCRIPT_FILE)
        fused_path = None
        if fused_kernel:
            step("Building the fused LayerNorm-LSTM kernel")
            shutil.copyfile(kernel.build_kernel(), staging / kernel.KERNEL_LIBRARY)
            fused_path = staging / FUSED_TORCHSCRIPT_FILE
            save_torchscript(model, fused_path, fused_kernel=True)
        step("Building model.onnx")
        onnx_model = save_onnx(model, staging / ONNX_FILE, opset)
        step("Verifying parity: eager vs TorchScript vs onnxruntime")
        report = verify_artifacts(
            staging / TORCHSCRIPT_FILE, staging / ONNX_FILE, tolerance, fused_path
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
        schema = forward_signature(scripted)
        manifest = build_manifest(staging, config, onnx_model, schema, report, name)
        _write_json(staging / MANIFEST_FILE, manifest)
        step(f"Writing {out_dir}")
    return ExportResult(out_dir, manifest, report)
