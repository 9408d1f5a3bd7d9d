"""Describe a model.pt, a model.pt2, a model.onnx or a whole export folder: config (batch_first and
bidirectional included), signature, whether it takes `lengths`, opset, sizes; for
model.fused.onnx also the op library it needs (the graph is read with `onnx`, not run, so
neither library is built or loaded).

What is described comes from the files themselves. A folder's manifest is shown as what it
is, a record written at export that nothing here checks (`lstm-export verify` checks its
hashes, config and name and recomputes parity): labelled so, and with a warning where it
contradicts the files.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from lstm_export.artifacts import (
    FUSED_ONNX_FILE,
    FUSED_TORCHSCRIPT_FILE,
    LENGTHS_INPUT,
    ONNX_FILE,
    OP_LIBRARY_KEY,
    PT2_FILE,
    ROUTE_KEY,
    TORCHSCRIPT_FILE,
    check_model_name,
)
from lstm_export.config import LSTMConfig, config_from_metadata
from lstm_export.errors import UsageError
from lstm_export.files import read_manifest

RECORDED = (
    "recorded at export, not verified here: `lstm-export verify` checks the config, the "
    "hashes and the name, and recomputes parity"
)


def inspect_torchscript(path: Path) -> dict:
    from lstm_export.exporters.torchscript import forward_signature, load_torchscript, takes_lengths

    module, config = load_torchscript(path)
    return {
        "kind": "torchscript",
        "path": str(path),
        "bytes": path.stat().st_size,
        "config": config.to_dict(),
        "forward": forward_signature(module),
        # Artifacts written before padded batches have no lengths argument: say so plainly.
        "takes_lengths": takes_lengths(module),
        "parameters": sum(p.numel() for p in module.parameters()),
    }


def inspect_onnx(path: Path) -> dict:
    from lstm_export.exporters.onnx_graph import onnx_signature
    from lstm_export.runtime.onnx import load_onnx

    model = load_onnx(path)  # refused before reading: not a file, empty, over 2 GiB
    meta = {p.key: p.value for p in model.metadata_props}
    config = config_from_metadata(meta, str(path))
    library = {"op_library": meta[OP_LIBRARY_KEY]} if OP_LIBRARY_KEY in meta else {}
    return {
        "kind": "onnx",
        "path": str(path),
        "bytes": path.stat().st_size,
        "config": config.to_dict(),
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ir_version": model.ir_version,
        "route": meta.get(ROUTE_KEY, ""),
        **library,  # model.fused.onnx: the file name of the library it runs with
        "signature": onnx_signature(model),
        "takes_lengths": any(i.name == LENGTHS_INPUT for i in model.graph.input),
        "parameters": sum(math.prod(t.dims) for t in model.graph.initializer),
    }


def inspect_pt2(path: Path) -> dict:
    """model.pt2 from its archive's metadata files: nothing is loaded, nothing compiled."""
    from lstm_export.runtime.pt2 import package_metadata

    models = package_metadata(path)
    if not models:
        raise UsageError(f"{path} is a zip archive but holds no compiled model's metadata")
    meta = next(iter(models.values()))
    config = config_from_metadata(meta, str(path))
    return {
        "kind": "pt2",
        "path": str(path),
        "bytes": path.stat().st_size,
        "config": config.to_dict(),
        "route": meta.get(ROUTE_KEY, ""),
        "op_library": meta.get(OP_LIBRARY_KEY, ""),
        "models": sorted(models),
        "cpu_isa": meta.get("AOTI_CPU_ISA", "not recorded"),
        "takes_lengths": any("lengths" in name for name in models),
    }


def inspect_folder(path: Path) -> dict:
    manifest = read_manifest(path)  # bounded, depth-limited; None if there is none
    info: dict = {"kind": "export folder", "path": str(path), "files": {}}
    readers = (
        (TORCHSCRIPT_FILE, inspect_torchscript),
        (ONNX_FILE, inspect_onnx),
        (FUSED_TORCHSCRIPT_FILE, inspect_torchscript),
        (FUSED_ONNX_FILE, inspect_onnx),
        (PT2_FILE, inspect_pt2),
    )
    for name, inspect_file in readers:
        if (path / name).exists() or (path / name).is_symlink():
            info["files"][name] = inspect_file(path / name)
    if not info["files"]:
        raise UsageError(f"{path} holds neither {TORCHSCRIPT_FILE} nor {ONNX_FILE}")
    if manifest is not None:
        info["manifest"] = _recorded(path, manifest, info["files"])
    return info


def _recorded(path: Path, manifest: dict, files: dict) -> dict:
    """The manifest's name, config, versions and parity verdict, labelled as recorded, with
    a warning for each the files contradict or no export could have written."""
    recorded: dict = {"note": RECORDED}
    recorded.update({k: manifest.get(k) for k in ("name", "config", "versions")})
    parity = manifest.get("parity") or {}
    if not isinstance(parity, dict):  # only shown, but a list has no .get
        raise UsageError(
            f"{path / 'manifest.json'} is not a valid manifest: expected parity to be an "
            f"object, got {type(parity).__name__}"
        )
    recorded["parity"] = {
        k: parity.get(k) for k in ("passed", "reference", "tolerance", "worst_error")
    }
    warnings = []
    try:  # strictly: JSON's 1 is not true, though Python's 1 == True
        claimed = LSTMConfig.from_dict(recorded["config"], source="the recorded config")
    except UsageError as exc:
        warnings.append(str(exc))
    else:
        warnings += [
            f"the recorded config {claimed.to_dict()} differs from {name}'s {entry['config']}"
            for name, entry in files.items()
            if claimed != LSTMConfig(**entry["config"])
        ]
    try:
        check_model_name(recorded["name"], "the recorded name")
    except UsageError as exc:
        warnings.append(str(exc))
    recorded["warnings"] = warnings
    return recorded


def inspect(path: Path | str) -> dict:
    """What is in `path`: a .pt, a .onnx or an export folder."""
    path = Path(path)
    if path.is_dir():
        return inspect_folder(path)
    if not os.path.lexists(path):
        raise UsageError(f"expected a .pt, a .onnx or an export folder, but {path} does not exist")
    if path.suffix == ".onnx":  # each reader says why what is there is not a model
        return inspect_onnx(path)
    if path.suffix in (".pt", ".pth", ".ts"):
        return inspect_torchscript(path)
    if path.suffix == ".pt2":
        return inspect_pt2(path)
    raise UsageError(f"expected a .pt, a .pt2, a .onnx or an export folder, got {path.name}")
