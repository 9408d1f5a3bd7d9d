"""`serve-bench`'s load generator (lstm_export.benchmarks.load), run for real: against a
server on a free loopback port, against a small fake HTTP server that answers wrongly on
purpose, and through the CLI. Only 127.0.0.1 is ever contacted; every server is stopped by
the test that started it.
"""

from __future__ import annotations

import http.client
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from rich.console import Console

from helpers import run_cli
from lstm_export.benchmarks import v2_requests
from lstm_export.benchmarks.load import all_failed, error_lines, first_error_reason, load_test
from lstm_export.checkpoints import build_model
from lstm_export.cli.render import load_table
from lstm_export.config import LSTMConfig
from lstm_export.errors import UsageError
from lstm_export.pipeline import export
from server_process import LOOPBACK, TIMEOUT, Client, Exported, Server, running_server, small_export


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Exported:
    return small_export(tmp_path_factory.mktemp("bench") / "lstm")


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    with running_server(exported.folder, tmp_path_factory.mktemp("log") / "server.log") as running:
        yield running


# --------------------------------------------------------------------------- serve-bench

APIS = ["v1", "v2-json", "v2-binary"]


@pytest.mark.slow
def test_load_test_runs_every_api_on_one_server_and_reports_each(server):
    before = Client(server.port).call("GET", "/healthz").data["streams"]
    report = load_test(
        server.url, clients=2, requests=6, seq=3, batch=2, stream_fraction=0.5, timeout=TIMEOUT
    )
    assert report["apis"] == list(report["runs"]) == APIS and report["baseline"] == "v1"
    assert report["errors"] == 0 and report["first_error"] is None
    assert report["requests"] == 3 * 12
    v1 = report["runs"]["v1"]
    for api, run in report["runs"].items():
        assert run["errors"] == 0 and run["first_error"] is None, (api, run["first_error"])
        assert run["requests"] == run["latency"]["count"] == 12, api
        assert run["predict"]["count"] == run["stream_step"]["count"] == 6, api
        for kind in ("latency", "predict", "stream_step"):
            assert 0 < run[kind]["p50_ms"] <= run[kind]["p99_ms"], (api, kind)
        assert run["requests_per_s"] > 0
        versus = run["vs_baseline"]
        rate = run["requests_per_s"] / v1["requests_per_s"]
        assert versus["requests_per_s"] == pytest.approx(rate, abs=1e-3), api
        p50 = run["latency"]["p50_ms"] / v1["latency"]["p50_ms"]
        assert versus["p50"] == pytest.approx(p50, abs=1e-3), api
    assert any("batch 1" in note for note in report["notes"]), report["notes"]
    # every /v1 stream deleted and every /v2 sequence ended
    assert Client(server.port).call("GET", "/healthz").data["streams"] == before
    with pytest.raises(UsageError, match="stream_fraction"):
        load_test(server.url, clients=1, requests=1, seq=1, batch=1, stream_fraction=2.0)
    for apis in (["v3"], [], ["v1", "v1"]):
        with pytest.raises(UsageError, match="apis must name"):
            load_test(
                server.url, clients=1, requests=1, seq=1, batch=1, stream_fraction=0, apis=apis
            )


@pytest.mark.slow
def test_load_test_says_why_requests_failed(server):
    # Batch 5 is over this server's limit of 4: every predict is refused, in every API; the
    # stream steps are batch 1 everywhere, and pass.
    report = load_test(
        server.url, clients=2, requests=4, seq=1, batch=5, stream_fraction=0.5, timeout=TIMEOUT
    )
    for api, run in report["runs"].items():
        assert run["requests"] == 8 and run["errors"] == 4, (api, run)
        assert run["predict"]["count"] == 0 and run["stream_step"]["count"] == 4, api
        first = run["first_error"]
        assert first["status"] == 413 and "batch 5" in first["error"], (api, first)
        assert "at most 4" in first["error"], (api, first)
    assert report["errors"] == 12 and report["requests"] == 24 and not all_failed(report)
    assert report["first_error"]["api"] == "v1"
    assert first_error_reason(report).startswith("v1: the first answered 413: x has batch 5")
    lines = error_lines(report)
    assert [line.split(":")[0] for line in lines] == APIS, lines
    assert all("requests failed (4 of 8); the first answered 413" in line for line in lines)


