"""`lstm-export serve`'s Open Inference Protocol (/v2, as Triton speaks it over HTTP), run for
real: a subprocess on a loopback port, driven with tritonclient.http as a Triton client would,
and with raw http.client for what tritonclient cannot send.

Expected values never come from the code under test: answers are held to the project's parity
rule against the eager model in float64 (`Tolerance(ATOL, FACTOR)` over a float32 floor
measured here), and metadata against the config.pbtxt `write_triton_repo` writes, converted
by Triton's own rule written out below. Tests that start their own server, or run long, are
marked slow; the others share module-scoped servers, whose logs must end with no traceback
and no 500.
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import http.client
import itertools
import json
import math
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

import lstm_export
from helpers import small_model
from lstm_export.artifacts import ATOL, FACTOR
from lstm_export.checkpoints import build_model
from lstm_export.config import LSTMConfig
from lstm_export.pipeline import export
from lstm_export.serving.triton import write_triton_repo
from lstm_export.serving.triton.model_config import read_model_config
from lstm_export.verification.parity import Tolerance
from server_process import LIMITS, LOOPBACK, TIMEOUT, Server

INPUT_SIZE, HIDDEN, LAYERS = 5, 8, 2
HEADER_LENGTH = "Inference-Header-Content-Length"
TOLERANCE = Tolerance(ATOL, FACTOR)
REALIZATIONS = 8  # eager float32 runs (x, and x moved by one ulp) whose worst error is the floor
START_ERROR = "must specify the START flag on the first request of the sequence"
BATCH_ERROR = "must specify batch-size 1 due to requirements of sequence batcher"


# --------------------------------------------------------------------------- the reference


def _one_ulp_away(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    up = rng.random(x.shape) < 0.5
    return np.where(up, np.nextafter(x, np.inf), np.nextafter(x, -np.inf)).astype(np.float32)


@dataclass
class Expected:
    """What /v2 must answer for one batch-first x: the float64 eager outputs (y batch-first,
    hn/cn batch-major, as the protocol shows them) and, per output, the error allowed."""

    want: dict[str, np.ndarray]
    allowed: dict[str, float]

    def check(self, got: dict[str, np.ndarray], names=("y", "hn", "cn")) -> None:
        for name in names:
            assert name in got, f"{name} missing from the answer ({sorted(got)})"
            g, w = got[name], self.want[name]
            assert g.dtype == np.float32, (name, g.dtype)
            assert g.shape == w.shape, (name, g.shape, w.shape)
            error = float(np.max(np.abs(g.astype(np.float64) - w)))
            allowed = self.allowed[name]
            assert error <= allowed, f"{name} is off by {error:.3g}, allowed {allowed:.3g}"

    def differs(self, got: dict[str, np.ndarray], name: str = "y") -> bool:
        """True when `got` fails the rule for `name` (to show a check could fail)."""
        error = float(np.max(np.abs(got[name].astype(np.float64) - self.want[name])))
        return error > self.allowed[name]


class Reference:
    """The eager model in float64 (a deepcopy, `.double()`), inputs cast up exactly, and the
    parity rule's allowance from the float32 floor: the worst error of eager float32 on x and
    on copies of x moved by one ulp (stacked along the batch: rows of an LSTM never mix)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()
        self.model64 = copy.deepcopy(model).double().eval()
        self.batch_first = bool(model.batch_first)

    def _run(self, module: torch.nn.Module, x: np.ndarray, dtype) -> dict[str, np.ndarray]:
        """Batch-first x in, the protocol's layout out, whatever the model's own layout."""
        own = x if self.batch_first else x.transpose(1, 0, 2)
        with torch.no_grad():
            y, (h, c) = module(torch.from_numpy(np.ascontiguousarray(own, dtype=dtype)))
        y = y.numpy() if self.batch_first else y.numpy().transpose(1, 0, 2)
        return {"y": y, "hn": h.numpy().transpose(1, 0, 2), "cn": c.numpy().transpose(1, 0, 2)}

    def expect(self, x: np.ndarray) -> Expected:
        assert x.dtype == np.float32 and x.ndim == 3
        want = self._run(self.model64, x, np.float64)
        rng = np.random.default_rng(0)
        copies = [x] + [_one_ulp_away(x, rng) for _ in range(REALIZATIONS - 1)]
        ours = self._run(self.model, np.concatenate(copies, axis=0), np.float32)
        batch = x.shape[0]
        allowed = {}
        for name, w in want.items():
            floor = max(
                float(np.max(np.abs(ours[name][r * batch : (r + 1) * batch] - w)))
                for r in range(REALIZATIONS)
            )
            allowed[name] = TOLERANCE.allowed(floor)
        return Expected(want, allowed)


