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
    FUSED_TORCHSCRIPT_FILE,
    KERNEL_LIBRARY,
    MANIFEST_VERSION,
    ONNX_FILE,
    TORCHSCRIPT_FILE,
)
from lstm_export.config import LSTMConfig
from lstm_export.exporters import kernel, onnx_graph, routes
from lstm_export.exporters.onnx_graph import onnx_signature
from lstm_export.files import file_entry


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("lstm-export", "torch", "onnx", "onnxruntime"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def fused_kernel_entries(folder: Path, config: LSTMConfig, torchscript_schema: str) -> dict:
    """Manifest entries of `model.fused.pt` and the kernel library it needs."""
    return {
        FUSED_TORCHSCRIPT_FILE: {
            **file_entry(folder / FUSED_TORCHSCRIPT_FILE),
            "forward": torchscript_schema,
            "route": routes.route_of(config, fused_kernel=True),
            "requires": KERNEL_LIBRARY,
        },
        KERNEL_LIBRARY: {
            **file_entry(folder / KERNEL_LIBRARY),
            "route": f"{kernel.OP_NAME}, built here with {' '.join(kernel.compile_flags())}",
            "platform": f"{platform.system()} {platform.machine()}",
        },
    }


def build_manifest(
    folder: Path,
    config: LSTMConfig,
    onnx_model: onnx.ModelProto,
    torchscript_schema: str,
    parity: dict,
    name: str,
) -> dict:
    """Everything a deployer needs to trust the folder without re-running the export;
    `parity` is the report of the proof (`ParityReport.to_dict()`), done before this step."""
    fused = {}
    if (folder / FUSED_TORCHSCRIPT_FILE).is_file():
        fused = fused_kernel_entries(folder, config, torchscript_schema)
    return {
        "manifest_version": MANIFEST_VERSION,
        "name": name,
        "config": config.to_dict(),
        "artifacts": {
            TORCHSCRIPT_FILE: {
                **file_entry(folder / TORCHSCRIPT_FILE),
                "forward": torchscript_schema,
                "route": routes.route_of(config),
            },
            ONNX_FILE: {
                **file_entry(folder / ONNX_FILE),
                "opset": next(o.version for o in onnx_model.opset_import if o.domain == ""),
                "ir_version": onnx_model.ir_version,
                "route": onnx_graph.route_of(config),
            },
            **fused,
        },
        "signature": onnx_signature(onnx_model),
        "versions": _versions(),
        "parity": parity,
    }