@pytest.mark.slow
def test_load_test_reports_each_apis_errors_apart(exported, tmp_path):
    """Bodies over the limit as JSON but not as binary tensors: /v1 and /v2 with JSON tensors
    are refused (413, with the server's reason), /v2 with binary tensors is served."""
    server = Server(exported.folder, tmp_path / "small.log", max_body_bytes=1500)
    try:
        report = load_test(
            server.url, clients=1, requests=4, seq=20, batch=2, stream_fraction=0.5, timeout=30
        )
    finally:
        assert server.stop() == 0, server.log()
    runs = report["runs"]
    for api in ("v1", "v2-json"):
        assert runs[api]["errors"] == runs[api]["requests"] == 4, runs[api]
        first = runs[api]["first_error"]
        assert first["status"] == 413 and "limit of 1500 bytes" in first["error"], first
    assert runs["v2-binary"]["errors"] == 0, runs["v2-binary"]["first_error"]
    assert runs["v2-binary"]["latency"]["count"] == 4
    assert report["errors"] == 8 and report["requests"] == 12 and not all_failed(report)
    lines = error_lines(report)
    assert len(lines) == 2, lines
    assert lines[0].startswith("v1: every request failed (4 of 4); the first answered 413")
    assert lines[1].startswith("v2-json: every request failed (4 of 4); the first answered 413")


@pytest.mark.slow
def test_load_test_v2_requests_are_read_by_the_server_as_sent(server, exported):
    """The /v2 requests serve-bench sends, JSON or binary, give the runtime's y for their x;
    `answer_problem` passes these answers and names what is wrong with a shape."""
    name = Client(server.port).call("GET", "/v1/model").data["name"]
    x = np.random.default_rng(5).standard_normal((2, 3, 5), dtype=np.float32)  # batch-first
    want = exported.runtime.run(np.ascontiguousarray(x.transpose(1, 0, 2)))[0].transpose(1, 0, 2)
    conn = http.client.HTTPConnection(LOOPBACK, server.port, timeout=TIMEOUT)
    try:
        for binary in (False, True):
            body, headers = v2_requests.infer_request(x, binary=binary)
            conn.request("POST", f"/v2/models/{name}/infer", body=body, headers=headers)
            response = conn.getresponse()
            data, length = response.read(), response.getheader("Inference-Header-Content-Length")
            assert response.status == 200, data[:300]
            if binary:
                header = json.loads(data[: int(length)])
                y = np.frombuffer(data[int(length) :], "<f4")
            else:
                assert length is None
                header = json.loads(data)
                y = np.asarray(header["outputs"][0]["data"], np.float32)
            (output,) = header["outputs"]
            assert output["name"] == "y" and output["shape"] == [2, 3, 8], output.get("shape")
            np.testing.assert_allclose(y.reshape(2, 3, 8), want, atol=1e-5, rtol=0)
            assert v2_requests.answer_problem(data, length, (2, 3, 8), binary) is None
            problem = v2_requests.answer_problem(data, length, (2, 4, 8), binary)
            assert "expected FP32 [2, 4, 8]" in problem, problem
            problem = v2_requests.answer_problem(data, length, (2, 3, 8), not binary)
            assert "Inference-Header-Content-Length" in problem, problem
    finally:
        conn.close()


FAKE_CONFIG = {"input_size": 5, "hidden_size": 8, "batch_first": False, "bidirectional": False}


