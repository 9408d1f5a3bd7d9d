"""The manifest of an export folder: what was written, by which route, with which hashes.

Built here, where the routes and the graph are known; read, written and checked against
the files by `lstm_export.files` and `lstm_export.verification`.
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

import onnx

from lstm_export.artifacts import (
    FUSED_ONNX_FILE,
    FUSED_TORCHSCRIPT_FILE,
    KERNEL_LIBRARY,
    MANIFEST_VERSION,
    ONNX_FILE,
    ORT_KERNEL_LIBRARY,
    PT2_FILE,
    PT2_MODELS,
    TORCHSCRIPT_FILE,
)
from lstm_export.config import LSTMConfig
from lstm_export.exporters import onnx_fused, onnx_graph, pt2, routes
from lstm_export.exporters.onnx_graph import onnx_signature
from lstm_export.files import file_entry
from lstm_export.native import ort_kernel
from lstm_export.native import torch_kernel as kernel
from lstm_export.native.ort_kernel import OrtLibrary


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("lstm-export", "torch", "onnx", "onnxruntime"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def kernel_library_entry(folder: Path) -> dict:
    """Manifest entry of the kernel library model.fused.pt and model.pt2 need."""
    return {
        **file_entry(folder / KERNEL_LIBRARY),
        "route": f"{kernel.OP_NAME} and {kernel.PLAIN_OP_NAME}, built here with "
        f"{' '.join(kernel.compile_flags())}",
        "platform": f"{platform.system()} {platform.machine()}",
    }


def fused_kernel_entries(folder: Path, config: LSTMConfig, torchscript_schema: str) -> dict:
    """Manifest entries of `model.fused.pt` and the kernel library it needs."""
    return {
        FUSED_TORCHSCRIPT_FILE: {
            **file_entry(folder / FUSED_TORCHSCRIPT_FILE),
            "forward": torchscript_schema,
            "route": routes.route_of(config, fused_kernel=True),
            "requires": KERNEL_LIBRARY,
        },
        KERNEL_LIBRARY: kernel_library_entry(folder),
    }


def pt2_entries(folder: Path, config: LSTMConfig) -> dict:
    """Manifest entries of `model.pt2` and the kernel library it needs: the models it holds
    (by name, what each takes), the torch it is tied to and the CPU instructions it was
    compiled for."""
    import torch

    return {
        PT2_FILE: {
            **file_entry(folder / PT2_FILE),
            "route": routes.pt2_route_of(config),
            "models": {name: pt2.call_form(*form) for name, form in PT2_MODELS.items()},
            "torch": torch.__version__,
            "cpu_isa": pt2.compiled_isa(),
            "requires": KERNEL_LIBRARY,
        },
        KERNEL_LIBRARY: kernel_library_entry(folder),
    }


def _onnx_entry(folder: Path, name: str, onnx_model: onnx.ModelProto, route: str) -> dict:
    return {
        **file_entry(folder / name),
        "opset": next(o.version for o in onnx_model.opset_import if o.domain == ""),
        "ir_version": onnx_model.ir_version,
        "route": route,
    }


def fused_onnx_entries(folder: Path, fused_onnx: onnx.ModelProto, library: OrtLibrary) -> dict:
    """Manifest entries of `model.fused.onnx` and the onnxruntime op library it needs."""
    api = library.api_version
    flags = " ".join(ort_kernel.compile_flags())
    return {
        FUSED_ONNX_FILE: {
            **_onnx_entry(folder, FUSED_ONNX_FILE, fused_onnx, onnx_fused.ROUTE),
            "requires": ORT_KERNEL_LIBRARY,
        },
        ORT_KERNEL_LIBRARY: {
            **file_entry(folder / ORT_KERNEL_LIBRARY),
            "route": f"{ort_kernel.DOMAIN}.{ort_kernel.OP_TYPE} (onnxruntime custom op), "
            f"built here with {flags} against onnxruntime's C API {api}",
            "onnxruntime": f">= 1.{api}",
            "platform": f"{platform.system()} {platform.machine()}",
        },
    }


def build_manifest(
    folder: Path,
    config: LSTMConfig,
    onnx_model: onnx.ModelProto,
    torchscript_schema: str | None,
    parity: dict,
    name: str,
    fused_onnx: tuple[onnx.ModelProto, OrtLibrary] | None = None,
    warnings: list[str] | None = None,
) -> dict:
    """Everything a deployer needs to trust the folder without re-running the export;
    `parity` is the report of the proof (`ParityReport.to_dict()`), done before this step.
    `fused_onnx`: model.fused.onnx as written and the op library copied beside it.
    `torchscript_schema` None: model.pt was not written (torch.jit.script refused); the
    export's `warnings` say why and are recorded."""
    scripted, fused = {}, {}
    if torchscript_schema is not None:
        scripted[TORCHSCRIPT_FILE] = {
            **file_entry(folder / TORCHSCRIPT_FILE),
            "forward": torchscript_schema,
            "route": routes.route_of(config),
        }
    if torchscript_schema is not None and (folder / FUSED_TORCHSCRIPT_FILE).is_file():
        fused = fused_kernel_entries(folder, config, torchscript_schema)
    if fused_onnx is not None:
        fused |= fused_onnx_entries(folder, *fused_onnx)
    if (folder / PT2_FILE).is_file():
        fused |= pt2_entries(folder, config)
    return {
        "manifest_version": MANIFEST_VERSION,
        "name": name,
        "config": config.to_dict(),
        "artifacts": {
            **scripted,
            ONNX_FILE: _onnx_entry(folder, ONNX_FILE, onnx_model, onnx_graph.route_of(config)),
            **fused,
        },
        "export_warnings": list(warnings or []),
        "signature": onnx_signature(onnx_model),
        "versions": _versions(),
        "parity": parity,
    }
