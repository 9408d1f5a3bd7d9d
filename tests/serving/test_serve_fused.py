"""`serve --fused-kernel`: model.fused.onnx served for real (a subprocess on a free loopback
port), its answers held to the parity rule against the eager model in float64.

Only 127.0.0.1 is ever contacted; every server is stopped by the test that started it.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from lstm_export.artifacts import ATOL, FACTOR, FUSED_ONNX_FILE, ONNX_FILE, ORT_KERNEL_LIBRARY
from lstm_export.checkpoints import build_model
from lstm_export.config import LSTMConfig
from lstm_export.pipeline import export
from lstm_export.serving.http import create_app
from lstm_export.verification.parity import Tolerance
from server_process import Client, Server

pytestmark = pytest.mark.slow  # exports with the fused kernel and starts servers

TOLERANCE = Tolerance(ATOL, FACTOR)
CONFIG = LSTMConfig(5, 13, 2, layer_norm=True)  # hidden 13: the kernel's vector block and tail
FLAGS = ("--fused-kernel",)


class Eager:
    """The reference: the eager model in float64, and the parity rule's allowance from the
    float32 floor (eager float32 on x and on copies of x moved by one ulp)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()
        self.model64 = copy.deepcopy(model).double().eval()

    @staticmethod
    def _run(module, x, state, lengths, dtype) -> list[np.ndarray]:
        def tensor(a):
            return None if a is None else torch.from_numpy(np.asarray(a, dtype=dtype))

        s = None if state is None else (tensor(state[0]), tensor(state[1]))
        n = None if lengths is None else torch.tensor(lengths, dtype=torch.int64)
        with torch.no_grad():
            y, (h, c) = module(tensor(x), s, n)
        return [y.numpy(), h.numpy(), c.numpy()]

    def check(self, got, x, state=None, lengths=None) -> None:
        want = self._run(self.model64, x, state, lengths, np.float64)
        rng = np.random.default_rng(0)
        floors = [0.0, 0.0, 0.0]
        for moved in range(4):
            x32 = x
            if moved:
                up = rng.random(x.shape) < 0.5
                x32 = np.where(up, np.nextafter(x, np.inf), np.nextafter(x, -np.inf))
            ours = self._run(self.model, x32.astype(np.float32), state, lengths, np.float32)
            floors = [
                max(f, float(np.abs(o - w).max()))
                for f, o, w in zip(floors, ours, want, strict=True)
            ]
        for name, g, w, floor in zip(("y", "hn", "cn"), got, want, floors, strict=True):
            assert g.shape == w.shape, (name, g.shape, w.shape)
            error, allowed = float(np.abs(g - w).max()), TOLERANCE.allowed(floor)
            assert error <= allowed, f"{name} is off by {error:.3g}, allowed {allowed:.3g}"


@pytest.fixture(scope="module")
def fused(ort_library, tmp_path_factory):
    """A fused export (LayerNorm 5/13/2) and a server of it with --fused-kernel."""
    model = build_model(CONFIG, seed=6)
    folder = export(model, tmp_path_factory.mktemp("fused") / "m", fused_kernel=True).out_dir
    server = Server(folder, tmp_path_factory.mktemp("log") / "server.log", flags=FLAGS)
    yield folder, server, Eager(model)
    code = server.stop()
    assert code == 0, server.log()
    assert "Traceback" not in server.log()


@pytest.fixture
def client(fused):
    connection = Client(fused[1].port)
    yield connection
    connection.close()


def arrays(reply, *keys) -> list[np.ndarray]:
    assert reply.status == 200, reply.data
    return [np.asarray(reply.data[k], dtype=np.float32) for k in keys]


def test_v1_model_says_model_fused_onnx_is_served_and_our_build_of_the_library_runs_it(
    fused, client, ort_library
):
    folder, server, _ = fused
    info = client.call("GET", "/v1/model")
    assert info.status == 200, info.data
    assert info.data["served"] == FUSED_ONNX_FILE
    digest = hashlib.sha256((folder / FUSED_ONNX_FILE).read_bytes()).hexdigest()
    assert info.data["artifacts"][FUSED_ONNX_FILE]["sha256"] == digest
    assert f"({FUSED_ONNX_FILE})" in server.log()
    # The kernel's op library mapped into the server is our build, not the folder's copy.
    # (Compared by cache folder, not by build: a source edited meanwhile makes a new build.)
    mapped = {
        Path(line.split()[-1])
        for line in Path(f"/proc/{server.proc.pid}/maps").read_text().splitlines()
        if line.endswith(ORT_KERNEL_LIBRARY)
    }
    assert mapped and all(p.parent.parent == ort_library.resolve().parent.parent for p in mapped)
    assert (folder / ORT_KERNEL_LIBRARY).resolve() not in mapped