def chunks_of(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    assert sum(sizes) == x.shape[1]
    bounds = np.cumsum([0, *sizes])
    return [x[:, a:b] for a, b in itertools.pairwise(bounds)]


def rand(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


# --------------------------------------------------------------------------- servers


@dataclass
class Deployed:
    model: torch.nn.Module
    folder: Path
    server: Server
    reference: Reference
    name: str = "lstm"

    def client(self) -> httpclient.InferenceServerClient:
        """A client closed at the end of the test (each holds a connection open)."""
        made = httpclient.InferenceServerClient(
            f"{LOOPBACK}:{self.server.port}", network_timeout=TIMEOUT
        )
        OPEN_CLIENTS.append(made)
        return made


OPEN_CLIENTS: list[httpclient.InferenceServerClient] = []


@pytest.fixture(autouse=True)
def _close_clients():
    yield
    while OPEN_CLIENTS:
        OPEN_CLIENTS.pop().close()


def assert_clean_log(server: Server) -> None:
    log = server.log()
    assert "Traceback" not in log, log[-3000:]
    assert '" 500 ' not in log, log[-3000:]


def start(folder: Path, log: Path, model, flags=(), **limits) -> Deployed:
    server = Server(folder, log, flags=flags, **limits)
    return Deployed(model, folder, server, Reference(model))


def stop(deployed: Deployed) -> None:
    while OPEN_CLIENTS:
        OPEN_CLIENTS.pop().close()
    code = deployed.server.stop()
    assert code == 0, deployed.server.log()
    assert_clean_log(deployed.server)


@pytest.fixture(scope="module")
def time_major_export(tmp_path_factory):
    model = small_model(True, LAYERS, seed=3)
    assert not model.batch_first
    return model, export(model, tmp_path_factory.mktemp("v2") / "lstm").out_dir


@pytest.fixture(scope="module")
def batch_first_export(tmp_path_factory):
    model = build_model(LSTMConfig(INPUT_SIZE, HIDDEN, LAYERS, True, batch_first=True), seed=3)
    assert model.batch_first
    return model, export(model, tmp_path_factory.mktemp("v2bf") / "lstm").out_dir


@pytest.fixture(scope="module")
def plain(time_major_export, tmp_path_factory):
    """The time-major export served as it is (y only on /v2)."""
    model, folder = time_major_export
    deployed = start(folder, tmp_path_factory.mktemp("log") / "plain.log", model)
    yield deployed
    stop(deployed)


@pytest.fixture(scope="module")
def stateful(time_major_export, tmp_path_factory):
    """The time-major export with --expose-state (y, hn, cn)."""
    model, folder = time_major_export
    log = tmp_path_factory.mktemp("log") / "state.log"
    deployed = start(folder, log, model, flags=("--expose-state",))
    yield deployed
    stop(deployed)


@pytest.fixture(scope="module")
def batch_first(batch_first_export, tmp_path_factory):
    """The batch_first export with --expose-state: /v2 must not transpose its x."""
    model, folder = batch_first_export
    log = tmp_path_factory.mktemp("log") / "bf.log"
    deployed = start(folder, log, model, flags=("--expose-state",))
    yield deployed
    stop(deployed)


# --------------------------------------------------------------------------- clients


def infer(
    client: httpclient.InferenceServerClient,
    name: str,
    x: np.ndarray,
    *,
    outputs: tuple[str, ...] | None = ("y", "hn", "cn"),
    binary_in: bool = True,
    binary_out: bool | dict[str, bool] = True,
    **options,
) -> tuple[dict[str, np.ndarray], dict]:
    """One infer through tritonclient: (outputs by name, the answer's JSON header)."""
    tensor = httpclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary_in)
    requested = None
    if outputs is not None:
        binary = binary_out if isinstance(binary_out, dict) else dict.fromkeys(outputs, binary_out)
        requested = [httpclient.InferRequestedOutput(o, binary_data=binary[o]) for o in outputs]
    result = client.infer(name, [tensor], outputs=requested, **options)
    header = result.get_response()
    return {o["name"]: result.as_numpy(o["name"]) for o in header["outputs"]}, header


def refused(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


@dataclass
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        assert self.headers.get("content-type") == "application/json", self.headers
        return json.loads(self.body)


def send(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None
) -> Raw:
    """One request on a fresh connection (some refusals close theirs)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        answer = conn.getresponse()
        data = answer.read()
        return Raw(answer.status, {k.lower(): v for k, v in answer.getheaders()}, data)
    finally:
        conn.close()


def x_tensor(x: np.ndarray, **changes) -> dict:
    """x as a JSON tensor (flat data), with any field replaced."""
    item = {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    return item | changes


def as_bytes(data: object) -> bytes:
    return json.dumps(data).encode()


# --------------------------------------------------------------------------- 1. metadata


def triton_model_metadata(config) -> dict:
    """What Triton answers on GET /v2/models/NAME for a ModelConfig, by Triton's rule: a model
    that batches (max_batch_size > 0) shows -1 for the batch dim before the config's dims; the
    datatype is the config's data_type without TYPE_; the platform is the config's, which
    Triton's core fills in as onnxruntime_onnx for backend onnxruntime when the config has
    none (model_config_utils.cc); versions are the repository's version folders (`1`)."""
    assert config.max_batch_size > 0

    def tensor(t) -> dict:
        datatype = model_config_pb2.DataType.Name(t.data_type).removeprefix("TYPE_")
        return {"name": t.name, "datatype": datatype, "shape": [-1, *t.dims]}

    return {
        "name": config.name,
        "versions": ["1"],
        "platform": config.platform or {"onnxruntime": "onnxruntime_onnx"}[config.backend],
        "inputs": [tensor(t) for t in config.input],
        "outputs": [tensor(t) for t in config.output],
    }


def test_health_and_server_metadata(plain):
    port = plain.server.port
    assert send(port, "GET", "/v2/health/live").json() == {"live": True}
    assert send(port, "GET", "/v2/health/ready").json() == {"ready": True}
    server = send(port, "GET", "/v2")
    assert server.status == 200
    assert server.json() == {
        "name": "lstm-export",
        "version": lstm_export.__version__,
        "extensions": ["binary_tensor_data", "sequence"],
    }
    client = plain.client()
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata() == server.json()


@pytest.mark.parametrize(
    "deployment,expose_state",
    [("plain", False), ("stateful", True), ("batch_first", True)],
)
def test_model_metadata_is_what_config_pbtxt_declares(request, deployment, expose_state, tmp_path):
    deployed = request.getfixturevalue(deployment)
    model_dir = write_triton_repo(deployed.folder, tmp_path / "repo", expose_state=expose_state)
    _, config = read_model_config(model_dir)
    expected = triton_model_metadata(config)
    # Independent of both: the shapes this model must have (a wrong config fails here too).
    assert expected["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, -1, INPUT_SIZE]}]
    y = {"name": "y", "datatype": "FP32", "shape": [-1, -1, HIDDEN]}
    states = [
        {"name": name, "datatype": "FP32", "shape": [-1, LAYERS, HIDDEN]} for name in ("hn", "cn")
    ]
    assert expected["outputs"] == [y, *(states if expose_state else [])]
    assert expected["name"] == deployed.name and expected["platform"] == "onnxruntime_onnx"

    client = deployed.client()
    assert client.get_model_metadata(deployed.name) == expected
    assert client.get_model_metadata(deployed.name, "1") == expected
    raw = send(deployed.server.port, "GET", f"/v2/models/{deployed.name}/versions/1")
    assert raw.status == 200 and raw.json() == expected
    assert client.is_model_ready(deployed.name) and client.is_model_ready(deployed.name, "1")
    for path in (
        f"/v2/models/{deployed.name}/ready",
        f"/v2/models/{deployed.name}/versions/1/ready",
    ):
        assert send(deployed.server.port, "GET", path).json() == {
            "name": deployed.name,
            "ready": True,
        }


def test_unknown_models_and_versions_are_404(plain):
    client = plain.client()
    error = refused(client.get_model_metadata, "nope")
    assert error.status() == "404" and "unknown model" in error.message()
    error = refused(client.get_model_metadata, plain.name, "2")
    assert error.status() == "404" and "version 2 is not found" in error.message()
    assert not client.is_model_ready("nope")
    assert not client.is_model_ready(plain.name, "2")
    for path in ("/v2/models/nope/ready", f"/v2/models/{plain.name}/versions/2/ready"):
        answer = send(plain.server.port, "GET", path)
        assert answer.status == 404 and "unknown model" in answer.json()["error"]


def test_without_expose_state_only_y_is_served(plain):
    client = plain.client()
    x = rand(2, 2, 3, INPUT_SIZE)
    got, header = infer(client, plain.name, x, outputs=None)
    assert [o["name"] for o in header["outputs"]] == ["y"]
    plain.reference.expect(x).check(got, ("y",))
    error = refused(infer, client, plain.name, x, outputs=("y", "hn"))
    assert error.status() == "400" and "unexpected inference output 'hn'" in error.message()
    # priority and timeout are read and ignored, other custom parameters ignored, as Triton's
    # onnxruntime backend does.
    got, _ = infer(
        client, plain.name, x, outputs=("y",), priority=1, timeout=10**6, parameters={"k": "v"}
    )
    plain.reference.expect(x).check(got, ("y",))


@pytest.mark.slow
def test_serve_name_renames_the_model(time_major_export, tmp_path):
    model, folder = time_major_export
    deployed = start(folder, tmp_path / "named.log", model, flags=("--name", "other"))
    try:
        client = deployed.client()
        metadata = client.get_model_metadata("other")
        assert metadata["name"] == "other"
        assert metadata["inputs"][0]["shape"] == [-1, -1, INPUT_SIZE]
        assert client.is_model_ready("other") and not client.is_model_ready("lstm")
        error = refused(client.get_model_metadata, "lstm")
        assert error.status() == "404" and "'lstm' is not found" in error.message()
        x = rand(1, 2, 4, INPUT_SIZE)
        got, header = infer(client, "other", x, outputs=("y",))
        assert header["model_name"] == "other"
        deployed.reference.expect(x).check(got, ("y",))
        error = refused(infer, client, "lstm", x, outputs=("y",))
        assert error.status() == "404"
    finally:
        stop(deployed)


# --------------------------------------------------------------------------- 2. tensors


MIXED = {"y": True, "hn": False, "cn": True}


@pytest.mark.parametrize("deployment", ["stateful", "batch_first"])
@pytest.mark.parametrize(
    "binary_in,binary_out",
    [(True, True), (False, False), (True, False), (False, True), (False, MIXED), (True, MIXED)],
    ids=["bin-bin", "json-json", "bin-json", "json-bin", "json-mixed", "bin-mixed"],
)
def test_infer_matches_eager(request, deployment, binary_in, binary_out):
    deployed = request.getfixturevalue(deployment)
    client = deployed.client()
    x = rand(11, 3, 7, INPUT_SIZE)  # batch 3, 7 steps, batch-first on /v2 for both layouts
    expected = deployed.reference.expect(x)
    got, header = infer(
        client, deployed.name, x, binary_in=binary_in, binary_out=binary_out, request_id="r-17"
    )
    assert list(got) == ["y", "hn", "cn"]
    expected.check(got)
    assert header["id"] == "r-17"
    assert header["model_name"] == deployed.name and header["model_version"] == "1"
    for entry in header["outputs"]:
        binary = binary_out if isinstance(binary_out, bool) else binary_out[entry["name"]]
        assert ("data" in entry) != binary, entry.keys()
        assert entry["datatype"] == "FP32" and entry["shape"] == list(got[entry["name"]].shape)
    # JSON answers carry exactly the float32 numbers of binary ones.
    binary, _ = infer(client, deployed.name, x)
    for name in ("y", "hn", "cn"):
        np.testing.assert_array_equal(got[name], binary[name])


@pytest.mark.parametrize("deployment", ["stateful", "batch_first"])
def test_infer_with_default_and_partial_outputs(request, deployment):
    deployed = request.getfixturevalue(deployment)
    client = deployed.client()
    x = rand(12, 2, 5, INPUT_SIZE)
    expected = deployed.reference.expect(x)
    # No outputs named: tritonclient asks for all, binary (binary_data_output).
    got, header = infer(client, deployed.name, x, outputs=None)
    assert [o["name"] for o in header["outputs"]] == ["y", "hn", "cn"]
    assert all("data" not in o for o in header["outputs"])
    expected.check(got)
    # Only what is asked for, in the order asked.
    got, header = infer(client, deployed.name, x, outputs=("cn", "y"), binary_out=False)
    assert [o["name"] for o in header["outputs"]] == ["cn", "y"]
    expected.check(got, ("cn", "y"))


@pytest.mark.parametrize("deployment", ["stateful", "batch_first"])
def test_raw_json_nested_and_integer_data(request, deployment):
    deployed = request.getfixturevalue(deployment)
    port, path = deployed.server.port, f"/v2/models/{deployed.name}/infer"
    x = rand(13, 2, 3, INPUT_SIZE)
    expected = deployed.reference.expect(x)
    # Nested data, no outputs named and no binary_data_output: every output as JSON.
    answer = send(port, "POST", path, as_bytes({"inputs": [x_tensor(x, data=x.tolist())]}))
    assert answer.status == 200, answer.body[:300]
    body = answer.json()
    assert "id" not in body and [o["name"] for o in body["outputs"]] == ["y", "hn", "cn"]
    got = {
        o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in body["outputs"]
    }
    expected.check(got)
    # JSON integers are numbers of an FP32 tensor, as in Triton.
    ints = np.arange(2 * 3 * INPUT_SIZE).reshape(2, 3, INPUT_SIZE) % 5 - 2
    doc = {"inputs": [x_tensor(ints, data=ints.ravel().tolist())], "outputs": [{"name": "y"}]}
    answer = send(port, "POST", path, as_bytes(doc), {"Content-Type": "application/json"})
    assert answer.status == 200, answer.body[:300]
    (y,) = answer.json()["outputs"]
    got = {"y": np.asarray(y["data"], np.float32).reshape(y["shape"])}
    deployed.reference.expect(ints.astype(np.float32)).check(got, ("y",))


def test_a_raw_binary_request_and_answer_on_the_wire(stateful):
    """Triton's binary tensor extension read and written here by hand: the JSON header, its
    size in Inference-Header-Content-Length, then raw little-endian float32 in the order the
    header lists the tensors."""
    x = rand(15, 2, 4, INPUT_SIZE)
    tensor = {"name": "x", "datatype": "FP32", "shape": [2, 4, INPUT_SIZE]}
    tensor["parameters"] = {"binary_data_size": x.size * 4}
    header = as_bytes(
        {
            "id": "wire",
            "inputs": [tensor],
            "outputs": [{"name": "cn"}, {"name": "y", "parameters": {"binary_data": False}}],
            "parameters": {"binary_data_output": True},
        }
    )
    body = header + x.astype("<f4").tobytes()
    answer = send(
        stateful.server.port,
        "POST",
        f"/v2/models/{stateful.name}/infer",
        body,
        {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert answer.status == 200, answer.body[:300]
    assert answer.headers["content-type"] == "application/octet-stream"
    length = int(answer.headers[HEADER_LENGTH.lower()])
    meta = json.loads(answer.body[:length])
    assert meta["id"] == "wire" and [o["name"] for o in meta["outputs"]] == ["cn", "y"]
    cn, y = meta["outputs"]
    assert cn["shape"] == [2, LAYERS, HIDDEN] and "data" not in cn
    assert cn["parameters"]["binary_data_size"] == 2 * LAYERS * HIDDEN * 4
    assert len(answer.body) == length + cn["parameters"]["binary_data_size"]
    got = {
        "cn": np.frombuffer(answer.body[length:], "<f4").reshape(cn["shape"]),
        "y": np.asarray(y["data"], np.float32).reshape(y["shape"]),
    }
    stateful.reference.expect(x).check(got, ("cn", "y"))


def test_an_empty_outputs_list_asks_for_every_output(stateful):
    """`"outputs": []` names no output, so every output comes back, as Triton does (its
    InferenceRequest::Normalize: no requested outputs means all of the model's) and as the
    README says ("all of them when none are named"); as JSON, with no binary_data_output."""
    x = rand(16, 1, 3, INPUT_SIZE)
    body = as_bytes({"inputs": [x_tensor(x)], "outputs": []})
    answer = send(stateful.server.port, "POST", f"/v2/models/{stateful.name}/infer", body)
    assert answer.status == 200, answer.body[:300]
    outputs = answer.json()["outputs"]
    assert [o["name"] for o in outputs] == ["y", "hn", "cn"], outputs
    got = {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in outputs}
    stateful.reference.expect(x).check(got)


def test_the_parity_check_can_fail(stateful):
    """The rule is not vacuous: another model's numbers, or this model's run from a state
    other than zeros, fail it."""
    x = rand(14, 2, 6, INPUT_SIZE)
    expected = stateful.reference.expect(x)
    got, _ = infer(stateful.client(), stateful.name, x)
    expected.check(got)
    other = Reference(small_model(True, LAYERS, seed=4)).expect(x).want
    assert expected.differs({k: v.astype(np.float32) for k, v in other.items()})
    shifted = Reference(stateful.model).expect(np.concatenate([x[:, :2], x], axis=1)).want
    assert expected.differs({"y": shifted["y"][:, 2:].astype(np.float32)})


# --------------------------------------------------------------------------- 3-5. sequences


def run_sequence(
    client, name: str, x: np.ndarray, sizes: list[int], sequence_id
) -> list[dict[str, np.ndarray]]:
    """x in chunks as one sequence (start on the first, end on the last)."""
    answers = []
    pieces = chunks_of(x, sizes)
    for i, chunk in enumerate(pieces):
        got, _ = infer(
            client,
            name,
            chunk,
            sequence_id=sequence_id,
            sequence_start=i == 0,
            sequence_end=i == len(pieces) - 1,
            binary_in=i % 2 == 0,
            binary_out=i % 3 != 1,
        )
        answers.append(got)
    return answers


def check_sequence(reference: Reference, x, sizes, answers) -> None:
    """The chunks' y concatenated, and each chunk's hn/cn, equal whole runs of the prefix."""
    whole = reference.expect(x)
    whole.check({"y": np.concatenate([a["y"] for a in answers], axis=1)}, ("y",))
    end = 0
    for size, answer in zip(sizes, answers, strict=True):
        end += size
        reference.expect(np.ascontiguousarray(x[:, :end])).check(answer, ("hn", "cn"))
    whole.check(answers[-1], ("hn", "cn"))


@pytest.mark.parametrize("deployment", ["stateful", "batch_first"])
@pytest.mark.parametrize(
    "sequence_id", [7, "utterance-7", 2**64 - 1], ids=["int-id", "str-id", "uint64-max-id"]
)
def test_a_sequence_in_chunks_equals_one_whole_run(request, deployment, sequence_id):
    deployed = request.getfixturevalue(deployment)
    client = deployed.client()
    x = rand(21, 1, 15, INPUT_SIZE)
    sizes = [4, 1, 7, 3]
    answers = run_sequence(client, deployed.name, x, sizes, sequence_id)
    check_sequence(deployed.reference, x, sizes, answers)
    # The state is really carried: the last chunk alone, from zeros, is something else.
    alone = deployed.reference.expect(np.ascontiguousarray(x[:, -3:]))
    assert alone.differs(answers[-1])
    # And released by the end: the id needs a new start.
    error = refused(infer, client, deployed.name, x[:, :2], sequence_id=sequence_id)
    assert error.status() == "400" and START_ERROR in error.message()


@pytest.mark.parametrize("deployment", ["stateful", "batch_first"])
def test_two_interleaved_sequences_each_equal_their_whole_run(request, deployment):
    deployed = request.getfixturevalue(deployment)
    client = deployed.client()
    # 5 and "5" are two sequences.
    xs = {5: rand(31, 1, 12, INPUT_SIZE), "5": rand(32, 1, 12, INPUT_SIZE)}
    sizes = {5: [3, 3, 4, 2], "5": [5, 1, 1, 5]}
    pieces = {k: chunks_of(xs[k], sizes[k]) for k in xs}
    order = [5, "5", "5", 5, 5, "5", "5", 5]
    sent = dict.fromkeys(xs, 0)
    answers: dict = {k: [] for k in xs}
    for k in order:
        i = sent[k]
        got, _ = infer(
            client,
            deployed.name,
            pieces[k][i],
            sequence_id=k,
            sequence_start=i == 0,
            sequence_end=i == len(pieces[k]) - 1,
        )
        answers[k].append(got)
        sent[k] += 1
    for k in xs:
        check_sequence(deployed.reference, xs[k], sizes[k], answers[k])


def test_an_ended_id_needs_a_new_start_and_starts_from_zeros(stateful):
    client, name, reference = stateful.client(), stateful.name, stateful.reference
    first, second = rand(41, 1, 6, INPUT_SIZE), rand(42, 1, 5, INPUT_SIZE)
    check_sequence(reference, first, [2, 4], run_sequence(client, name, first, [2, 4], 11))
    error = refused(infer, client, name, second, sequence_id=11)
    assert error.status() == "400" and START_ERROR in error.message()
    assert "sequence 11" in error.message()
    # The refused request opened nothing: still no sequence 11.
    error = refused(infer, client, name, second, sequence_id=11, sequence_end=True)
    assert error.status() == "400" and START_ERROR in error.message()
    answers = run_sequence(client, name, second, [3, 2], 11)
    check_sequence(reference, second, [3, 2], answers)  # from zeros, not from first's state


def test_a_start_on_an_open_sequence_restarts_it_from_zeros(stateful):
    client, name, reference = stateful.client(), stateful.name, stateful.reference
    old, new = rand(43, 1, 6, INPUT_SIZE), rand(44, 1, 7, INPUT_SIZE)
    infer(client, name, old[:, :3], sequence_id="r", sequence_start=True)
    infer(client, name, old[:, 3:], sequence_id="r")
    a, _ = infer(client, name, new[:, :4], sequence_id="r", sequence_start=True)
    b, _ = infer(client, name, new[:, 4:], sequence_id="r", sequence_end=True)
    check_sequence(reference, new, [4, 3], [a, b])


# --------------------------------------------------------------------------- 6. bad input

FIRST = rand(51, 1, 3, INPUT_SIZE)  # the open sequence's first chunk
NEXT = rand(52, 1, 3, INPUT_SIZE)  # its continuation after the bad request
BAD_X = rand(53, 1, 4, INPUT_SIZE)  # what a bad request carries: state-changing if run
NAN_X = BAD_X.copy()
NAN_X[0, 1, 2] = np.nan


@dataclass(frozen=True)
class Bad:
    status: int
    fragment: str
    body: bytes
    headers: dict = field(default_factory=dict)
    path: str = "/v2/models/lstm/infer"
    unopened: object = None  # a sequence id this request must not have opened


def doc(sid, start, *, inputs=None, outputs=None, params=None, **top) -> dict:
    """An infer request on sequence `sid` (start flag `start`) carrying BAD_X, as JSON."""
    parameters = {"sequence_id": sid, "sequence_start": start} | (params or {})
    body = {"inputs": inputs or [x_tensor(BAD_X)], "parameters": parameters, **top}
    if outputs is not None:
        body["outputs"] = outputs
    return body


def binary_body(
    sid, start, payload: bytes, size: int, shape=(1, 4, INPUT_SIZE), **extra
) -> tuple[bytes, dict]:
    """An infer request with x as binary data: (body, headers)."""
    tensor = {"name": "x", "datatype": "FP32", "shape": list(shape)}
    tensor["parameters"] = {"binary_data_size": size}
    header = as_bytes(doc(sid, start, inputs=[tensor]))
    return header + payload, {HEADER_LENGTH: str(len(header))} | extra


def bad_binary(status, fragment, sid, start, payload, size, **kw) -> Bad:
    body, headers = binary_body(sid, start, payload, size, **kw)
    return Bad(status, fragment, body, headers)


def bad_json(status, fragment, body: dict | bytes, headers=None, **kw) -> Bad:
    data = body if isinstance(body, bytes) else as_bytes(body)
    return Bad(status, fragment, data, headers or {}, **kw)


BAD_BYTES = BAD_X.tobytes()
FRESH = 987_654_321  # ids never opened
INFLATES = gzip.compress(as_bytes(doc(1, False, params={"pad": "a" * 200_000})))
assert len(INFLATES) < LIMITS["max_body_bytes"]


def header_length(sid, start, status: int, fragment: str, value) -> Bad:
    """A binary request whose Inference-Header-Content-Length is `value(body size, JSON
    header size)` instead of the JSON header's size; `fragment` may name {value}."""
    body, headers = binary_body(sid, start, BAD_BYTES, 80)
    length = str(value(len(body), int(headers[HEADER_LENGTH])))
    return Bad(status, fragment.format(value=length), body, {HEADER_LENGTH: length})


def with_data(sid, start, data, fragment="must hold only numbers") -> Bad:
    return bad_json(400, fragment, doc(sid, start, inputs=[x_tensor(BAD_X, data=data)]))


def x_as(sid, start, x: np.ndarray, status: int, fragment: str, **changes) -> Bad:
    return bad_json(status, fragment, doc(sid, start, inputs=[x_tensor(x, **changes)]))


LAST_IS = [*BAD_X.ravel().tolist()[:-1]]  # BAD_X's data but its last number, to append to

# (id, builder(sequence id, start flag) -> Bad): the open sequence's id goes in every request
# where it makes sense, so that a bad request wrongly run would move (or restart) its state.
# fmt: off
BAD = [
    ("unknown-input", lambda s, st: x_as(
        s, st, BAD_X, 400, "unexpected inference input 'z' for model 'lstm'", name="z")),
    ("datatype-FP64", lambda s, st: x_as(
        s, st, BAD_X, 400, "unexpected datatype FP64 for inference input 'x', expecting FP32",
        datatype="FP64")),
    ("datatype-INT64", lambda s, st: x_as(
        s, st, BAD_X.round().astype(int), 400, "unexpected datatype INT64", datatype="INT64")),
    ("shape-rank-2", lambda s, st: x_as(
        s, st, BAD_X[0], 400, "unexpected shape for input 'x' for model 'lstm'")),
    ("input-size-4", lambda s, st: x_as(
        s, st, BAD_X[:, :, :4], 400, "Expected [-1, -1, 5], got [1, 4, 4]")),
    ("shape-negative", lambda s, st: x_as(
        s, st, BAD_X, 400, "Unable to parse 'shape' of input 'x'", shape=[1, -4, 5])),
    ("data-count-not-shape", lambda s, st: x_as(
        s, st, BAD_X, 400, "unexpected number of elements for input 'x'", shape=[1, 3, 5])),
    ("ragged-data", lambda s, st: with_data(
        s, st, [[0.5] * 5] * 3 + [[0.5] * 4], "'data' of input 'x' must be a list of numbers")),
    ("boolean-in-float-data", lambda s, st: with_data(s, st, [*LAST_IS, True])),
    ("boolean-in-integer-data", lambda s, st: with_data(s, st, [1] * 19 + [True])),
    ("false-in-integer-data", lambda s, st: with_data(s, st, [[0] * 5] * 3 + [[0] * 4 + [False]])),
    ("boolean-data", lambda s, st: with_data(s, st, [True] * 20)),
    ("string-in-data", lambda s, st: with_data(s, st, [*LAST_IS, "0.5"])),
    ("null-in-data", lambda s, st: with_data(s, st, [*LAST_IS, None])),
    ("float32-overflow-in-data", lambda s, st: with_data(s, st, [1e39] * 20, "finite")),
    ("binary-size-not-shape", lambda s, st: bad_binary(
        400, "unexpected size 76 for input 'x'", s, st, BAD_BYTES[:76], 76)),
    ("binary-short", lambda s, st: bad_binary(
        400, "expecting 40 additional bytes", s, st, BAD_BYTES[:40], 80)),
    ("binary-extra-trailing-bytes", lambda s, st: bad_binary(
        400, "unexpected additional input data", s, st, BAD_BYTES + b"\0\0\0\0", 80)),
    # Refused by the runtime inside the sequence's turn: as a restart, and as its next chunk.
    ("binary-nan-with-start", lambda s, st: bad_binary(
        400, "finite", s, True, NAN_X.tobytes(), 80)),
    ("binary-nan-without-start", lambda s, st: bad_binary(
        400, "finite", s, False, NAN_X.tobytes(), 80)),
    ("binary-and-data", lambda s, st: x_as(
        s, st, BAD_X, 400, "has both 'data' and 'binary_data_size'",
        parameters={"binary_data_size": 80})),
    ("header-length-over-body", lambda s, st: header_length(
        s, st, 400, HEADER_LENGTH + " is {value}, but the body has", lambda body, _: body + 1)),
    ("header-length-not-a-number", lambda s, st: header_length(
        s, st, 400, HEADER_LENGTH + " must be a byte count, got 'abc'", lambda *_: "abc")),
    ("header-length-negative", lambda s, st: header_length(
        s, st, 400, HEADER_LENGTH + " must be a byte count", lambda *_: -5)),
    ("header-length-zero", lambda s, st: header_length(
        s, st, 400, HEADER_LENGTH + " is 0", lambda *_: 0)),
    ("header-length-cuts-the-json", lambda s, st: header_length(
        s, st, 400, "not valid JSON", lambda _, header: header - 3)),
    ("unknown-output", lambda s, st: bad_json(
        400, "unexpected inference output 'q'", doc(s, st, outputs=[{"name": "q"}]))),
    ("output-twice", lambda s, st: bad_json(
        400, "asked for twice", doc(s, st, outputs=[{"name": "y"}, {"name": "y"}]))),
    ("classification", lambda s, st: bad_json(
        400, "classification extension is not supported",
        doc(s, st, outputs=[{"name": "y", "parameters": {"classification": 2}}]))),
    ("shared-memory", lambda s, st: x_as(
        s, st, BAD_X, 400, "shared memory is not supported",
        parameters={"shared_memory_region": "r", "shared_memory_byte_size": 80})),
    ("triton-parameter", lambda s, st: bad_json(
        400, "reserved for Triton usage",
        doc(s, st, params={"triton_enable_empty_final_response": True}))),
    ("binary-data-output-not-bool", lambda s, st: bad_json(
        400, "Unable to parse 'binary_data_output'",
        doc(s, st, params={"binary_data_output": "yes"}))),
    ("priority-negative", lambda s, st: bad_json(
        400, "Unable to parse 'priority'", doc(s, st, params={"priority": -1}))),
    ("sequence-without-start", lambda s, st: bad_json(
        400, f"sequence {FRESH} to model 'lstm' {START_ERROR}", doc(FRESH, False),
        unopened=FRESH)),
    ("sequence-first-request-fails", lambda s, st: replace(bad_binary(
        400, "finite", FRESH + 1, True, NAN_X.tobytes(), 80), unopened=FRESH + 1)),
    ("sequence-batch-2", lambda s, st: x_as(
        s, st, np.concatenate([BAD_X, BAD_X]), 400, BATCH_ERROR)),
    ("sequence-start-without-id", lambda s, st: bad_json(
        400, "need a non-zero or non-empty 'sequence_id'",
        {"inputs": [x_tensor(BAD_X)], "parameters": {"sequence_start": True}})),
    ("sequence-end-with-id-0", lambda s, st: bad_json(
        400, "need a non-zero or non-empty 'sequence_id'",
        doc(0, False, params={"sequence_end": True}))),
    ("sequence-start-with-empty-id", lambda s, st: bad_json(
        400, "need a non-zero or non-empty 'sequence_id'", doc("", True))),
    ("sequence-start-not-bool", lambda s, st: bad_json(
        400, "Unable to parse 'sequence_start'", doc(s, 1))),
    ("sequence-id-negative", lambda s, st: bad_json(
        400, "Unable to parse 'sequence_id'", doc(-3, st))),
    ("sequence-id-float", lambda s, st: bad_json(
        400, "Unable to parse 'sequence_id'", doc(2.5, st))),
    ("sequence-id-bool", lambda s, st: bad_json(
        400, "Unable to parse 'sequence_id'", doc(True, st))),
    ("sequence-id-over-uint64", lambda s, st: bad_json(
        400, "Unable to parse 'sequence_id'", doc(2**64, st))),
    ("sequence-id-null", lambda s, st: bad_json(
        400, "Unable to parse 'sequence_id'", doc(None, st))),
    ("sequence-id-257-chars", lambda s, st: bad_json(
        400, "at most 256", doc("s" * 257, True))),
    ("unknown-model", lambda s, st: bad_json(
        404, "Request for unknown model: 'nope'", doc(s, st), path="/v2/models/nope/infer")),
    ("unknown-version", lambda s, st: bad_json(
        404, "version 2 is not found", doc(s, st), path="/v2/models/lstm/versions/2/infer")),
    ("body-over-max-body-bytes", lambda s, st: bad_json(
        413, "larger than this server's limit of 65536 bytes",
        doc(s, st, params={"pad": "a" * 70_000}))),
    ("too-many-steps", lambda s, st: x_as(
        s, st, rand(54, 1, 65, INPUT_SIZE), 413,
        "x has 65 time steps; this server takes at most 64")),
    ("batch-over-max-batch", lambda s, st: x_as(
        s, st, rand(55, 5, 2, INPUT_SIZE), 413, "x has batch 5; this server takes at most 4")),
    ("elements-over-max-elements", lambda s, st: bad_json(
        413, "= 240 elements", doc(0, False, inputs=[x_tensor(rand(56, 4, 60, INPUT_SIZE))]))),
    ("invalid-gzip", lambda s, st: bad_json(
        400, "not valid gzip data", b"this is not gzip", {"Content-Encoding": "gzip"})),
    ("truncated-gzip", lambda s, st: bad_json(
        400, "not complete gzip data", gzip.compress(as_bytes(doc(s, st)))[:100],
        {"Content-Encoding": "gzip"})),
    ("invalid-deflate", lambda s, st: bad_json(
        400, "not valid deflate data", b"this is not deflate", {"Content-Encoding": "deflate"})),
    ("gzip-inflates-over-the-limit", lambda s, st: bad_json(
        413, "inflates to more than this server's limit", INFLATES, {"Content-Encoding": "gzip"})),
    ("content-encoding-br", lambda s, st: bad_json(
        415, "unsupported Content-Encoding 'br'", doc(s, st), {"Content-Encoding": "br"})),
    ("content-type-text-plain", lambda s, st: bad_json(
        415, "not 'text/plain'", doc(s, st), {"Content-Type": "text/plain"})),
    ("content-type-form", lambda s, st: bad_json(
        415, "Content-Type", doc(s, st), {"Content-Type": "application/x-www-form-urlencoded"})),
    ("origin-header", lambda s, st: bad_json(
        403, "Origin: http://page.example", doc(s, st), {"Origin": "http://page.example"})),
    ("malformed-json", lambda s, st: bad_json(400, "not valid JSON", b'{"inputs": [')),
    ("not-an-object", lambda s, st: bad_json(400, "must be a JSON object, got a list", b"[]")),
    ("misspelt-inputs", lambda s, st: bad_json(400, "Unable to parse 'inputs'", {"input": []})),
    ("id-not-a-string", lambda s, st: bad_json(400, "Unable to parse 'id'", doc(s, st, id=7))),
    ("no-inputs", lambda s, st: bad_json(
        400, "expected 1 inputs but got 0", doc(s, st) | {"inputs": []})),
    ("input-twice", lambda s, st: bad_json(
        400, "input 'x' is given twice", doc(s, st, inputs=[x_tensor(BAD_X)] * 2))),
]
# fmt: on


def assert_refused(answer: Raw, bad: Bad) -> None:
    assert answer.status == bad.status, (answer.status, answer.body[:300])
    data = answer.json()
    assert list(data) == ["error"], data
    message = data["error"]
    assert isinstance(message, str) and message and "\n" not in message, message
    assert bad.fragment in message, message


@pytest.mark.parametrize("index,case", [pytest.param(i, b, id=n) for i, (n, b) in enumerate(BAD)])
def test_a_bad_request_is_refused_and_changes_nothing(stateful, index, case):
    client, name, reference = stateful.client(), stateful.name, stateful.reference
    # An open sequence (int ids and str ids alternate), then the bad request with its id
    # (with sequence_start on every other case: a restart wrongly run would show too).
    sequence_id = 10_000 + index if index % 2 else f"table-{index}"
    first, _ = infer(client, name, FIRST, sequence_id=sequence_id, sequence_start=True)
    bad = case(sequence_id, index % 2 == 0)
    answer = send(stateful.server.port, "POST", bad.path, bad.body, bad.headers)
    assert_refused(answer, bad)
    if bad.unopened is not None:
        error = refused(infer, client, name, NEXT, sequence_id=bad.unopened)
        assert error.status() == "400" and START_ERROR in error.message()
    # The sequence goes on as if the bad request had never come.
    rest, _ = infer(client, name, NEXT, sequence_id=sequence_id, sequence_end=True)
    check_sequence(reference, np.concatenate([FIRST, NEXT], axis=1), [3, 3], [first, rest])
    # And a stateless request right after is right.
    x = rand(57, 2, 3, INPUT_SIZE)
    got, _ = infer(client, name, x)
    reference.expect(x).check(got)


def test_bad_requests_through_tritonclient(stateful):
    """Refusals as a tritonclient user sees them: InferenceServerException with the status."""
    client, name = stateful.client(), stateful.name
    x = rand(58, 1, 3, INPUT_SIZE)
    tensor = httpclient.InferInput("x", [1, 3, 4], "FP32")
    tensor.set_data_from_numpy(x[:, :, :4])
    error = refused(client.infer, name, [tensor])
    assert error.status() == "400" and "unexpected shape for input 'x'" in error.message()
    tensor = httpclient.InferInput("x", [1, 3, 5], "FP64")
    tensor.set_data_from_numpy(x.astype(np.float64))
    error = refused(client.infer, name, [tensor])
    assert error.status() == "400" and "unexpected datatype FP64" in error.message()
    error = refused(infer, client, name, x, outputs=("q",))
    assert error.status() == "400" and "unexpected inference output 'q'" in error.message()
    error = refused(infer, client, name, np.concatenate([x, x]), sequence_id=3, sequence_start=True)
    assert error.status() == "400" and BATCH_ERROR in error.message()
    error = refused(infer, client, "nope", x)
    assert error.status() == "404"
    error = refused(infer, client, name, x, model_version="2")
    assert error.status() == "404"
    error = refused(infer, client, name, rand(59, 1, 65, INPUT_SIZE))
    assert error.status() == "413" and "65 time steps" in error.message()
    # Still serving right.
    got, _ = infer(client, name, x)
    stateful.reference.expect(x).check(got)


def test_the_logs_have_no_traceback_and_no_500(plain, stateful, batch_first):
    """After everything above (the bad-input table included): no traceback, no 500."""
    assert '"POST /v2/models/lstm/infer HTTP/1.1" 400' in stateful.server.log()
    for deployed in (plain, stateful, batch_first):
        assert_clean_log(deployed.server)


@pytest.mark.slow
@pytest.mark.parametrize(
    "length", ["\xb2", "\xb3", "\xbe"], ids=["superscript-2", "superscript-3", "three-quarters"]
)
def test_a_non_ascii_header_length_is_a_400(time_major_export, tmp_path, length):
    """Inference-Header-Content-Length must be ASCII digits. Latin-1 header bytes such as
    0xB2 (superscript two) are digits to str.isdigit() but not to int(): the answer must be
    the 400 "must be a byte count", not a 500 with a traceback. Its own server, so that a
    traceback here does not hide others in the shared server's log."""
    model, folder = time_major_export
    deployed = start(folder, tmp_path / "length.log", model)
    try:
        body, _ = binary_body(0, False, BAD_BYTES, 80)
        answer = send(
            deployed.server.port, "POST", "/v2/models/lstm/infer", body, {HEADER_LENGTH: length}
        )
        status, text = answer.status, answer.body[:300]
        log = deployed.server.log()
    finally:
        deployed.server.stop()
    assert status == 400, (status, text)
    assert f"{HEADER_LENGTH} must be a byte count" in json.loads(text)["error"]
    assert "Traceback" not in log, log[-2000:]


# --------------------------------------------------------------------------- 7. concurrency

CLIENTS, REQUESTS = 16, 25


@pytest.mark.slow
def test_concurrent_clients_half_of_them_in_sequences(stateful):
    name, reference = stateful.name, stateful.reference
    plans = []  # per client: its requests, each (x, flags) and what to check after them
    for k in range(CLIENTS):
        rng = np.random.default_rng(1000 + k)
        if k % 2 == 0:  # a sequence client: 5 sequences of 5 chunks under one id of its own
            sequence_id = 50_000 + k if k % 4 == 0 else f"client-{k}"
            sequences = []
            for _ in range(REQUESTS // 5):
                sizes = [int(s) for s in rng.integers(1, 5, size=5)]
                x = rng.standard_normal((1, sum(sizes), INPUT_SIZE), dtype=np.float32)
                sequences.append((x, sizes, reference.expect(x)))
            plans.append(("sequence", sequence_id, sequences))
        else:
            requests = []
            for _ in range(REQUESTS):
                batch, steps = int(rng.integers(1, 4)), int(rng.integers(1, 9))
                x = rng.standard_normal((batch, steps, INPUT_SIZE), dtype=np.float32)
                requests.append((x, reference.expect(x)))
            plans.append(("stateless", None, requests))

    barrier = threading.Barrier(CLIENTS)
    answered = '"POST /v2/models/lstm/infer HTTP/1.1" 200'
    before = stateful.server.log().count(answered)

    def run(k: int) -> int:
        kind, sequence_id, work = plans[k]
        client = httpclient.InferenceServerClient(
            f"{LOOPBACK}:{stateful.server.port}", network_timeout=TIMEOUT
        )
        done = 0
        try:
            barrier.wait(timeout=TIMEOUT)
            if kind == "stateless":
                for i, (x, expected) in enumerate(work):
                    got, _ = infer(client, name, x, binary_in=i % 2 == 0, binary_out=i % 3 > 0)
                    expected.check(got)
                    done += 1
            else:
                for x, sizes, expected in work:
                    answers = run_sequence(client, name, x, sizes, sequence_id)
                    y = np.concatenate([a["y"] for a in answers], axis=1)
                    expected.check({"y": y, "hn": answers[-1]["hn"], "cn": answers[-1]["cn"]})
                    done += len(sizes)
        finally:
            client.close()
        return done

    with ThreadPoolExecutor(CLIENTS) as pool:
        counts = list(pool.map(run, range(CLIENTS)))
    assert counts == [REQUESTS] * CLIENTS
    time.sleep(0.2)  # the access log's last lines
    assert stateful.server.log().count(answered) - before == CLIENTS * REQUESTS
    # Every sequence was ended: the ids are free again, and need a start.
    error = refused(infer, stateful.client(), name, FIRST, sequence_id="client-2")
    assert error.status() == "400" and START_ERROR in error.message()


@pytest.mark.slow
def test_concurrent_chunks_of_one_sequence_run_one_at_a_time(stateful):
    """Eight equal chunks sent to one open sequence at once: each must run on the state the
    one before it left, so their answers are exactly the 1st..8th applications of the chunk
    to the sequence, one each, whatever order they arrived in; none lost, none run twice."""
    name, reference, parallel = stateful.name, stateful.reference, 8
    first, chunk = rand(71, 1, 3, INPUT_SIZE), rand(72, 1, 2, INPUT_SIZE)
    whole = np.concatenate([first, *[chunk] * parallel, chunk], axis=1)
    expected = reference.expect(whole)
    starts = [3 + 2 * k for k in range(parallel)]  # where the k-th application's y begins
    sequence_id = "one-at-a-time"
    infer(stateful.client(), name, first, sequence_id=sequence_id, sequence_start=True)
    clients = [stateful.client() for _ in range(parallel)]
    barrier = threading.Barrier(parallel)

    def step(client) -> np.ndarray:
        barrier.wait(timeout=TIMEOUT)
        got, _ = infer(client, name, chunk, sequence_id=sequence_id, outputs=("y",))
        return got["y"]

    with ThreadPoolExecutor(parallel) as pool:
        answers = list(pool.map(step, clients))
    allowed = expected.allowed["y"]
    applied = []
    for y in answers:
        errors = [float(np.max(np.abs(y - expected.want["y"][:, a : a + 2]))) for a in starts]
        matches = [k for k, error in enumerate(errors) if error <= allowed]
        assert len(matches) == 1, f"an answer matches applications {matches}: {errors}"
        applied.append(matches[0])
    assert sorted(applied) == list(range(parallel))
    # The sequence went on from the last of them: its next (final) chunk is the whole run's.
    got, _ = infer(stateful.client(), name, chunk, sequence_id=sequence_id, sequence_end=True)
    tail = {k: v for k, v in expected.want.items()}
    tail["y"] = expected.want["y"][:, -2:]
    Expected(tail, expected.allowed).check(got)


# --------------------------------------------------------------------------- 8. bidirectional


@pytest.mark.slow
def test_a_bidirectional_export_serves_stateless_requests_only(tmp_path):
    config = LSTMConfig(INPUT_SIZE, HIDDEN, LAYERS, True, bidirectional=True)
    model = build_model(config, seed=9)
    folder = export(model, tmp_path / "lstm").out_dir
    deployed = start(folder, tmp_path / "bidi.log", model, flags=("--expose-state",))
    try:
        client = deployed.client()
        metadata = client.get_model_metadata("lstm")
        shapes = {o["name"]: o["shape"] for o in metadata["outputs"]}
        assert shapes == {
            "y": [-1, -1, 2 * HIDDEN],
            "hn": [-1, 2 * LAYERS, HIDDEN],
            "cn": [-1, 2 * LAYERS, HIDDEN],
        }
        assert metadata["inputs"][0]["shape"] == [-1, -1, INPUT_SIZE]
        x = rand(61, 3, 6, INPUT_SIZE)
        for binary in (True, False):
            got, _ = infer(client, "lstm", x, binary_in=binary, binary_out=binary)
            deployed.reference.expect(x).check(got)
        for sequence_start in (True, False):
            error = refused(
                infer, client, "lstm", x[:1], sequence_id=1, sequence_start=sequence_start
            )
            assert error.status() == "400" and "sequences are refused" in error.message()
        got, _ = infer(client, "lstm", x)  # still serving
        deployed.reference.expect(x).check(got)
    finally:
        stop(deployed)


# --------------------------------------------------------------------------- 9. TTL and cap


def sequence_request(sid, x: np.ndarray, **flags) -> dict:
    """A JSON infer request of x on sequence `sid`, asking for y as JSON."""
    parameters = {"sequence_id": sid, **flags}
    return {"inputs": [x_tensor(x)], "outputs": [{"name": "y"}], "parameters": parameters}


@pytest.mark.slow
def test_requests_of_a_sequence_run_in_the_order_they_arrived(time_major_export, tmp_path):
    """A continuation whose body takes long to read (gzip inflating to 7 MB of JSON) sent
    before a short end of the same sequence: the end must wait for it, though its own body
    is read first (a request is parsed before its sequence is known)."""
    model, folder = time_major_export
    deployed = start(folder, tmp_path / "order.log", model, max_body_bytes=8 << 20)
    try:
        port, sid = deployed.server.port, 4242
        first, slow_x, last = rand(81, 1, 3, INPUT_SIZE), rand(82, 1, 2, INPUT_SIZE), FIRST
        expected = deployed.reference.expect(np.concatenate([first, slow_x, last], axis=1))
        opened = send(
            port,
            "POST",
            "/v2/models/lstm/infer",
            as_bytes(sequence_request(sid, first, sequence_start=True)),
        )
        assert opened.status == 200, opened.body
        padded = json.dumps(sequence_request(sid, slow_x)).replace(", ", "," + " " * 7_000_000, 1)
        slow_body = gzip.compress(padded.encode())
        answers: dict[str, Raw] = {}

        def post(which: str, body: bytes, headers: dict) -> None:
            answers[which] = send(port, "POST", "/v2/models/lstm/infer", body, headers)

        slow = threading.Thread(target=post, args=("slow", slow_body, {"Content-Encoding": "gzip"}))
        slow.start()
        time.sleep(0.005)  # its small body is all sent by now; its parsing is not done
        post("end", as_bytes(sequence_request(sid, last, sequence_end=True)), {})
        slow.join(TIMEOUT)
        assert answers["slow"].status == 200, answers["slow"].body
        assert answers["end"].status == 200, answers["end"].body
        got = {
            "y": np.concatenate(
                [
                    np.asarray(answers[k].json()["outputs"][0]["data"], np.float32).reshape(
                        1, -1, HIDDEN
                    )
                    for k in ("slow", "end")
                ],
                axis=1,
            )
        }
        tail = {"y": expected.want["y"][:, 3:]}
        Expected(tail, expected.allowed).check(got, names=("y",))
    finally:
        stop(deployed)


@pytest.mark.slow
def test_an_answer_over_the_budget_is_refused_before_the_sequence_moves(
    time_major_export, tmp_path
):
    """The answer's bytes are reserved before a sequence's state changes: a start whose
    answer could not fit in --max-bytes-in-flight is a 413 that opens nothing, and a
    continuation refused so leaves the sequence where it was."""
    model, folder = time_major_export
    limits = {"max_body_bytes": 90_000, "max_bytes_in_flight": 100_000}
    limits |= {"max_seq_len": 4096, "max_elements": 8192}
    deployed = start(folder, tmp_path / "budget.log", model, **limits)
    try:
        port, sid = deployed.server.port, "budget"
        big = np.zeros((1, 3000, INPUT_SIZE), np.float32)  # a short body, a long answer
        path = "/v2/models/lstm/infer"
        refused_start = send(
            port, "POST", path, as_bytes(sequence_request(sid, big, sequence_start=True))
        )
        assert refused_start.status == 413, refused_start.body
        assert "bytes in flight" in refused_start.json()["error"]
        after = send(port, "POST", path, as_bytes(sequence_request(sid, FIRST)))
        assert after.status == 400 and START_ERROR in after.json()["error"]
        # An open sequence: a refused continuation, then the next chunk as if it never came.
        expected = deployed.reference.expect(np.concatenate([FIRST, NEXT], axis=1))
        opened = send(
            port, "POST", path, as_bytes(sequence_request(sid, FIRST, sequence_start=True))
        )
        assert opened.status == 200, opened.body
        again = send(port, "POST", path, as_bytes(sequence_request(sid, big, sequence_end=True)))
        assert again.status == 413, again.body
        going_on = send(port, "POST", path, as_bytes(sequence_request(sid, NEXT)))
        assert going_on.status == 200, going_on.body
        y = np.asarray(going_on.json()["outputs"][0]["data"], np.float32).reshape(1, -1, HIDDEN)
        tail = {"y": expected.want["y"][:, FIRST.shape[1] :]}
        Expected(tail, expected.allowed).check({"y": y}, names=("y",))
    finally:
        stop(deployed)


@pytest.mark.slow
def test_sequences_expire_after_the_ttl_and_count_against_the_cap(time_major_export, tmp_path):
    model, folder = time_major_export
    deployed = start(
        folder,
        tmp_path / "ttl.log",
        model,
        flags=("--expose-state",),
        stream_ttl=0.6,
        max_streams=2,
    )
    try:
        client, port = deployed.client(), deployed.server.port
        a, b, c = rand(71, 1, 6, INPUT_SIZE), rand(72, 1, 6, INPUT_SIZE), rand(73, 1, 2, INPUT_SIZE)
        # A /v1 stream and a /v2 sequence fill the cap of 2 together.
        stream = send(
            port,
            "POST",
            "/v1/streams",
            as_bytes({"batch": 1}),
            {"Content-Type": "application/json"},
        )
        assert stream.status == 201, stream.body
        first_a, _ = infer(client, "lstm", a[:, :2], sequence_id=1, sequence_start=True)
        error = refused(infer, client, "lstm", b[:, :2], sequence_id="b", sequence_start=True)
        assert error.status() == "429" and "too many open streams (limit 2)" in error.message()
        assert send(port, "DELETE", stream.json()["url"]).status == 200
        first_b, _ = infer(client, "lstm", b[:, :2], sequence_id="b", sequence_start=True)
        # At the cap: a third sequence is refused, with Retry-After, and opens nothing.
        body = as_bytes(
            {"inputs": [x_tensor(c)], "parameters": {"sequence_id": 3, "sequence_start": True}}
        )
        full = send(port, "POST", "/v2/models/lstm/infer", body)
        assert full.status == 429 and "too many open streams" in full.json()["error"]
        assert full.headers.get("retry-after") == "1"
        error = refused(infer, client, "lstm", c, sequence_id=3)
        assert error.status() == "400" and START_ERROR in error.message()
        stream = send(port, "POST", "/v1/streams", b"", {"Content-Type": "application/json"})
        assert stream.status == 429 and "too many open streams" in stream.json()["error"]
        # b is kept busy; a is left idle past the TTL.
        time.sleep(0.4)
        second_b, _ = infer(client, "lstm", b[:, 2:4], sequence_id="b")
        time.sleep(0.3)  # a: idle over 0.7 s; b: 0.3 s, and the two requests below
        # a's expiry frees its place, untouched since: a new sequence starts (from zeros).
        got, _ = infer(client, "lstm", c, sequence_id=3, sequence_start=True, sequence_end=True)
        deployed.reference.expect(c).check(got)
        # a is gone: its next request without a start is refused.
        error = refused(infer, client, "lstm", a[:, 2:], sequence_id=1)
        assert error.status() == "400" and START_ERROR in error.message()
        # b, busy, lived on.
        last_b, _ = infer(client, "lstm", b[:, 4:], sequence_id="b", sequence_end=True)
        check_sequence(deployed.reference, b, [2, 2, 2], [first_b, second_b, last_b])
        deployed.reference.expect(np.ascontiguousarray(a[:, :2])).check(first_a)
    finally:
        stop(deployed)


# --------------------------------------------------------------------------- 10. compression


@pytest.mark.parametrize("request_compression", [None, "gzip", "deflate"])
@pytest.mark.parametrize("response_compression", [None, "gzip", "deflate"])
def test_compressed_requests_and_answers_give_the_same_numbers(
    stateful, request_compression, response_compression
):
    client, name = stateful.client(), stateful.name
    x = rand(81, 2, 9, INPUT_SIZE)
    plain_answer, _ = infer(client, name, x)
    stateful.reference.expect(x).check(plain_answer)
    for binary in (True, False):
        got, _ = infer(
            client,
            name,
            x,
            binary_in=binary,
            binary_out=binary,
            request_compression_algorithm=request_compression,
            response_compression_algorithm=response_compression,
        )
        for output in ("y", "hn", "cn"):
            np.testing.assert_array_equal(got[output], plain_answer[output])


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_the_answer_is_compressed_when_asked(stateful, encoding):
    x = rand(82, 1, 4, INPUT_SIZE)
    body = as_bytes({"inputs": [x_tensor(x)], "outputs": [{"name": "y"}]})
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    answer = send(
        stateful.server.port,
        "POST",
        f"/v2/models/{stateful.name}/infer",
        packed,
        {"Content-Encoding": encoding, "Accept-Encoding": encoding},
    )
    assert answer.status == 200
    assert answer.headers.get("content-encoding") == encoding
    text = gzip.decompress(answer.body) if encoding == "gzip" else zlib.decompress(answer.body)
    (y,) = json.loads(text)["outputs"]
    got = {"y": np.asarray(y["data"], np.float32).reshape(y["shape"])}
    stateful.reference.expect(x).check(got, ("y",))
    assert math.prod(y["shape"]) == 4 * HIDDEN


# --------------------------------------------------------------------------- failures mid-queue


def test_a_sequence_whose_step_fails_is_left_as_it_was(time_major_export, monkeypatch):
    """In process, the step itself made to fail (the one failure no check before the queue
    can catch): a first request that fails opens nothing, and a request queued behind it is
    told to start; a failed end leaves the sequence open and going on from where it was."""
    from lstm_export.serving.http import create_app
    from lstm_export.serving.http.limits import HTTPError

    model, folder = time_major_export
    app = create_app(folder)
    inference = app.state.inference
    run_step = inference.run_step
    failing = {"left": 0}

    def flaky_step(entry, x, start):
        if failing["left"]:
            failing["left"] -= 1
            time.sleep(0.2)  # long enough for the next request to queue behind it
            raise RuntimeError("the step failed")
        return run_step(entry, x, start)

    monkeypatch.setattr(inference, "run_step", flaky_step)

    def body(x: np.ndarray, **flags) -> bytes:
        return as_bytes(sequence_request("flaky", x, **flags))

    async def both(first: bytes, second: bytes) -> list:
        one = asyncio.ensure_future(inference.infer(first, None, None))
        await asyncio.sleep(0.05)
        two = asyncio.ensure_future(inference.infer(second, None, None))
        return await asyncio.gather(one, two, return_exceptions=True)

    loop = asyncio.new_event_loop()
    try:
        failing["left"] = 1
        opened, queued = loop.run_until_complete(both(body(FIRST, sequence_start=True), body(NEXT)))
        assert isinstance(opened, RuntimeError), opened
        assert isinstance(queued, HTTPError) and queued.status == 400, queued
        assert START_ERROR in queued.message
        assert len(inference.service.store) == 0  # nothing opened
        # An open sequence whose end fails goes on from where it was.
        expected = Reference(model).expect(np.concatenate([FIRST, NEXT], axis=1))
        loop.run_until_complete(inference.infer(body(FIRST, sequence_start=True), None, None))
        failing["left"] = 1
        with pytest.raises(RuntimeError):
            loop.run_until_complete(inference.infer(body(BAD_X, sequence_end=True), None, None))
        answer, _, _ = loop.run_until_complete(inference.infer(body(NEXT), None, None))
        y = np.asarray(json.loads(answer)["outputs"][0]["data"], np.float32)
        tail = {"y": expected.want["y"][:, FIRST.shape[1] :]}
        Expected(tail, expected.allowed).check({"y": y.reshape(1, -1, HIDDEN)}, names=("y",))
        assert inference.service.load.bytes == 0  # every reservation handed back
    finally:
        inference.service.pool.shutdown()
        loop.close()
