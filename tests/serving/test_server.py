"""The HTTP server, run for real: a subprocess on a free loopback port, driven over HTTP.

Only 127.0.0.1 is ever contacted. Every request has a socket timeout, every loop a fixed
count, and every server is stopped by the test that started it. The tests that start a
server (or run long) are marked slow. One module of ~1,400 lines because most tests share
one server process (the module-scoped `server` fixture) and the helpers that drive it;
`serve-bench`'s tests are in tests/benchmarks/test_load.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from helpers import run_python
from lstm_export.checkpoints import build_model
from lstm_export.config import LSTMConfig
from lstm_export.errors import UsageError
from lstm_export.pipeline import export
from lstm_export.serving.http import ServerLimits, cpu_count, create_app, serve
from server_process import (
    LIMITS,
    LOOPBACK,
    TIMEOUT,
    Client,
    Exported,
    Reply,
    Server,
    file_limit,
    running_server,
    small_export,
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Exported:
    return small_export(tmp_path_factory.mktemp("serve") / "lstm")


def eager(model, x, state=None):
    with torch.no_grad():
        torch_state = None if state is None else tuple(torch.from_numpy(s) for s in state)
        y, (h, c) = model(torch.from_numpy(x), torch_state)
    return y.numpy(), h.numpy(), c.numpy()


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    with running_server(exported.folder, tmp_path_factory.mktemp("log") / "server.log") as running:
        yield running


@pytest.fixture
def client(server):
    connection = Client(server.port)
    yield connection
    connection.close()


def arrays(reply: Reply, *keys: str) -> list[np.ndarray]:
    assert reply.status == 200, reply.data
    return [np.asarray(reply.data[k], dtype=np.float32) for k in keys]


def assert_close(got, want, atol=1e-5) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=atol, rtol=0)


def assert_predict_works(client: Client, exported: Exported, seed: int = 0) -> None:
    x = np.random.default_rng(seed).standard_normal((3, 2, 5), dtype=np.float32)
    y, h, c = arrays(client.predict(x), "y", "hn", "cn")
    assert_close((y, h, c), eager(exported.model, x))


def assert_fresh_client_predicts(server, exported: Exported) -> None:
    """A new connection gets correct answers: a refused request disturbed nothing."""
    after = Client(server.port)
    try:
        assert_predict_works(after, exported)
    finally:
        after.close()


# --------------------------------------------------------------------------- parity


@pytest.mark.slow
def test_health_and_model_describe_the_export(client, exported):
    health = client.call("GET", "/healthz")
    assert health.status == 200 and health.data["status"] == "ok"
    info = client.call("GET", "/v1/model")
    assert info.status == 200
    manifest = json.loads((exported.folder / "manifest.json").read_text())
    assert info.data["config"] == manifest["config"] == exported.runtime.config.to_dict()
    assert info.data["signature"] == manifest["signature"]
    assert info.data["name"] == "lstm"
    for name in ("model.onnx", "model.pt"):
        digest = hashlib.sha256((exported.folder / name).read_bytes()).hexdigest()
        assert info.data["artifacts"][name]["sha256"] == digest
    assert info.data["limits"] == LIMITS


@pytest.mark.slow
@pytest.mark.parametrize("seq,batch", [(1, 1), (7, 3), (64, 3), (50, 4), (20, 1)])
def test_predict_matches_runtime_and_eager(client, exported, seq, batch):
    rng = np.random.default_rng(seq * 10 + batch)
    x = rng.standard_normal((seq, batch, 5), dtype=np.float32)
    state = tuple(rng.standard_normal((2, 2, batch, 8), dtype=np.float32))
    for s in (None, state):
        got = arrays(client.predict(x, s), "y", "hn", "cn")
        y, (h, c) = exported.runtime.run(x, s)
        assert_close(got, (y, h, c), atol=1e-6)
        assert_close(got, eager(exported.model, x, s))


@pytest.mark.slow
def test_a_keep_alive_connection_survives_a_pause_longer_than_uvicorns_default(client):
    # A client that thinks for a while between two requests on one connection (uvicorn's
    # default keep-alive is 5 s): its next request must not die mid-send.
    assert client.call("GET", "/healthz").status == 200
    time.sleep(6)
    x = np.zeros((50, 4, 5), dtype=np.float32)  # a body of several TCP segments
    assert client.predict(x).status == 200


@pytest.mark.slow
def test_json_integers_are_numbers(client, exported):
    x = np.arange(30, dtype=np.float32).reshape(3, 2, 5) % 4 - 2
    reply = client.call("POST", "/v1/predict", {"x": x.astype(int).tolist()})
    assert_close(arrays(reply, "y"), [exported.runtime.run(x)[0]], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("start", ["empty", "batch", "state"])
def test_stream_chunks_equal_one_whole_run(client, exported, start):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((23, 2, 5), dtype=np.float32)
    state = tuple(rng.standard_normal((2, 2, 2, 8), dtype=np.float32)) if start == "state" else None
    body = {"empty": None, "batch": {"batch": 2}, "state": None}[start]
    if state is not None:
        body = {"h0": state[0].tolist(), "c0": state[1].tolist()}
    created = client.call("POST", "/v1/streams", body)
    assert created.status == 201, created.data
    assert created.data["batch"] == (None if start == "empty" else 2)
    assert created.headers["location"] == created.data["url"]
    url = created.data["url"]
    ys, steps = [], []
    for a, b in ((0, 1), (1, 9), (9, 10), (10, 23)):
        reply = client.call("POST", f"{url}/step", {"x": x[a:b].tolist()})
        ys.append(arrays(reply, "y")[0])
        steps.append(reply.data["steps"])
    assert steps == [1, 9, 10, 23]
    last_h, last_c = arrays(reply, "hn", "cn")
    whole_y, (whole_h, whole_c) = exported.runtime.run(x, state)
    assert_close((np.concatenate(ys), last_h, last_c), (whole_y, whole_h, whole_c), atol=1e-6)
    assert_close((np.concatenate(ys), last_h, last_c), eager(exported.model, x, state))
    info = client.call("GET", url)
    assert info.status == 200 and info.data["steps"] == 23 and info.data["batch"] == 2
    deleted = client.call("DELETE", url)
    assert deleted.status == 200 and deleted.data == {"deleted": created.data["id"], "steps": 23}
    gone = client.call("POST", f"{url}/step", {"x": x[:1].tolist()})
    assert gone.status == 404 and "no open stream" in gone.data["error"]


# --------------------------------------------------------------------------- bad input

X = np.zeros((2, 1, 5)).tolist()
STATE_2 = np.zeros((2, 2, 8)).tolist()  # batch 2: wrong for X
STATE_1 = np.zeros((2, 1, 8)).tolist()


def js(data: object) -> bytes:
    return json.dumps(data).encode()


def js_as(data: object, encoding: str) -> bytes:
    """JSON in another encoding than UTF-8: json.loads(bytes) would read it."""
    return json.dumps(data).encode(encoding)


# A boolean in x, in encodings where the bytes b"true" never occur (json.loads reads both).
UTF16_TRUE = js_as({"x": [[[0, 0, 0, 0, True]]]}, "utf-16")
UTF16LE_TRUE = js_as({"x": [[[0, 0, 0, 0, True]]]}, "utf-16-le")
assert json.loads(UTF16_TRUE) == json.loads(UTF16LE_TRUE) and b"true" not in UTF16_TRUE


# (id, method, path, raw body, status, message); {stream} is a live stream of batch 2.
BAD = [
    ("malformed", "POST", "/v1/predict", b'{"x": [[[1,', 400, "not valid JSON"),
    ("empty body", "POST", "/v1/predict", b"", 400, "request body is empty"),
    ("not an object", "POST", "/v1/predict", b"[1, 2]", 400, "JSON object, got a list"),
    ("bad utf-8", "POST", "/v1/predict", b'{"x": "\xff\xfe"}', 400, "not valid JSON"),
    ("too deep", "POST", "/v1/predict", b"[" * 20000 + b"]" * 20000, 400, "nested too deeply"),
    ("missing x", "POST", "/v1/predict", b"{}", 400, "missing key 'x'"),
    ("unknown key", "POST", "/v1/predict", js({"x": X, "y": 1}), 400, "unknown key(s) ['y']"),
    ("x a number", "POST", "/v1/predict", js({"x": 3}), 400, "nested list of numbers, got a num"),
    ("x a string", "POST", "/v1/predict", js({"x": "1,2"}), 400, "numbers, got a string"),
    ("rank", "POST", "/v1/predict", js({"x": [[1, 2, 3, 4, 5]]}), 400, "5], got [1, 5]"),
    ("features", "POST", "/v1/predict", js({"x": [[[1, 2, 3, 4]]]}), 400, "=5], got [1, 1, 4]"),
    ("empty x", "POST", "/v1/predict", js({"x": []}), 400, "got [0]"),
    ("ragged", "POST", "/v1/predict", js({"x": [[[0] * 5], [[0] * 4]]}), 400, "rectangular"),
    ("strings", "POST", "/v1/predict", js({"x": [[["a"] * 5]]}), 400, "found strings"),
    ("null", "POST", "/v1/predict", js({"x": [[[0, 0, 0, 0, None]]]}), 400, "found null"),
    ("boolean", "POST", "/v1/predict", js({"x": [[[0, 0, 0, 0, True]]]}), 400, "true or false"),
    ("utf-16", "POST", "/v1/predict", UTF16_TRUE, 400, "must be UTF-8"),
    ("utf-16-le", "POST", "/v1/predict", UTF16LE_TRUE, 400, "not valid JSON"),
    ("utf-32", "POST", "/v1/predict", js_as({"x": X}, "utf-32"), 400, "must be UTF-8"),
    ("NaN", "POST", "/v1/predict", b'{"x": [[[0, 0, 0, 0, NaN]]]}', 400, "holds NaN"),
    ("-Infinity", "POST", "/v1/predict", b'{"x": [[[0, 0, 0, 0, -Infinity]]]}', 400, "-Inf"),
    ("1e999", "POST", "/v1/predict", b'{"x": [[[0, 0, 0, 0, 1e999]]]}', 400, "only finite"),
    ("float32 overflow", "POST", "/v1/predict", js({"x": [[[0, 0, 0, 0, 1e39]]]}), 400, "finite"),
    ("h0 alone", "POST", "/v1/predict", js({"x": X, "h0": STATE_1}), 400, "send both or neither"),
    (
        "state batch",
        "POST",
        "/v1/predict",
        js({"x": X, "h0": STATE_2, "c0": STATE_2}),
        400,
        "h0 must have shape [num_layers=2, batch=1, hidden_size=8], got [2, 2, 8]",
    ),
    (
        "non-finite c0",
        "POST",
        "/v1/predict",
        js({"x": X, "h0": STATE_1, "c0": [[[1e300] * 8]] * 2}),
        400,
        "c0 must hold only finite numbers",
    ),
    ("seq over limit", "POST", "/v1/predict", js({"x": [[[0] * 5]] * 65}), 413, "at most 64"),
    ("batch over limit", "POST", "/v1/predict", js({"x": [[[0] * 5] * 5]}), 413, "at most 4"),
    (
        "elements over limit",
        "POST",
        "/v1/predict",
        js({"x": [[[0] * 5] * 4] * 51}),
        413,
        "x has 51 steps x batch 4 = 204 elements; this server takes at most 200",
    ),
    (
        "body over limit",
        "POST",
        "/v1/predict",
        b'{"x": ' + b" " * (64 * 1024) + b"[]}",
        413,
        "larger than this server's limit of 65536 bytes",
    ),
    ("stream batch 0", "POST", "/v1/streams", js({"batch": 0}), 400, ">= 1, got 0"),
    ("stream batch 1.5", "POST", "/v1/streams", js({"batch": 1.5}), 400, ">= 1, got 1.5"),
    ("stream batch over", "POST", "/v1/streams", js({"batch": 5}), 413, "at most 4"),
    ("stream unknown key", "POST", "/v1/streams", js({"size": 2}), 400, "unknown key(s)"),
    (
        "stream state mismatch",
        "POST",
        "/v1/streams",
        js({"batch": 1, "h0": STATE_2, "c0": STATE_2}),
        400,
        "batch=1",
    ),
    ("chunk batch", "POST", "{stream}/step", js({"x": X}), 400, "stream has batch 2, but"),
    ("chunk junk", "POST", "{stream}/step", b"x=1", 400, "not valid JSON"),
    ("chunk no x", "POST", "{stream}/step", js({"h0": STATE_2}), 400, "unknown key(s) ['h0']"),
    ("unknown stream", "POST", "/v1/streams/nope/step", js({"x": X}), 404, "no open stream"),
    ("unknown stream get", "GET", "/v1/streams/nope", None, 404, "no open stream 'nope'"),
    ("unknown stream delete", "DELETE", "/v1/streams/nope", None, 404, "no open stream"),
    ("unknown route", "GET", "/v2/predict", None, 404, "no route /v2/predict"),
    ("trailing slash", "GET", "/healthz/", None, 404, "no route /healthz/"),
    ("trailing slash step", "POST", "{stream}/step/", js({"x": X}), 404, "no route /v1/streams/"),
    ("wrong method", "GET", "/v1/predict", None, 405, "GET is not allowed on /v1/predict"),
    ("wrong method streams", "PUT", "/v1/streams", js({}), 405, "allowed: POST"),
]


@pytest.fixture(scope="module")
def live_stream(server):
    client = Client(server.port)
    created = client.call("POST", "/v1/streams", {"batch": 2})
    client.close()
    assert created.status == 201
    return created.data["url"]


BAD_IDS = [b[0] for b in BAD]


@pytest.mark.slow
@pytest.mark.parametrize("method,path,raw,status,message", [b[1:] for b in BAD], ids=BAD_IDS)
def test_bad_input_gets_its_status_and_reason(
    server, exported, live_stream, method, path, raw, status, message
):
    client = Client(server.port)
    try:
        reply = client.call(method, path.format(stream=live_stream), raw=raw)
        assert reply.status == status, reply.data
        assert list(reply.data) == ["error"] and message in reply.data["error"], reply.data
    finally:
        client.close()
    assert_fresh_client_predicts(server, exported)  # a new connection: a 413 may close the old


def test_bad_table_covers_at_least_ten_kinds():
    assert len(BAD_IDS) == len(set(BAD_IDS)) >= 10
    assert {b[4] for b in BAD} == {400, 404, 405, 413}
    assert len(CONTENT_TYPES_REFUSED) >= 5


@pytest.mark.slow
def test_bad_chunks_leave_their_stream_and_others_intact(server, exported):
    rng = np.random.default_rng(11)
    xa, xb = (rng.standard_normal((9, 2, 5), dtype=np.float32) for _ in range(2))
    client = Client(server.port)
    try:
        urls = [client.call("POST", "/v1/streams", {"batch": 2}).data["url"] for _ in range(2)]
        firsts = [
            arrays(client.call("POST", f"{u}/step", {"x": x[:4].tolist()}), "y")[0]
            for u, x in zip(urls, (xa, xb), strict=True)
        ]
        bad_chunks = [raw for _, _, path, raw, _, _ in BAD if path == "/v1/predict"]
        for raw in bad_chunks:
            fresh = Client(server.port)  # a 413 may close the connection
            reply = fresh.call("POST", f"{urls[0]}/step", raw=raw)
            fresh.close()
            assert reply.status in (400, 413), reply.data
        info = client.call("GET", urls[0])
        assert info.data["steps"] == 4
        for url, x, first in zip(urls, (xa, xb), firsts, strict=True):
            reply = client.call("POST", f"{url}/step", {"x": x[4:].tolist()})
            y_rest, h, c = arrays(reply, "y", "hn", "cn")
            got = (np.concatenate([first, y_rest]), h, c)
            assert_close(got, eager(exported.model, x))
            assert client.call("DELETE", url).status == 200
    finally:
        client.close()


CONTENT_TYPES_REFUSED = [
    "text/plain",
    "text/plain; charset=utf-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/jsonp",
    "application/json; charset=utf-16",
    None,  # no Content-Type at all, but a body
]


@pytest.mark.slow
@pytest.mark.parametrize("content_type", CONTENT_TYPES_REFUSED, ids=str)
def test_a_body_must_be_sent_as_application_json(server, exported, live_stream, content_type):
    # A web page can POST text/plain or a form to 127.0.0.1 without a CORS preflight, but not
    # application/json: refusing the rest keeps other sites' pages from driving the server.
    headers = {} if content_type is None else {"Content-Type": content_type}
    body = js({"x": np.zeros((1, 2, 5)).tolist()})
    client = Client(server.port)
    try:
        steps = client.call("GET", live_stream).data["steps"]
        for path in ("/v1/predict", "/v1/streams", f"{live_stream}/step"):
            payload = js({"batch": 1}) if path == "/v1/streams" else body
            reply = client.call("POST", path, raw=payload, headers=headers)
            assert reply.status == 415, (path, reply.data)
            assert list(reply.data) == ["error"], reply.data
            assert "Content-Type: application/json" in reply.data["error"], reply.data
        assert client.call("GET", live_stream).data["steps"] == steps  # the chunk was not run
        if content_type is not None:  # an empty form POST creates no stream either
            reply = client.call("POST", "/v1/streams", raw=b"", headers=headers)
            assert reply.status == 415, reply.data
    finally:
        client.close()
    assert_fresh_client_predicts(server, exported)


@pytest.mark.slow
@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://127.0.0.1:8000"])
def test_requests_from_web_pages_change_nothing(server, exported, live_stream, origin):
    # Even an empty POST (no Content-Type needed) from a page must not open or step streams.
    client = Client(server.port)
    try:
        opened = client.call("GET", "/healthz").data["streams"]
        steps = client.call("GET", live_stream).data["steps"]
        body = js({"x": np.zeros((1, 2, 5)).tolist()})
        for method, path, payload in (
            ("POST", "/v1/streams", b""),
            ("POST", "/v1/predict", body),
            ("POST", f"{live_stream}/step", body),
            ("DELETE", live_stream, None),
        ):
            headers = {"Origin": origin}
            if payload:  # a well-formed request but for its Origin
                headers["Content-Type"] = "application/json"
            reply = client.call(method, path, raw=payload, headers=headers)
            assert reply.status == 403, (method, path, reply.data)
            assert "Origin" in reply.data["error"], reply.data
        assert client.call("GET", "/healthz").data["streams"] == opened
        assert client.call("GET", live_stream).data["steps"] == steps
        assert client.call("GET", "/healthz", headers={"Origin": origin}).status == 200
    finally:
        client.close()
    assert_fresh_client_predicts(server, exported)


@pytest.mark.slow
@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=UTF-8", "Application/JSON;"]
)
def test_application_json_with_or_without_charset_is_accepted(client, exported, content_type):
    x = np.ones((2, 1, 5), dtype=np.float32)
    reply = client.call(
        "POST", "/v1/predict", raw=js({"x": x.tolist()}), headers={"Content-Type": content_type}
    )
    assert_close(arrays(reply, "y"), [exported.runtime.run(x)[0]], atol=1e-6)
    created = client.call("POST", "/v1/streams", headers={})  # no body: no type needed
    assert created.status == 201, created.data
    assert client.call("DELETE", created.data["url"]).status == 200


@pytest.mark.slow
def test_max_elements_bounds_each_predict_and_each_chunk(server, exported):
    # seq x batch bounds the work and the answer of one request, not just each dimension.
    client = Client(server.port)
    try:
        limits = client.call("GET", "/v1/model").data["limits"]
        assert limits["max_elements"] == 200
        assert_predict_works(client, exported)
        url = client.call("POST", "/v1/streams", {"batch": 4}).data["url"]
        fits = np.zeros((50, 4, 5), dtype=np.float32)
        assert client.call("POST", f"{url}/step", {"x": fits.tolist()}).status == 200
        over = np.zeros((51, 4, 5), dtype=np.float32)
        for path in ("/v1/predict", f"{url}/step"):
            reply = client.call("POST", path, {"x": over.tolist()})
            assert reply.status == 413, reply.data
            assert "204 elements; this server takes at most 200" in reply.data["error"]
        assert client.call("GET", url).data["steps"] == 50  # the refused chunk changed nothing
        assert client.call("DELETE", url).status == 200
    finally:
        client.close()


@pytest.mark.slow
def test_bad_input_leaves_no_traceback_or_error_in_the_log(server):
    # Runs after the bad-input tests above: every refusal was an answer, never a crash.
    log = server.log()
    assert "http://127.0.0.1" in log  # the log is the server's
    assert "Traceback" not in log, log[-4000:]
    errors = [line for line in log.splitlines() if re.match(r"\s*(ERROR|CRITICAL)\b", line)]
    assert not errors, errors


def raw_exchange(port: int, head: bytes, body_parts: list[bytes]) -> tuple[int, dict]:
    """Send bytes on a raw socket and read the answer: status and JSON body."""
    with socket.create_connection((LOOPBACK, port), timeout=TIMEOUT) as sock:
        sock.sendall(head)
        for part in body_parts:
            sock.sendall(part)
        received = b""
        while b"\r\n\r\n" not in received or not received.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    status = int(received.split(b" ", 2)[1])
    return status, json.loads(received.split(b"\r\n\r\n", 1)[1])


@pytest.mark.slow
def test_body_limit_is_enforced_before_the_body_is_read(server, exported):
    # Content-Length over the limit: refused at once, although no byte of the body was sent.
    head = (
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 10000000\r\n\r\n"
    )
    status, data = raw_exchange(server.port, head, [])
    assert status == 413 and "limit of 65536 bytes" in data["error"]
    # Chunked, no Content-Length: refused once the bytes counted pass the limit.
    head = (
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b" " * 40000
    part = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    status, data = raw_exchange(server.port, head, [part, part])
    assert status == 413 and "limit of 65536 bytes" in data["error"]
    # Chunked and under the limit: fine.
    body = json.dumps({"x": X}).encode()
    small = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    status, data = raw_exchange(server.port, head, [small])
    assert status == 200 and np.asarray(data["y"]).shape == (2, 1, 8)
    client = Client(server.port)
    try:
        assert_predict_works(client, exported)
    finally:
        client.close()


# Requests uvicorn's parser (h11) refuses before the app sees them, and heads over 16 KiB.
MALFORMED = [
    ("garbage request line", b"HELLO\r\n\r\n", 400),
    ("no HTTP version", b"GET /healthz\r\n\r\n", 400),
    ("TLS hello", bytes.fromhex("16030100a5010000a10303") + b"\x00" * 40, 400),
    ("leading CRLF only", b"\r\n\r\n", 400),
    ("space in target", b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("non-ASCII target", b"GET /h\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("missing Host", b"GET /healthz HTTP/1.1\r\n\r\n", 400),
    ("two Hosts", b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("space before colon", b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    ("bad header name", b"GET /healthz HTTP/1.1\r\nHost: x\r\nBa(d: 1\r\n\r\n", 400),
    ("tab in header name", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX\tY: 1\r\n\r\n", 400),
    ("empty header name", b"GET /healthz HTTP/1.1\r\nHost: x\r\n: v\r\n\r\n", 400),
    ("NUL in a value", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", 400),
    ("header without colon", b"GET /healthz HTTP/1.1\r\nHost: x\r\nnocolon\r\n\r\n", 400),
    (
        "Content-Length abc",
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        400,
    ),
    (
        "Content-Length -1",
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        400,
    ),
    (
        "two Content-Lengths",
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        400,
    ),
    (
        "Transfer-Encoding gzip",
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        501,
    ),
    (
        "bad chunk size",
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
    ),
    (
        "head over 16 KiB",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
        431,
    ),
    ("path over 16 KiB", b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),
]


@pytest.mark.slow
@pytest.mark.parametrize("raw,status", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_http_is_answered_with_json(server, exported, raw, status):
    with socket.create_connection((LOOPBACK, server.port), timeout=TIMEOUT) as sock:
        sock.sendall(raw)
        answer = read_answer(sock)
    assert answer is not None, "closed without an answer"
    got, headers, data = answer
    assert (got, headers["content-type"]) == (status, "application/json"), answer
    assert list(data) == ["error"] and data["error"], data
    assert "bytearray" not in data["error"], data  # h11's quote of the raw bytes is cut
    assert headers["connection"] == "close"
    assert_fresh_client_predicts(server, exported)


def read_answer(sock: socket.socket, wait: float = TIMEOUT) -> tuple[int, dict, dict] | None:
    """One JSON answer off a raw socket: (status, lower-case headers, body), or None when the
    server closed the connection without answering. Waits at most `wait` s for each read."""
    sock.settimeout(wait)
    received = b""
    while b"\r\n\r\n" not in received:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            assert not received, f"a partial answer: {received[:300]!r}"
            return None
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
    length = int(headers["content-length"])
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return int(status_line.split()[1]), headers, json.loads(body[:length])


# --------------------------------------------------------------------------- concurrency


@pytest.mark.slow
def test_many_clients_at_once_each_get_their_own_correct_answer(server, exported):
    clients, per_client = 16, 25
    gate = threading.Barrier(clients)

    def predict_client(k: int) -> list:
        rng = np.random.default_rng(1000 + k)
        client, answers = Client(server.port), []
        try:
            gate.wait(TIMEOUT)
            for _ in range(per_client):
                shape = (int(rng.integers(1, 12)), int(rng.integers(1, 5)), 5)
                x = rng.standard_normal(shape, dtype=np.float32)
                answers.append(("predict", x, client.predict(x)))
        finally:
            client.close()
        return answers

    def stream_client(k: int) -> list:
        rng = np.random.default_rng(2000 + k)
        client, answers = Client(server.port), []
        try:
            created = client.call("POST", "/v1/streams", {"batch": 2})
            assert created.status == 201, created.data
            url = created.data["url"]
            gate.wait(TIMEOUT)
            for _ in range(per_client):
                x = rng.standard_normal((int(rng.integers(1, 5)), 2, 5), dtype=np.float32)
                answers.append(("step", x, client.call("POST", f"{url}/step", {"x": x.tolist()})))
            assert client.call("DELETE", url).status == 200
        finally:
            client.close()
        return answers

    with ThreadPoolExecutor(clients) as pool:
        futures = [
            pool.submit(predict_client if k % 2 else stream_client, k) for k in range(clients)
        ]
        results = [f.result(timeout=120) for f in futures]
    assert sum(len(r) for r in results) == clients * per_client  # none lost
    runtime = exported.runtime
    for answers in results:
        if answers[0][0] == "predict":
            for _, x, reply in answers:
                y, (h, c) = runtime.run(x)
                assert_close(arrays(reply, "y", "hn", "cn"), (y, h, c), atol=1e-6)
            continue
        whole = np.concatenate([x for _, x, _ in answers])
        y, (h, c) = runtime.run(whole)
        offset = 0
        for _, x, reply in answers:
            got_y, got_h, got_c = arrays(reply, "y", "hn", "cn")
            offset += len(x)
            assert reply.data["steps"] == offset
            assert_close([got_y], [y[offset - len(x) : offset]], atol=1e-6)
        assert_close((got_h, got_c), (h, c), atol=1e-6)


@pytest.mark.slow
def test_concurrent_chunks_to_one_stream_run_one_at_a_time(server, exported):
    rng = np.random.default_rng(5)
    chunks = [rng.standard_normal((k % 5 + 1, 1, 5), dtype=np.float32) for k in range(24)]
    client = Client(server.port)
    url = client.call("POST", "/v1/streams", {"batch": 1}).data["url"]
    client.close()
    gate = threading.Barrier(6)

    def poster(k: int) -> list:
        own, answers = Client(server.port), []
        try:
            gate.wait(TIMEOUT)
            for index in range(k, len(chunks), 6):
                reply = own.call("POST", f"{url}/step", {"x": chunks[index].tolist()})
                answers.append((index, reply))
        finally:
            own.close()
        return answers

    with ThreadPoolExecutor(6) as pool:
        answers = [a for f in [pool.submit(poster, k) for k in range(6)] for a in f.result(120)]
    assert len(answers) == len(chunks) and all(r.status == 200 for _, r in answers)
    # "steps" after each chunk gives the order the server ran them in; replay that order.
    answers.sort(key=lambda a: a[1].data["steps"])
    state, total = None, 0
    for index, reply in answers:
        total += len(chunks[index])
        assert reply.data["steps"] == total, "two chunks overlapped"
        y, state = exported.runtime.run(chunks[index], state)
        assert_close(arrays(reply, "y", "hn", "cn"), (y, *state), atol=1e-6)


# --------------------------------------------------------------------------- streams' lifetime


@pytest.mark.slow
def test_a_chunk_whose_answer_cannot_fit_the_budget_leaves_its_stream_as_it_was(exported, tmp_path):
    """A stream's answer is reserved before its state moves: a chunk whose answer could not
    fit --max-bytes-in-flight is a 413 before it runs, and the stream goes on as if it never
    came (a 413 sent after the state moved would leave the client unaware of it)."""
    limits = {"max_body_bytes": 90_000, "max_bytes_in_flight": 100_000, "max_batch": 1}
    limits |= {"max_seq_len": 4096, "max_elements": 8192}
    server = Server(exported.folder, tmp_path / "budget.log", **limits)
    try:
        client = Client(server.port)
        stream = client.call("POST", "/v1/streams", {"batch": 1}).data["url"]
        first, second = (np.random.default_rng(s).standard_normal((3, 1, 5)) for s in (1, 2))
        first, second = first.astype(np.float32), second.astype(np.float32)
        assert client.call("POST", stream + "/step", {"x": first.tolist()}).status == 200
        big = np.zeros((3000, 1, 5)).tolist()  # a short body (zeros), a long answer
        refused = Client(server.port).call("POST", stream + "/step", {"x": big})
        assert refused.status == 413, refused.data
        assert "bytes in flight" in refused.data["error"]
        going_on = client.call("POST", stream + "/step", {"x": second.tolist()})
        y_whole, h, c = eager(exported.model, np.concatenate([first, second]))
        y, hn, cn = arrays(going_on, "y", "hn", "cn")
        assert_close((y, hn, cn), (y_whole[3:], h, c))
        assert client.call("GET", stream).data["steps"] == 6
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.slow
def test_idle_streams_expire_and_open_streams_are_capped(exported, tmp_path):
    server = Server(exported.folder, tmp_path / "ttl.log", max_streams=2, stream_ttl=0.6)
    client = Client(server.port)
    try:
        x = {"x": np.zeros((1, 1, 5)).tolist()}
        a, b = (client.call("POST", "/v1/streams", {"batch": 1}).data["url"] for _ in range(2))
        refused = client.call("POST", "/v1/streams")
        assert refused.status == 429 and "too many open streams (limit 2)" in refused.data["error"]
        assert refused.headers["retry-after"] == "1"
        assert client.call("DELETE", a).status == 200
        c = client.call("POST", "/v1/streams").data["url"]
        # A stream in use stays open past the TTL; an idle one expires, swept without access.
        for _ in range(6):
            assert client.call("POST", f"{c}/step", x).status == 200
            time.sleep(0.2)
        deadline = time.monotonic() + 10
        while client.call("GET", "/healthz").data["streams"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.call("GET", "/healthz").data["streams"] == 0
        for url in (b, c):
            gone = client.call("POST", f"{url}/step", x)
            assert gone.status == 404 and "expired after 0.6 s idle" in gone.data["error"]
        assert all(client.call("POST", "/v1/streams").status == 201 for _ in range(2))
    finally:
        client.close()
        assert server.stop() == 0, server.log()


# --------------------------------------------------------------------------- connections


def connect(port: int) -> socket.socket:
    return socket.create_connection((LOOPBACK, port), timeout=TIMEOUT)


def predict_head(length: int) -> bytes:
    return (
        f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def healthz(port: int) -> tuple[int, dict, dict] | None:
    """GET /healthz on a new connection: the answer, or None if closed unanswered."""
    try:
        with connect(port) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            return read_answer(sock, wait=5)
    except (ConnectionResetError, BrokenPipeError):
        return None


def assert_quiet_log(server: Server) -> None:
    log = server.log()
    assert "Traceback" not in log and "Too many open files" not in log, log[-4000:]
    assert len(log) < 20_000, f"the log grew to {len(log)} characters"


@pytest.mark.slow
def test_slow_heads_and_bodies_get_a_json_408_after_their_timeout(exported, tmp_path):
    server = Server(exported.folder, tmp_path / "slow.log", header_timeout=1.0, body_timeout=1.0)

    def silent() -> socket.socket:  # connects, never sends a byte
        return connect(server.port)

    def trickling_head() -> socket.socket:  # a header byte every 0.2 s, never the blank line
        sock = connect(server.port)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        for _ in range(50):
            if select.select([sock], [], [], 0.2)[0]:  # answered
                break
            sock.sendall(b"a")
        return sock

    def short_body() -> socket.socket:  # 10 of the 100 bytes its Content-Length promises
        sock = connect(server.port)
        sock.sendall(predict_head(100) + b'{"x": [[[0')
        return sock

    def timed(opener) -> tuple[float, tuple | None]:
        began = time.monotonic()
        with opener() as sock:
            answer = read_answer(sock, wait=8)
        return time.monotonic() - began, answer

    try:
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(timed, (silent, trickling_head, short_body)))
        for (seconds, answer), flag in zip(results, ("header", "header", "body"), strict=True):
            assert answer is not None, "closed without an answer"
            status, headers, data = answer
            assert status == 408 and headers["connection"] == "close", answer
            assert "within 1 s" in data["error"] and f"--{flag}-timeout" in data["error"], data
            assert 0.9 <= seconds < 3.0, seconds
        # A kept-alive connection may idle past the header timeout: its clock starts with the
        # next request's first byte (the idle time is --keep-alive's, 60 s).
        client = Client(server.port)
        try:
            assert client.call("GET", "/healthz").status == 200
            time.sleep(1.5)
            assert_predict_works(client, exported)
        finally:
            client.close()
    finally:
        assert server.stop() == 0, server.log()
    assert_quiet_log(server)


@pytest.mark.slow
def test_connection_cap_answers_extra_connections_fast_and_healthz_stays_up(exported, tmp_path):
    # Under a 256-file limit, as in the report: 8 slow connections fill the cap, then 300 more
    # arrive. The cap's 16 spare connections are read and answered (503, or /healthz); the
    # rest are closed at once, and the accept backlog is sized to the files left.
    server = Server(
        exported.folder, tmp_path / "cap.log", files=256, max_connections=8, header_timeout=20.0
    )
    held = [connect(server.port) for _ in range(8)]  # they send nothing: held till 20 s
    flood: list[socket.socket] = []
    try:
        status, headers, data = healthz(server.port)  # past the cap, /healthz still answers
        assert status == 200 and data["connections"] == 9 and headers["connection"] == "close"
        began = time.monotonic()
        with connect(server.port) as sock:
            body = js({"x": X})
            sock.sendall(predict_head(len(body)) + body)
            status, headers, data = read_answer(sock, wait=5)
        assert time.monotonic() - began < 1.0
        assert status == 503 and headers["retry-after"] == "1", data
        assert "too many connections open (limit 8, --max-connections)" in data["error"]

        flooding = threading.Thread(
            target=lambda: flood.extend(connect(server.port) for _ in range(300))
        )
        flood_began = time.monotonic()
        flooding.start()
        # /healthz on new connections every 0.2 s: while the spare is full, closed at once
        # (None); answered again within 2.5 s of the flood's end, the cap still full.
        answers: list[tuple[float, int | None]] = []
        ended = None
        while ended is None or time.monotonic() < ended + 2.5:
            answer = healthz(server.port)
            answers.append((round(time.monotonic() - flood_began, 2), answer and answer[0]))
            if ended is None and not flooding.is_alive():
                ended = time.monotonic()
            elif ended is not None and answers[-1][1] == 200:
                break
            time.sleep(0.2)
        flooding.join(TIMEOUT)
        print(f"/healthz during and after the flood (seconds, status): {answers}")
        assert answers[-1][1] == 200, answers
        outcomes = [read_answer(sock, wait=5) for sock in flood]  # none left hanging
        refused = [a for a in outcomes if a is not None]
        assert len(outcomes) == 300 and len(outcomes) - len(refused) >= 200, len(refused)
        assert all(a[0] == 503 and a[1]["retry-after"] == "1" for a in refused), refused[:3]
        status, _, data = healthz(server.port)
        assert status == 200 and data["connections"] == 9, data  # the 8 held, and this one
    finally:
        for sock in held + flood:
            sock.close()
        assert server.stop() == 0, server.log()
    log = server.log()
    assert "Traceback" not in log and len(log) < 20_000, log[-4000:]
    assert log.count("Too many open files") <= 1, log  # at most one line per 10 s, if any


def rss_mib(pid: int) -> float:
    """The resident memory of a process, from /proc (Linux)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