def test_v1_predictions_equal_eager_float64(fused, client):
    _, _, eager = fused
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 3, 5), dtype=np.float32)
    state = tuple(rng.standard_normal((2, 3, 13), dtype=np.float32) for _ in range(2))
    for s in (None, state):
        body = {"x": x.tolist()}
        if s is not None:
            body |= {"h0": s[0].tolist(), "c0": s[1].tolist()}
        eager.check(arrays(client.call("POST", "/v1/predict", body), "y", "hn", "cn"), x, s)
    lengths = [7, 1, 4]
    got = arrays(client.call("POST", "/v1/predict", body | {"lengths": lengths}), "y", "hn", "cn")
    eager.check(got, x, state, lengths)
    wrong = arrays(client.call("POST", "/v1/predict", {"x": (x * 1.01).tolist()}), "y", "hn", "cn")
    with pytest.raises(AssertionError, match="is off by"):  # the check can fail
        eager.check(wrong, x)


def test_a_v1_stream_equals_eager_float64_of_the_whole_sequence(fused, client):
    _, _, eager = fused
    x = np.random.default_rng(2).standard_normal((11, 2, 5), dtype=np.float32)
    created = client.call("POST", "/v1/streams", {"batch": 2})
    assert created.status == 201, created.data
    url, ys = created.data["url"], []
    for a, b in ((0, 4), (4, 5), (5, 11)):
        reply = client.call("POST", f"{url}/step", {"x": x[a:b].tolist()})
        ys.append(arrays(reply, "y")[0])
    eager.check([np.concatenate(ys), *arrays(reply, "hn", "cn")], x)
    assert client.call("DELETE", url).status == 200


def test_v2_infers_model_fused_onnx_with_the_triton_models_metadata(fused, client):
    folder, _, eager = fused
    name = client.call("GET", "/v1/model").data["name"]
    metadata = client.call("GET", f"/v2/models/{name}")
    plain = create_app(folder)  # model.onnx, whose /v2 signature the fused server keeps
    try:
        assert metadata.status == 200 and metadata.data == plain.state.inference.model_metadata()
    finally:
        plain.state.service.pool.shutdown()
    x = np.random.default_rng(3).standard_normal((2, 6, 5), dtype=np.float32)  # batch-first
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    reply = client.call("POST", f"/v2/models/{name}/infer", {"inputs": [tensor]})
    assert reply.status == 200, reply.data
    (y,) = reply.data["outputs"]
    assert y["name"] == "y" and y["shape"] == [2, 6, 13]
    got_y = np.asarray(y["data"], dtype=np.float32).reshape(2, 6, 13).transpose(1, 0, 2)
    time_major = np.ascontiguousarray(x.transpose(1, 0, 2))
    want_h, want_c = Eager._run(eager.model64, time_major, None, None, np.float64)[1:]
    eager.check([got_y, want_h, want_c], time_major)  # y from /v2; hn, cn are not served


def serve_cli(folder: Path, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lstm_export.cli", "serve", str(folder), "--port", "0"]
    return subprocess.run([*command, *options], capture_output=True, text=True, timeout=60)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "http://" not in done.stderr + done.stdout  # never listened
    return lines[0]


def test_fused_kernel_refused_in_one_line_without_model_fused_onnx_or_a_buildable_library(
    fused, tmp_path
):
    folder = fused[0]
    plain = export(build_model(CONFIG, seed=6), tmp_path / "plain").out_dir
    line = one_error_line(serve_cli(plain, *FLAGS))
    assert f"{FUSED_ONNX_FILE} does not exist" in line and "export --fused-kernel" in line
    tampered = shutil.copytree(folder, tmp_path / "tampered")
    graph = onnx.load(str(tampered / FUSED_ONNX_FILE))
    graph.doc_string = "changed after export"
    onnx.save(graph, str(tampered / FUSED_ONNX_FILE))
    assert "does not match" in one_error_line(serve_cli(tampered, *FLAGS))
    assert (tampered / ONNX_FILE).is_file()  # model.onnx itself still serves without the flag
    # No onnxruntime headers and no npm: the library cannot be built.
    empty = tmp_path / "empty"
    empty.mkdir()
    cache = tmp_path / "cache"
    env = os.environ | {
        "LSTM_EXPORT_ORT_INCLUDE": str(empty),
        "LSTM_EXPORT_KERNEL_CACHE": str(cache),
    }
    command = [sys.executable, "-m", "lstm_export.cli", "serve", str(folder), "--port", "0"]
    done = subprocess.run([*command, *FLAGS], capture_output=True, text=True, timeout=60, env=env)
    assert "LSTM_EXPORT_ORT_INCLUDE" in one_error_line(done)