class FakeServer:
    """A stand-in for `serve` on loopback (http.server in a thread): it records every request
    and answers with y of the right shape for its x (a time-major model, input 5, hidden 8,
    named "fake model"), except where `fault` says to answer `api` wrongly."""

    MODEL = "/v2/models/fake%20model"

    def __init__(self, fault: tuple[str, str] | None = None) -> None:
        self.fault, self.requests = fault, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def handle_any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.requests.append((self.command, self.path, dict(self.headers), body))
                status, headers, answer = fake.answer(self.command, self.path, self.headers, body)
                self.send_response(status)
                for key, value in {"Content-Length": str(len(answer)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(answer)

            do_GET = do_POST = do_DELETE = handle_any

        self.httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://{LOOPBACK}:{self.httpd.server_address[1]}"

    def answer(self, method, path, headers, body) -> tuple[int, dict, bytes]:
        def reply(status: int, data: object) -> tuple[int, dict, bytes]:
            return status, {"Content-Type": "application/json"}, json.dumps(data).encode()

        if (method, path) == ("GET", "/v1/model"):
            return reply(200, {"name": "fake model", "config": FAKE_CONFIG, "streaming": True})
        if (method, path) == ("GET", self.MODEL):
            return reply(200, {"name": "fake model"})
        if (method, path) == ("POST", "/v1/streams"):
            return reply(201, {"id": "s", "url": "/v1/streams/s"})
        if method == "DELETE":
            return reply(200, {"deleted": "s"})
        if path in ("/v1/predict", "/v1/streams/s/step"):
            seq, batch, _ = np.asarray(json.loads(body)["x"]).shape
            rows = batch + (self.fault == ("v1", "shape"))
            return reply(200, {"y": np.zeros((seq, rows, 8)).tolist(), "hn": [], "cn": []})
        if path != self.MODEL + "/infer":
            return reply(404, {"error": f"no route {path}"})
        length = headers.get("Inference-Header-Content-Length")
        request = json.loads(body[: int(length)] if length else body)
        batch, seq, _ = request["inputs"][0]["shape"]
        binary = request["outputs"][0]["parameters"]["binary_data"]
        api = "v2-binary" if binary else "v2-json"
        fault = self.fault[1] if self.fault and self.fault[0] == api else None
        if fault == "refused":
            return reply(400, {"error": "the fake refuses this request"})
        shape = [batch, seq + (fault == "shape"), 8]
        y = np.zeros(shape, "<f4")
        if not binary or fault == "json":
            out = {"name": "y", "datatype": "FP32", "shape": shape, "data": y.ravel().tolist()}
            return reply(200, {"model_name": "fake model", "outputs": [out]})
        blob = y.tobytes()[: -4 if fault == "short" else None]
        out = {"name": "y", "datatype": "FP32", "shape": shape}
        out["parameters"] = {"binary_data_size": y.nbytes}
        header = json.dumps({"model_name": "fake model", "outputs": [out]}).encode()
        answer_headers = {"Inference-Header-Content-Length": str(len(header))}
        return 200, {"Content-Type": "application/octet-stream", **answer_headers}, header + blob

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_load_test_sends_the_same_workload_through_every_api():
    """What goes over the wire: the same x values in every API (/v1 time-major as the model,
    /v2 batch-first), stream steps at batch 1 on a /v1 stream opened with batch 1 or in a /v2
    sequence that starts on its first request and ends on its last, binary tensors as raw
    little-endian float32 after the JSON header."""
    fake = FakeServer()
    try:
        report = load_test(fake.url, clients=2, requests=4, seq=3, batch=2, stream_fraction=0.5)
    finally:
        fake.close()
    for api, run in report["runs"].items():
        assert run["errors"] == 0, (api, run["first_error"])
        assert run["predict"]["count"] == run["stream_step"]["count"] == 4, api
    xs: dict[str, list[tuple[np.ndarray, dict]]] = {"v1": [], "v2-json": [], "v2-binary": []}
    for method, path, headers, body in fake.requests:
        if (method, path) == ("POST", "/v1/streams"):
            assert json.loads(body) == {"batch": 1}
        elif path in ("/v1/predict", "/v1/streams/s/step"):
            x = np.asarray(json.loads(body)["x"], np.float32).transpose(1, 0, 2)
            xs["v1"].append((x, {"step": path.endswith("step")}))
        elif path.endswith("/infer"):
            length = headers.get("Inference-Header-Content-Length")
            request = json.loads(body[: int(length)] if length else body)
            (tensor,) = request["inputs"]
            assert request["outputs"] == [
                {"name": "y", "parameters": {"binary_data": length is not None}}
            ]
            if length is None:
                assert headers["Content-Type"] == "application/json"
                x = np.asarray(tensor["data"], np.float32)
            else:
                assert headers["Content-Type"] == "application/octet-stream"
                assert tensor["parameters"]["binary_data_size"] == len(body) - int(length)
                x = np.frombuffer(body[int(length) :], "<f4")
            x = x.reshape(tensor["shape"])
            parameters = request.get("parameters", {})
            xs["v2-binary" if length else "v2-json"].append(
                (x, {"step": bool(parameters), **parameters})
            )
    for api, sent in xs.items():
        predicts = {x.tobytes() for x, p in sent if not p["step"]}
        steps = {x.tobytes() for x, p in sent if p["step"]}
        assert {x.shape for x, p in sent} == {(2, 3, 5), (1, 3, 5)}, api
        assert all(x.shape[0] == 1 for x, p in sent if p["step"]), api
        assert len(predicts) == 2, api  # one x per client
        if api == "v1":
            v1_predicts, v1_steps = predicts, steps
        assert predicts == v1_predicts and steps == v1_steps, f"{api} sent other x than v1"
        if api == "v1":
            continue
        sequences: dict[int, list[dict]] = {}
        for _, p in sent:
            if p["step"]:
                sequences.setdefault(p["sequence_id"], []).append(p)
        assert len(sequences) == 2, api  # one per client
        for flags in sequences.values():
            assert len(flags) == 2
            assert [(f["sequence_start"], f["sequence_end"]) for f in flags] == [
                (True, False),
                (False, True),
            ]
    v2_ids = {p.get("sequence_id") for api in ("v2-json", "v2-binary") for _, p in xs[api]}
    assert len(v2_ids - {None}) == 4  # no id shared between the two /v2 runs


@pytest.mark.parametrize(
    ("fault", "status", "says"),
    [
        (("v1", "shape"), 200, "y has shape [3, 3, 8], expected [3, 2, 8]"),
        (("v2-json", "shape"), 200, "'y' is FP32 [2, 4, 8], expected FP32 [2, 3, 8]"),
        (("v2-json", "refused"), 400, "the fake refuses this request"),
        (("v2-binary", "short"), 200, "'y' came as 188 raw bytes"),
        (("v2-binary", "json"), 200, "without a valid Inference-Header-Content-Length"),
    ],
)
def test_load_test_counts_a_wrong_answer_as_an_error_with_its_reason(fault, status, says):
    """Every answer is checked (status, y's shape and encoding): one API answering wrongly
    fails all its requests with the reason, and the others' runs stay clean."""
    fake = FakeServer(fault)
    try:
        report = load_test(fake.url, clients=1, requests=2, seq=3, batch=2, stream_fraction=0)
    finally:
        fake.close()
    api = fault[0]
    for name, run in report["runs"].items():
        if name == api:
            assert run["errors"] == run["requests"] == 2 and run["latency"]["count"] == 0
            assert run["first_error"]["status"] == status, run["first_error"]
            assert says in run["first_error"]["error"], run["first_error"]
        else:
            assert run["errors"] == 0 and run["latency"]["count"] == 2, (name, run)
    assert not all_failed(report) and report["first_error"]["api"] == api
    assert error_lines(report) == [
        f"{api}: every request failed (2 of 2); {first_error_reason(report['runs'][api])}"
    ]


def test_serve_bench_fails_when_every_request_failed_and_says_why():
    first = {"status": 413, "error": "at most 4"}
    fine = {"requests": 4, "errors": 0, "first_error": None}
    some = {"requests": 4, "errors": 1, "first_error": first}
    every = {**some, "errors": 4}
    nothing = {"requests": 0, "errors": 0, "first_error": None}
    assert [all_failed(r) for r in (fine, some, every, nothing)] == [False, False, True, False]
    assert first_error_reason(fine) == ""
    assert first_error_reason(every) == "the first answered 413: at most 4"
    # A whole report: totals over its runs, its first error names the API.
    report = {
        "requests": 8,
        "errors": 5,
        "first_error": {"api": "v2-json", **first},
        "runs": {"v1": fine, "v2-json": every, "v2-binary": some},
    }
    assert not all_failed(report)
    assert first_error_reason(report) == "v2-json: the first answered 413: at most 4"
    assert error_lines(report) == [
        "v2-json: every request failed (4 of 4); the first answered 413: at most 4",
        "v2-binary: requests failed (1 of 4); the first answered 413: at most 4",
    ]
    assert all_failed({**report, "errors": 8})


def test_serve_bench_table_shows_every_api_side_by_side():
    def summary(count, p50, p99, mean):
        return {"count": count, "p50_ms": p50, "p99_ms": p99, "mean_ms": mean}

    def run(rate, ratio, p50_ratio, errors):
        return {
            "requests": 10,
            "errors": errors,
            "requests_per_s": rate,
            "latency": summary(10 - errors, 4.5, 9.25, 5.0),
            "predict": summary(5, 3.25, 8.0, 4.0),
            "stream_step": summary(5 - errors, None if errors else 6.0, None, None),
            "vs_baseline": {
                "requests_per_s": ratio,
                "p50": p50_ratio,
                "predict_p50": 0.5,
                "stream_step_p50": None if errors else 1.25,
            },
        }

    report = {
        "clients": 2,
        "requests_per_client": 5,
        "seq": 20,
        "batch": 4,
        "stream_fraction": 0.5,
        "stream_batch": 1,
        "baseline": "v1",
        "runs": {
            "v1": run(400.0, 1.0, 1.0, 0),
            "v2-json": run(300.0, 0.75, 1.333, 0),
            "v2-binary": run(1234.5, 3.086, 0.5, 5),
        },
    }
    console = Console(file=io.StringIO(), width=80)
    console.print(load_table(report))
    text = console.file.getvalue()
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80, text
    title = " ".join(text.split())  # wrapped to the table's width
    assert "2 clients x 5 requests seq 20, batch 4, 50% stream steps at batch 1;" in title
    assert "(ratio) against v1" in title, title
    assert "req/s (ratio)" in text and "p50 ms (ratio)" in text, text
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("v")}
    assert rows["v1"] == ["v1", "10", "400", "(1.00x)", "4.50", "(1.00x)", "9.25", "5.00", "0"]
    assert rows["v2-json"][2:6] == ["300", "(0.75x)", "4.50", "(1.33x)"], rows
    assert rows["v2-binary"][1:4] == ["5", "1234", "(3.09x)"] and rows["v2-binary"][-1] == "5"
    steps = [line.split() for line in lines if line.strip().startswith("steps")]
    assert steps[0] == ["steps", "5", "6.00", "(1.25x)", "-", "-"], steps
    assert steps[2] == ["steps", "0", "-", "-", "-"], steps


@pytest.mark.slow
def test_serve_bench_cli_fails_when_every_request_fails(exported):
    options = ["--clients", "1", "--requests", "2", "--seq", "1", "--batch", "65", "--json"]
    options += ["--stream-fraction", "0"]  # stream steps are batch 1: they would pass
    done = run_cli("serve-bench", exported.folder, *options, timeout=180)
    assert done.returncode == 1, (done.stdout, done.stderr)
    report = json.loads(done.stdout)
    assert report["errors"] == report["requests"] == 6
    for api in APIS:
        assert report["runs"][api]["first_error"]["status"] == 413, report["runs"][api]
        assert f"{api}: every request failed (2 of 2); the first answered 413" in done.stderr
    assert "every request failed (6 of 6)" in done.stderr, done.stderr
    assert "at most 64" in done.stderr, done.stderr


def test_serve_bench_stream_fraction_help_matches_what_it_does():
    from typer.main import get_command

    from lstm_export.cli import app

    bench = get_command(app).commands["serve-bench"]
    (option,) = [p for p in bench.params if p.name == "stream_fraction"]
    # load_test applies it per request (see test_load_test_runs_every_api_on_one_server...).
    assert "request" in option.help and "clients that stream" not in option.help, option.help
    (option,) = [p for p in bench.params if p.name == "apis"]
    assert option.default.split(",") == APIS


@pytest.mark.slow
def test_serve_bench_cli_starts_loads_and_stops_a_server(exported, tmp_path):
    options = ["--clients", "2", "--requests", "4", "--seq", "3", "--batch", "1", "--json"]
    done = run_cli("serve-bench", exported.folder, *options, timeout=180)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["errors"] == 0 and report["requests"] == 3 * 8
    assert list(report["runs"]) == APIS
    for api, run in report["runs"].items():
        assert run["predict"]["count"] == run["stream_step"]["count"] == 4, api
        assert run["requests_per_s"] > 0


@pytest.mark.slow
def test_serve_bench_apis_selects_and_orders_the_runs(exported):
    options = ["--clients", "1", "--requests", "2", "--seq", "2", "--batch", "2"]
    done = run_cli("serve-bench", exported.folder, *options, "--apis", "v2-binary, v1")
    assert done.returncode == 0, done.stderr
    rows = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("v")]
    assert rows == ["v2-binary", "v1"], done.stdout
    assert "(ratio) against v2-binary" in " ".join(done.stdout.split()), done.stdout
    assert all(len(line) <= 80 for line in done.stdout.splitlines()), done.stdout
    assert "v2-json" not in done.stdout


