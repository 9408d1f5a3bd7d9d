"""Describe a model.pt, a model.onnx or a whole export folder: config, signature, opset, sizes."""

from __future__ import annotations

import json
import math
from pathlib import Path

from lstm_export.artifacts import FUSED_TORCHSCRIPT_FILE, MANIFEST_FILE, ONNX_FILE, TORCHSCRIPT_FILE
from lstm_export.config import LSTMConfig
from lstm_export.errors import UsageError


def inspect_torchscript(path: Path) -> dict:
    from lstm_export.torchscript import forward_signature, load_torchscript

    module, config = load_torchscript(path)
    return {
        "kind": "torchscript",
        "path": str(path),
        "bytes": path.stat().st_size,
        "config": config.to_dict(),
        "forward": forward_signature(module),
        "parameters": sum(p.numel() for p in module.parameters()),
    }


def inspect_onnx(path: Path) -> dict:
    import onnx

    from lstm_export.pipeline import onnx_signature
    from lstm_export.runtime import CONFIG_KEY

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise UsageError(f"{path} is not an ONNX file: {exc}") from None
    meta = {p.key: p.value for p in model.metadata_props}
    if CONFIG_KEY not in meta:
        raise UsageError(f"{path} is ONNX but not an lstm-export model (no {CONFIG_KEY} metadata)")
    config = LSTMConfig.from_json(meta[CONFIG_KEY], source=f"{path} {CONFIG_KEY} metadata")
    return {
        "kind": "onnx",
        "path": str(path),
        "bytes": path.stat().st_size,
        "config": config.to_dict(),
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir_version": model.ir_version,
        "route": meta.get("lstm_export.route", ""),
        "signature": onnx_signature(model),
        "parameters": sum(math.prod(t.dims) for t in model.graph.initializer),
    }


def inspect_folder(path: Path) -> dict:
    manifest_path = path / MANIFEST_FILE
    info: dict = {"kind": "export folder", "path": str(path), "files": {}}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise UsageError(f"{manifest_path} is not valid JSON: {exc}") from None
        if not isinstance(manifest, dict):
            raise UsageError(f"{manifest_path} is not a valid manifest: expected a JSON object")
        info["manifest"] = {k: manifest.get(k) for k in ("name", "config", "versions")}
        parity = manifest.get("parity") or {}
        if not isinstance(parity, dict):  # only shown, but a list has no .get
            raise UsageError(
                f"{manifest_path} is not a valid manifest: expected parity to be an object, "
                f"got {type(parity).__name__}"
            )
        info["manifest"]["parity"] = {
            k: parity.get(k) for k in ("passed", "reference", "tolerance", "worst_error")
        }
    readers = (
        (TORCHSCRIPT_FILE, inspect_torchscript),
        (ONNX_FILE, inspect_onnx),
        (FUSED_TORCHSCRIPT_FILE, inspect_torchscript),
    )
    for name, inspect_file in readers:
        if (path / name).is_file():
            info["files"][name] = inspect_file(path / name)
    if not info["files"]:
        raise UsageError(f"{path} holds neither {TORCHSCRIPT_FILE} nor {ONNX_FILE}")
    return info


def inspect(path: Path | str) -> dict:
    """What is in `path`: a .pt, a .onnx or an export folder."""
    path = Path(path)
    if path.is_dir():
        return inspect_folder(path)
    if not path.is_file():
        raise UsageError(f"expected a .pt, a .onnx or an export folder, but {path} does not exist")
    if path.suffix == ".onnx":
        return inspect_onnx(path)
    if path.suffix in (".pt", ".pth", ".ts"):
        return inspect_torchscript(path)
    raise UsageError(f"expected a .pt, a .onnx or an export folder, got {path.name}")
