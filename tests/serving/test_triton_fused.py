"""`triton --fused-kernel`: the repository of a fused export ships model.fused.onnx's
batch-first graph and the op library, named in config.pbtxt; the validator checks the library.

The graph is run here with raw onnxruntime and our build of the library (Triton itself cannot
run here), against the eager model in float64 under the parity rule.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb2

from helpers import run_cli
from lstm_export.artifacts import ATOL, FACTOR, FUSED_ONNX_FILE, ORT_KERNEL_LIBRARY
from lstm_export.checkpoints import build_model
from lstm_export.config import LSTMConfig
from lstm_export.errors import ParityError, UsageError
from lstm_export.pipeline import export
from lstm_export.serving.triton import validate_triton_repo, write_triton_repo
from lstm_export.verification.parity import Tolerance

CONFIG = LSTMConfig(5, 13, 2, layer_norm=True)
TOLERANCE = Tolerance(ATOL, FACTOR)


@pytest.fixture(scope="module")
def fused(ort_library, tmp_path_factory):
    """A fused export (LayerNorm 5/13/2), its model, and its Triton repository."""
    model = build_model(CONFIG, seed=8).eval()
    root = tmp_path_factory.mktemp("triton-fused")
    folder = export(model, root / "m", fused_kernel=True).out_dir
    model_dir = write_triton_repo(folder, root / "repo", "lstm", fused_kernel=True)
    return model, folder, model_dir


def parsed_config(model_dir: Path) -> pb2.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), pb2.ModelConfig())


def eager(model, x_bf: np.ndarray, dtype) -> list[np.ndarray]:
    """Batch-first x in, Triton's layout out (y batch-first, states batch-major)."""
    module = copy.deepcopy(model).to(torch.float64 if dtype == np.float64 else torch.float32)
    with torch.no_grad():
        y, (h, c) = module(torch.from_numpy(x_bf.transpose(1, 0, 2).astype(dtype)))
    return [
        y.numpy().transpose(1, 0, 2),
        h.numpy().transpose(1, 0, 2),
        c.numpy().transpose(1, 0, 2),
    ]


def test_the_repository_ships_the_fused_graph_and_its_library_named_in_config(fused):
    _, folder, model_dir = fused
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt", ORT_KERNEL_LIBRARY]
    library = model_dir / ORT_KERNEL_LIBRARY
    manifest = json.loads((folder / "manifest.json").read_text())
    digest = hashlib.sha256(library.read_bytes()).hexdigest()
    assert digest == manifest["artifacts"][ORT_KERNEL_LIBRARY]["sha256"]
    assert library.read_bytes() == (folder / ORT_KERNEL_LIBRARY).read_bytes()
    config = parsed_config(model_dir)
    assert list(config.model_operations.op_library_filename) == [str(library.resolve())]
    graph = onnx.load(str(model_dir / "1" / "model.onnx"))
    assert sum(n.domain == "lstm_export" for n in graph.graph.node) == 2  # one per layer
    assert {o.domain: o.version for o in graph.opset_import}["lstm_export"] == 1
    assert validate_triton_repo(model_dir)["op_libraries"] == [str(library.resolve())]


def test_the_fused_batch_first_graph_meets_the_parity_rule_with_our_library(fused, ort_library):
    model, _, model_dir = fused
    options = ort.SessionOptions()
    options.register_custom_ops_library(str(ort_library))  # our build, as Triton would load one
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), options)
    x = np.random.default_rng(0).standard_normal((3, 9, 5), dtype=np.float32)
    zeros = np.zeros((3, 2, 13), np.float32)  # Triton's implicit state starts from zeros
    got = session.run(["y", "hn", "cn"], {"x": x, "h0": zeros, "c0": zeros})
    want = eager(model, x, np.float64)
    floor = [np.abs(a - b).max() for a, b in zip(eager(model, x, np.float32), want, strict=True)]
    for name, g, w, f in zip(("y", "hn", "cn"), got, want, floor, strict=True):
        assert g.shape == w.shape, name
        assert np.abs(g - w).max() <= TOLERANCE.allowed(float(f)), name
    assert np.abs(got[0] * 1.01 - want[0]).max() > TOLERANCE.allowed(float(floor[0]))