def test_serve_bench_refuses_unknown_apis_before_starting_a_server(exported):
    done = run_cli("serve-bench", exported.folder, "--apis", "v1,v3", timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.strip().splitlines() == [
        "error: apis must name one or more of v1, v2-json, v2-binary, each once; got ['v1', 'v3']"
    ]


def test_serve_bench_reports_a_server_that_cannot_start(tmp_path):
    done = run_cli("serve-bench", tmp_path / "nope", timeout=180)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: the server did not start: expected an export folder or a .onnx file, "
        f"but {tmp_path / 'nope'} does not exist"
    ]


@pytest.mark.slow
def test_serve_bench_of_a_batch_first_bidirectional_model_sends_only_what_it_can_run(tmp_path):
    """x in the model's own layout on /v1 (batch-first on /v2), y of 2 x hidden features, and
    no stream steps where the model cannot stream: every request of every API is answered,
    and a note says why there were no stream steps."""
    config = LSTMConfig(5, 8, 1, False, batch_first=True, bidirectional=True)
    folder = export(build_model(config, seed=4), tmp_path / "bibf").out_dir
    options = ["--clients", "1", "--requests", "4", "--seq", "3", "--batch", "2", "--json"]
    done = run_cli("serve-bench", folder, *options, timeout=180)
    assert done.returncode == 0, (done.stdout, done.stderr)
    report = json.loads(done.stdout)
    assert report["errors"] == 0, report["first_error"]
    for api, run in report["runs"].items():
        assert run["predict"]["count"] == 4 and run["stream_step"]["count"] == 0, api
    assert report["stream_fraction"] == 0.0
    assert "cannot stream" in report["notes"][0]


def test_serve_bench_fails_when_one_api_measured_nothing(call_main, monkeypatch, tmp_path):
    """A side-by-side with one empty side is no comparison: exit 1, naming the API."""
    from lstm_export.benchmarks import load

    def run(requests: int, errors: int) -> dict:
        first = None if not errors else {"status": 415, "error": "send it as JSON"}
        return {"requests": requests, "errors": errors, "first_error": first}

    runs = {"v1": run(4, 0), "v2-json": run(4, 4), "v2-binary": run(4, 1)}
    report = {"requests": 12, "errors": 5, "first_error": runs["v2-json"]["first_error"]}
    report |= {"runs": runs, "notes": []}
    monkeypatch.setattr(load, "serve_and_load_test", lambda folder, **options: report)
    code, out, err = call_main("serve-bench", tmp_path, "--json")
    assert code == 1, (out, err)
    assert json.loads(out)["runs"]["v2-json"]["errors"] == 4
    assert "every request to v2-json failed" in err and "v2-binary" not in err.split("error:")[-1]
    # With every API measuring something, the same report passes.
    runs["v2-json"] = run(4, 3)
    code, out, err = call_main("serve-bench", tmp_path, "--json")
    assert code == 0, (out, err)