# Requests of 2,000 steps x batch 64: a body of 2.6 MB and an answer of about 10 MB, more
# than the kernel's socket buffers take (4 MB here), so that most of it waits in the server.
BIG = {"max_seq_len": 2000, "max_batch": 64, "max_elements": 128000, "max_body_bytes": 4 << 20}
BIG_X = np.zeros((2000, 64, 5)).tolist()


def never_reading(port: int, body: bytes) -> tuple[socket.socket, int, bytes, bytes]:
    """Send a predict and read only the head of its answer (all of it for a small 503), with
    a 4 KiB receive buffer: (socket, status, head, body read)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(TIMEOUT)
    sock.connect((LOOPBACK, port))
    sock.sendall(predict_head(len(body)) + body)
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(256)
    head, _, rest = received.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    while status != 200 and not rest.endswith(b"}"):
        rest += sock.recv(4096)
    return sock, status, head, rest


@pytest.mark.slow
def test_never_reading_clients_are_bounded_and_memory_returns(exported, tmp_path):
    # Answers of 11.7 MiB to bodies of 3.3 MiB: three answers fit 48 MiB in flight, then the
    # fourth would pass it (35 held + 3.3 + 11.7) and is answered 503 instead.
    budget = 48 * 1024 * 1024
    server = Server(exported.folder, tmp_path / "never-read.log", max_bytes_in_flight=budget, **BIG)
    body = js({"x": BIG_X})
    sockets: list[socket.socket] = []
    try:
        client = Client(server.port)
        try:  # warm up: one whole answer read, so that the baseline holds what a read one costs
            reply = client.call("POST", "/v1/predict", {"x": BIG_X})
            assert reply.status == 200 and len(reply.data["y"]) == 2000
        finally:
            client.close()
        time.sleep(1.0)
        baseline = rss_mib(server.proc.pid)
        statuses = []
        for _ in range(5):  # one after another: each sends, then never reads
            sock, status, head, rest = never_reading(server.port, body)
            sockets.append(sock)
            statuses.append(status)
            if status == 503:
                assert b"\r\nretry-after: 1\r\n" in head.lower() + b"\r\n", head
                assert b"content-type: application/json" in head.lower(), head
                assert "--max-bytes-in-flight" in json.loads(rest)["error"], rest
            _, _, data = healthz(server.port)
            assert 0 < data["bytes_in_flight"] <= budget, data
        peak = rss_mib(server.proc.pid)
        assert statuses == [200, 200, 200, 503, 503], statuses
        assert healthz(server.port)[0] == 200
        for sock in sockets:  # the abusive clients leave
            sock.close()
        deadline = time.monotonic() + 10
        while healthz(server.port)[2]["bytes_in_flight"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert healthz(server.port)[2]["bytes_in_flight"] == 0
        while rss_mib(server.proc.pid) > baseline + 16 and time.monotonic() < deadline:
            time.sleep(0.2)
        after = rss_mib(server.proc.pid)
        print(f"RSS: baseline {baseline:.0f} MiB, peak {peak:.0f}, after {after:.0f}")
        assert after <= baseline + 16, (baseline, peak, after)
    finally:
        for sock in sockets:
            sock.close()
        assert server.stop() == 0, server.log()
    assert_quiet_log(server)


@pytest.mark.slow
def test_an_answer_nobody_reads_is_dropped_after_the_write_timeout(exported, tmp_path):
    server = Server(exported.folder, tmp_path / "write-timeout.log", write_timeout=1.0, **BIG)
    try:
        sock, status, _, _ = never_reading(server.port, js({"x": BIG_X}))
        with sock:
            assert status == 200
            began = time.monotonic()
            assert healthz(server.port)[2]["bytes_in_flight"] > 8 * 1024 * 1024
            while healthz(server.port)[2]["bytes_in_flight"] and time.monotonic() < began + 10:
                time.sleep(0.1)
            seconds = time.monotonic() - began
            assert healthz(server.port)[2]["bytes_in_flight"] == 0  # the client still there
            assert seconds < 3.0, seconds
            sock.settimeout(10)
            received = 0
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(1 << 20):  # what the kernel had, then the end
                    received += len(chunk)
            assert received < 8 * 1024 * 1024, received  # not the whole 11.7 MiB answer
    finally:
        assert server.stop() == 0, server.log()
    assert "dropped a connection whose answer was not read within 1 s" in server.log()
    assert_quiet_log(server)


# --------------------------------------------------------------------------- shutdown


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_shuts_down_cleanly_on_signal(exported, tmp_path, sig):
    server = Server(exported.folder, tmp_path / "signal.log")
    client = Client(server.port)  # stays open (keep-alive) across the shutdown
    try:
        assert client.call("POST", "/v1/streams", {"batch": 1}).status == 201
        assert_predict_works(client, exported)
        server.proc.send_signal(sig)
        assert server.proc.wait(timeout=20) == 0, server.log()
    finally:
        client.close()
        server.stop()
    assert "Finished server process" in server.log()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, server.port), timeout=5).close()
    with socket.socket() as sock:  # the port is free to bind again
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, server.port))


@pytest.mark.slow
def test_sigterm_lets_a_request_in_flight_finish_then_exits_0(exported, tmp_path):
    server = Server(exported.folder, tmp_path / "in-flight.log")
    x = np.random.default_rng(9).standard_normal((3, 2, 5), dtype=np.float32)
    body = js({"x": x.tolist()})
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    try:
        with socket.create_connection((LOOPBACK, server.port), timeout=TIMEOUT) as sock:
            sock.sendall(head + body[:10])  # in flight: head received, body half sent
            # One more answer from the event loop: it has read the head sent before it.
            assert Client(server.port).call("GET", "/healthz").status == 200
            server.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 20
            while "Shutting down" not in server.log() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "Shutting down" in server.log(), server.log()
            with pytest.raises(ConnectionRefusedError):  # no new connections meanwhile
                socket.create_connection((LOOPBACK, server.port), timeout=5).close()
            assert server.proc.poll() is None, "exited with a request in flight"
            sock.sendall(body[10:])
            received = b""
            while chunk := sock.recv(65536):  # the server closes the connection after it
                received += chunk
        head_out, _, data = received.partition(b"\r\n\r\n")
        assert head_out.startswith(b"HTTP/1.1 200 "), received[:300]
        y, h, c = (np.asarray(json.loads(data)[k], dtype=np.float32) for k in ("y", "hn", "cn"))
        assert_close((y, h, c), eager(exported.model, x))
        assert server.proc.wait(timeout=20) == 0, server.log()
    finally:
        server.stop()
    assert "Finished server process" in server.log()
    assert "Traceback" not in server.log(), server.log()


@pytest.mark.slow
def test_sigterm_with_slow_clients_exits_within_2_s_without_a_traceback(exported, tmp_path):
    server = Server(exported.folder, tmp_path / "slow-stop.log")
    slow_head = connect(server.port)
    slow_body = connect(server.port)
    idle = Client(server.port)
    try:
        slow_head.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        slow_body.sendall(predict_head(1000) + b'{"x": [')
        assert idle.call("GET", "/healthz").data["connections"] == 3
        began = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=20)
        seconds = time.monotonic() - began
        print(f"SIGTERM to exit: {seconds:.2f} s")
        assert code == 0 and seconds < 2.0, (code, seconds)
        status, _, data = read_answer(slow_body, wait=5)
        assert status == 503 and "shutting down" in data["error"], data
    finally:
        for sock in (slow_head, slow_body):
            sock.close()
        idle.close()
        server.stop()
    log = server.log()
    assert "Finished server process" in log
    assert "Traceback" not in log and "CancelledError" not in log, log


# --------------------------------------------------------------------------- setup errors


def test_setup_errors_are_usage_errors(exported, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        create_app(tmp_path / "missing")
    for bad in ({"max_body_bytes": 0}, {"stream_ttl": float("nan")}, {"max_batch": 2.5}):
        with pytest.raises(UsageError, match="must be"):
            ServerLimits(**bad)
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for name in ("model.onnx", "manifest.json"):
        (tampered / name).write_bytes((exported.folder / name).read_bytes())
    graph = onnx.load(str(tampered / "model.onnx"))
    graph.doc_string = "changed after export"  # loads fine, but is not the file exported
    onnx.save(graph, str(tampered / "model.onnx"))
    with pytest.raises(UsageError, match="does not match"):
        create_app(tampered)
    (tampered / "manifest.json").unlink()  # a bare .onnx serves, hashed on the spot
    app = create_app(tampered / "model.onnx")
    info = app.state.service.info
    digest = hashlib.sha256((tampered / "model.onnx").read_bytes()).hexdigest()
    assert info["artifacts"] == {
        "model.onnx": {"sha256": digest, "bytes": (tampered / "model.onnx").stat().st_size}
    }
    assert info["signature"] == exported.runtime.signature()
    app.state.service.pool.shutdown()
    with pytest.raises(UsageError, match="log_level must be one of"):
        serve(exported.folder, LOOPBACK, 0, log_level="loud")
    with pytest.raises(UsageError, match=r"max_bytes_in_flight \(100\) must be at least"):
        ServerLimits(max_body_bytes=200, max_bytes_in_flight=100)
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        with pytest.raises(UsageError, match="cannot listen on"):
            serve(exported.folder, LOOPBACK, taken.getsockname()[1])


def test_serving_without_the_extra_says_which_extra_to_install():
    # uvicorn as if not installed: the light names still import, serve and create_app say why not.
    code = (
        "import sys; sys.modules['uvicorn'] = None\n"
        "from lstm_export.serving.http import ServerLimits, cpu_count\n"
        "import lstm_export, lstm_export.serving.http as http\n"
        "for get in (lambda: http.serve, lambda: http.create_app, lambda: lstm_export.serve):\n"
        "    try:\n"
        "        get()\n"
        "    except lstm_export.UsageError as exc:\n"
        "        print(exc)\n"
    )
    done = run_python(code, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all("pip install 'lstm-export[serve]'" in line for line in lines)


def serve_cli(folder: Path, *options: str, files: int | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lstm_export.cli", "serve", str(folder), "--port", "0"]
    return subprocess.run(
        [*command, *options],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=None if files is None else lambda: file_limit(files),
    )


@pytest.mark.slow
def test_threads_workers_and_connections_beyond_the_machine_are_refused(exported):
    cpus = cpu_count()
    cases = [
        (["--threads", "20000"], f"threads must be at most {cpus} (the CPU count, {cpus} here)"),
        (["--threads", str(cpus + 1)], f"threads must be at most {cpus} "),
        (["--workers", str(4 * cpus + 1)], f"workers must be at most {4 * cpus} (4 x the CPU"),
    ]
    for options, message in cases:
        done = serve_cli(exported.folder, *options)
        assert done.returncode == 2, (options, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    done = serve_cli(exported.folder, "--max-connections", "1000", files=256)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "only 256 (ulimit -n)" in lines[0], lines
    assert "lower --max-connections to 103" in lines[0], lines


def test_a_manifest_is_read_bounded(exported, tmp_path):
    # The manifest beside model.onnx is read as a regular file of limited size and depth.
    folder = tmp_path / "deep"
    folder.mkdir()
    (folder / "model.onnx").write_bytes((exported.folder / "model.onnx").read_bytes())
    (folder / "manifest.json").write_text("[" * 100_000)
    with pytest.raises(UsageError, match="nests 100000 levels deep"):
        create_app(folder)
    done = serve_cli(folder)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    (folder / "manifest.json").unlink()
    (folder / "manifest.json").mkdir()  # not a regular file: refused, not skipped
    with pytest.raises(UsageError, match="manifest"):
        create_app(folder)


# --------------------------------------------------------------------------- lengths, layouts
# In process: the ASGI app called directly on one event loop (no socket, no child process),
# so that these run in the quick loop. The reference is the eager model in float64.


class AppClient:
    """Requests to `create_app(...)` through ASGI calls on an event loop of its own."""

    def __init__(self, target: Path, **limits: float) -> None:
        self.app = create_app(target, ServerLimits(**{**LIMITS, **limits}))
        self.loop = asyncio.new_event_loop()

    def call(self, method: str, path: str, body: object = None, *, raw: bytes | None = None):
        """`body` as JSON, or `raw` bytes as they are; an answer that must be JSON."""
        if raw is None and body is not None:
            raw = json.dumps(body).encode()
        return self.loop.run_until_complete(self._call(method, path, raw))

    async def _call(self, method: str, path: str, payload: bytes | None) -> Reply:
        headers = [(b"content-length", str(len(payload or b"")).encode())]
        if payload is not None:
            headers.append((b"content-type", b"application/json"))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": (LOOPBACK, 1),
            "server": (LOOPBACK, 80),
        }
        requests = [{"type": "http.request", "body": payload or b"", "more_body": False}]
        sent: list[dict] = []

        async def receive() -> dict:
            return requests.pop() if requests else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        await self.app(scope, receive, send)
        start = sent[0]
        answer = b"".join(m.get("body", b"") for m in sent[1:])
        names = {k.decode(): v.decode() for k, v in start["headers"]}
        assert names["content-type"] == "application/json", answer[:200]
        return Reply(start["status"], json.loads(answer), names)

    def predict(self, x: np.ndarray, state=None, lengths=None) -> Reply:
        body: dict = {"x": x.tolist()}
        if state is not None:
            body |= {"h0": state[0].tolist(), "c0": state[1].tolist()}
        if lengths is not None:
            body["lengths"] = list(lengths)
        return self.call("POST", "/v1/predict", body)

    def close(self) -> None:
        self.app.state.service.pool.shutdown()
        self.loop.close()


@dataclass
class Served:
    model: torch.nn.Module
    config: LSTMConfig
    client: AppClient


LAYOUTS = {
    "plain": {"layer_norm": False},
    "layer_norm": {"layer_norm": True},
    "batch_first": {"layer_norm": False, "batch_first": True},
    "layer_norm_bidirectional": {"layer_norm": True, "bidirectional": True},
    "batch_first_bidirectional": {"layer_norm": False, "batch_first": True, "bidirectional": True},
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def served(request, tmp_path_factory) -> Served:
    """A model of each kind, exported (so proven at export) and served in process."""
    config = LSTMConfig(5, 8, 2, **LAYOUTS[request.param])
    model = build_model(config, seed=5)
    folder = export(model, tmp_path_factory.mktemp("layouts") / request.param).out_dir
    client = AppClient(folder)
    yield Served(model, config, client)
    client.close()


def eager64(model, x: np.ndarray, state=None, lengths=None) -> tuple[np.ndarray, ...]:
    """The eager model in float64 with the same weights: the independent reference."""
    reference = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        torch_state = None if state is None else tuple(torch.from_numpy(s).double() for s in state)
        torch_lengths = None if lengths is None else torch.tensor(lengths, dtype=torch.int64)
        y, (h, c) = reference(torch.from_numpy(x).double(), torch_state, torch_lengths)
    return y.numpy(), h.numpy(), c.numpy()


def ragged_batch(config: LSTMConfig, seed: int = 0) -> tuple[np.ndarray, tuple, list[int]]:
    """x [seq 6, batch 3] in the model's layout, a random state, lengths full, 1 and 4."""
    rng = np.random.default_rng(seed)
    seq, batch = 6, 3
    shape = (batch, seq) if config.batch_first else (seq, batch)
    x = rng.standard_normal((*shape, config.input_size), dtype=np.float32)
    state_shape = (config.state_layers, batch, config.hidden_size)
    state = tuple(rng.standard_normal(state_shape, dtype=np.float32) for _ in range(2))
    return x, state, [seq, 1, 4]