def test_without_the_flag_a_fused_export_gives_the_plain_repository(fused, tmp_path):
    _, folder, _ = fused
    model_dir = write_triton_repo(folder, tmp_path / "repo", "lstm")
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt"]
    assert not parsed_config(model_dir).HasField("model_operations")
    graph = onnx.load(str(model_dir / "1" / "model.onnx"))
    assert not any(n.domain == "lstm_export" for n in graph.graph.node)


def test_the_validator_checks_the_named_library(fused, tmp_path):
    _, folder, model_dir = fused
    manifest = json.loads((folder / "manifest.json").read_text())
    recorded = manifest["artifacts"][ORT_KERNEL_LIBRARY]["sha256"]
    copy_dir = shutil.copytree(model_dir, tmp_path / "lstm")
    library = copy_dir / ORT_KERNEL_LIBRARY
    assert validate_triton_repo(copy_dir, library_sha256=recorded)
    library.write_bytes(library.read_bytes() + b"\0")
    with pytest.raises(UsageError, match="its sha256 differs from the manifest's"):
        validate_triton_repo(copy_dir, library_sha256=recorded)
    library.unlink()
    with pytest.raises(UsageError, match=f"{ORT_KERNEL_LIBRARY} is not in the model folder"):
        validate_triton_repo(copy_dir)
    os.symlink(model_dir / ORT_KERNEL_LIBRARY, library)
    with pytest.raises(UsageError, match="is not a regular file"):
        validate_triton_repo(copy_dir)
    library.unlink()
    shutil.copyfile(model_dir / ORT_KERNEL_LIBRARY, library)
    config = (copy_dir / "config.pbtxt").read_text()
    (copy_dir / "config.pbtxt").write_text(config.split("model_operations")[0])
    with pytest.raises(UsageError, match="names no model_operations"):
        validate_triton_repo(copy_dir)
    (copy_dir / "config.pbtxt").write_text(
        config.replace(str((model_dir / ORT_KERNEL_LIBRARY).resolve()), ORT_KERNEL_LIBRARY)
    )
    with pytest.raises(UsageError, match="is not an absolute path"):
        validate_triton_repo(copy_dir)


def test_a_fused_repository_needs_an_export_that_vouches_for_its_library(fused, tmp_path):
    _, folder, _ = fused
    tampered = shutil.copytree(folder, tmp_path / "tampered")
    (tampered / ORT_KERNEL_LIBRARY).write_bytes(b"not the library the export wrote")
    with pytest.raises(ParityError, match="is not the export its manifest describes"):
        write_triton_repo(tampered, tmp_path / "repo", "lstm", fused_kernel=True)
    (tampered / "manifest.json").unlink()
    with pytest.raises(UsageError, match="nothing vouches for"):
        write_triton_repo(tampered, tmp_path / "repo", "lstm", fused_kernel=True)
    plain = export(build_model(CONFIG, seed=8), tmp_path / "plain").out_dir
    with pytest.raises(UsageError, match=f"has no {FUSED_ONNX_FILE}"):
        write_triton_repo(plain, tmp_path / "repo", "lstm", fused_kernel=True)
    assert not (tmp_path / "repo" / "lstm").exists()


@pytest.mark.slow  # a child process that imports torch and proves the graph
def test_cli_triton_fused_kernel(fused, tmp_path):
    _, folder, _ = fused
    done = run_cli("triton", folder, "--repo", tmp_path / "repo", "--fused-kernel")
    assert done.returncode == 0, done.stderr
    assert "model.fused.onnx's batch-first graph" in done.stdout
    assert (tmp_path / "repo" / "m" / ORT_KERNEL_LIBRARY).is_file()