def test_predict_with_ragged_lengths_matches_eager_float64(served):
    config = served.config
    x, state, lengths = ragged_batch(config)
    for s in (None, state):
        reply = served.client.predict(x, s, lengths)
        y, h, c = arrays(reply, "y", "hn", "cn")
        assert_close((y, h, c), eager64(served.model, x, s, lengths))
        steps = y if config.batch_first else y.transpose(1, 0, 2)  # [batch, seq, D*hidden]
        for row, length in enumerate(lengths):
            assert not steps[row, length:].any()  # y is zero past each sequence's end
    # Without lengths every row runs every step: the padded rows' state moves on.
    y, h, _ = arrays(served.client.predict(x, state), "y", "hn", "cn")
    assert_close((y, h), eager64(served.model, x, state)[:2])
    assert not np.allclose(h, eager64(served.model, x, state, lengths)[1], atol=1e-3)


def test_model_says_its_layout_and_that_it_takes_lengths(served):
    config = served.config
    info = served.client.call("GET", "/v1/model")
    assert info.status == 200, info.data
    assert info.data["config"] == config.to_dict()  # batch_first and bidirectional among them
    steps = ["batch", "seq"] if config.batch_first else ["seq", "batch"]
    assert info.data["x_shape"] == [*steps, 5]
    assert info.data["lengths"] is True
    assert info.data["streaming"] is not config.bidirectional
    assert "lengths" in info.data["signature"]["inputs"]


def test_streams_of_a_bidirectional_model_are_refused_with_409(served):
    config = served.config
    created = served.client.call("POST", "/v1/streams", {"batch": 2})
    if not config.bidirectional:
        assert created.status == 201, created.data
        assert served.client.call("DELETE", created.data["url"]).status == 200
        return
    assert created.status == 409, created.data
    message = created.data["error"]
    assert "bidirectional" in message and "has not seen" in message, message
    assert "POST /v1/predict" in message
    assert "\n" not in message
    assert served.client.call("POST", "/v1/streams").status == 409  # with no body too
    assert served.client.call("GET", "/healthz").data["streams"] == 0


def test_a_batch_first_model_takes_batch_first_x_in_limits_and_streams(tmp_path):
    config = LSTMConfig(5, 8, 1, False, batch_first=True)
    model = build_model(config, seed=2)
    folder = export(model, tmp_path / "bf").out_dir
    client = AppClient(folder, max_seq_len=8, max_batch=4, max_elements=32)
    try:
        # Steps and batch are counted on their own axes: x [batch, seq, 5].
        fits = np.zeros((4, 8, 5), dtype=np.float32)
        assert client.predict(fits, lengths=[8, 1, 2, 3]).status == 200
        long = client.predict(np.zeros((1, 9, 5), dtype=np.float32))
        assert long.status == 413 and "x has 9 time steps" in long.data["error"], long.data
        wide = client.predict(np.zeros((5, 1, 5), dtype=np.float32))
        assert wide.status == 413 and "x has batch 5" in wide.data["error"], wide.data
        # A stream's chunks follow one another along axis 1.
        x = np.random.default_rng(3).standard_normal((3, 6, 5), dtype=np.float32)
        url = client.call("POST", "/v1/streams", {"batch": 3}).data["url"]
        ys = []
        for a, b in ((0, 2), (2, 6)):
            reply = client.call("POST", f"{url}/step", {"x": x[:, a:b].tolist()})
            ys.append(arrays(reply, "y")[0])
        assert reply.data["steps"] == 6
        got = (np.concatenate(ys, axis=1), *arrays(reply, "hn", "cn"))
        assert_close(got, eager64(model, x))
    finally:
        client.close()


@pytest.fixture(scope="module")
def plain_client(tmp_path_factory):
    """A plain time-major model of 2 layers: x [seq, batch, 5]."""
    model = build_model(LSTMConfig(5, 8, 2, False), seed=9)
    folder = export(model, tmp_path_factory.mktemp("lengths") / "plain").out_dir
    client = AppClient(folder)
    yield client
    client.close()


X_3x2 = np.zeros((3, 2, 5)).tolist()  # seq 3, batch 2

# (id, raw lengths JSON, what the one-line 400 must say)
BAD_LENGTHS = [
    ("count", "[3]", ["lengths", "2", "1"]),
    ("too many", "[3, 3, 3]", ["lengths", "2", "3"]),
    ("zero", "[3, 0]", ["lengths", "0"]),
    ("negative", "[3, -1]", ["lengths", "-1"]),
    ("over seq", "[3, 4]", ["lengths", "4", "3"]),
    ("float", "[3, 2.5]", ["lengths must be a list of integers", "got 2.5"]),
    ("whole float", "[3, 2.0]", ["lengths must be a list of integers", "got 2.0"]),
    ("boolean", "[3, true]", ["true or false where a number belongs"]),
    ("string", '[3, "2"]', ["lengths must be a list of integers", "got a string"]),
    ("null", "[3, null]", ["lengths must be a list of integers", "got null"]),
    ("nested", "[[3], [2]]", ["lengths must be a list of integers", "got a list"]),
    ("number", "3", ["lengths must be a list of integers", "got a number"]),
    ("empty", "[]", ["lengths must be a list of integers", "got an empty list"]),
    ("huge", "[3, " + "9" * 30 + "]", ["lengths must be a list of integers", "got "]),
]


@pytest.mark.parametrize("raw,says", [b[1:] for b in BAD_LENGTHS], ids=[b[0] for b in BAD_LENGTHS])
def test_bad_lengths_get_a_400_naming_expected_and_received(plain_client, raw, says):
    body = ('{"x": ' + json.dumps(X_3x2) + ', "lengths": ' + raw + "}").encode()
    reply = plain_client.call("POST", "/v1/predict", raw=body)
    assert reply.status == 400, reply.data
    assert list(reply.data) == ["error"], reply.data
    message = reply.data["error"]
    assert "\n" not in message and all(part in message for part in says), message


OLD_EXPORTS = Path(__file__).parents[1] / "data"


@pytest.mark.parametrize("kind", ["plain", "layer_norm"])
def test_an_export_from_before_lengths_serves_and_refuses_lengths_clearly(kind):
    folder = OLD_EXPORTS / f"export_v2_{kind}"
    reference = torch.jit.load(str(folder / "model.pt")).double().eval()  # its own weights
    client = AppClient(folder)
    try:
        info = client.call("GET", "/v1/model")
        assert info.status == 200, info.data
        assert info.data["lengths"] is False and info.data["streaming"] is True
        assert info.data["x_shape"] == ["seq", "batch", 5]
        x = np.random.default_rng(1).standard_normal((4, 2, 5), dtype=np.float32)
        with torch.no_grad():
            y, (h, c) = reference(torch.from_numpy(x).double())
        assert_close(arrays(client.predict(x), "y", "hn", "cn"), (y.numpy(), h.numpy(), c.numpy()))
        refused = client.predict(x, lengths=[4, 2])
        assert refused.status == 400, refused.data
        message = refused.data["error"]
        assert "takes no lengths" in message and "exported before lengths" in message, message
        assert "re-export" in message and "\n" not in message
    finally:
        client.close()
