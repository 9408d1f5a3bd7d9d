"""One API's run of `serve-bench`'s load test: client threads, each on one keep-alive
connection (http.client), that send the same workload through /v1 or /v2 (JSON or binary
tensors), time each request, check each answer, and count errors; `run_api` merges them.

`load` sets the workload up and runs one API after the other; `v2_requests` builds the /v2
requests and checks their answers. Stdlib and numpy only.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from lstm_export.benchmarks import v2_requests as v2

STREAM_BATCH = 1
"""Sequences per stream step in every API: Triton's sequence batcher takes one per request."""
JSON_HEADERS = {"Content-Type": "application/json"}
KINDS = ("predict", "stream_step")
Request = tuple[str, str, bytes | None, dict[str, str]]
"""What a client sends: method, path, body, headers."""


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def _summary(latencies: list[float]) -> dict[str, Any]:
    ms = sorted(1000 * t for t in latencies)
    p50, p99 = _percentile(ms, 0.50), _percentile(ms, 0.99)
    return {
        "count": len(ms),
        "p50_ms": None if p50 is None else round(p50, 3),
        "p99_ms": None if p99 is None else round(p99, 3),
        "mean_ms": round(sum(ms) / len(ms), 3) if ms else None,
    }


@dataclass(frozen=True)
class Workload:
    """What every run of one load test shares: the server, the requests, the model's sizes."""

    host: str
    port: int
    timeout: float
    max_seconds: float
    seed: int
    clients: int
    requests: int
    seq: int
    batch: int
    stream_fraction: float
    model: str  # its name, under /v1 and /v2 alike
    input_size: int
    output_size: int
    batch_first: bool
    sequence_base: int  # /v2 sequence ids: this load test's alone, whoever else uses the server


class _Client:
    """One client thread of one run: its connection, its requests (built before the run, the
    same x in every API), their timings and its errors. Subclasses say how to ask."""

    def __init__(self, run: _Run, index: int) -> None:
        self.run, work = run, run.work
        self.work = work
        rng = random.Random(work.seed * 1_000_003 + index)
        rows = [[rng.uniform(-1, 1) for _ in range(work.input_size)] for _ in range(work.batch)]
        # One step of every row, repeated seq times, batch-first; chunks take the first row.
        self.x = np.repeat(np.asarray(rows, np.float32)[:, None, :], work.seq, axis=1)
        self.index = index
        self.conn = self.connect()
        self.times: dict[str, list[float]] = {kind: [] for kind in KINDS}
        self.errors = 0
        self.first: tuple[float, int, str] | None = None  # (when, status, message)

    def connect(self) -> http.client.HTTPConnection:
        work = self.work
        return http.client.HTTPConnection(work.host, work.port, timeout=work.timeout)

    def send(self, request: Request) -> tuple[int, str | None, bytes]:
        """(status, its Inference-Header-Content-Length, body); status 0: no answer."""
        method, path, body, headers = request
        try:
            self.conn.request(method, path, body=body, headers=headers)
            response = self.conn.getresponse()
            return response.status, response.getheader(v2.HEADER_LENGTH), response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.conn.close()
            self.conn = self.connect()
            return 0, None, f"no answer to {method} {path}: {exc!r}".encode()

    def failed(self, status: int, message: str) -> None:
        if self.first is None:
            self.first = (time.perf_counter(), status, message)

    def main(self) -> None:
        run = self.run
        try:
            self.open()
            self.send(self.predict_request())  # warm-up, untimed: a connection, a first run
            with contextlib.suppress(threading.BrokenBarrierError):
                run.gate.wait(self.work.timeout)
            for k, is_step in enumerate(run.schedule):
                if time.perf_counter() > run.deadline:
                    break
                last = k == run.last_step
                request = self.step_request(last) if is_step else self.predict_request()
                if request is None:  # its stream could not be opened: recorded there
                    self.errors += 1
                    continue
                began = time.perf_counter()
                status, header_length, data = self.send(request)
                elapsed = time.perf_counter() - began
                if status != 200:
                    problem = error_message(data)
                else:  # checked after its time is taken
                    problem = self.problem(is_step, header_length, data)
                if problem is not None:
                    self.errors += 1
                    self.failed(status, problem)
                    continue
                self.times[KINDS[is_step]].append(elapsed)
                if is_step:
                    self.stepped(last)
            self.close()
        finally:
            self.conn.close()

    def y_shape(self, is_step: bool) -> tuple[int, int, int]:
        """y's shape, batch-first, for a predict or a stream step."""
        batch = STREAM_BATCH if is_step else self.work.batch
        return (batch, self.work.seq, self.work.output_size)

    def predict_request(self) -> Request:
        raise NotImplementedError

    def step_request(self, last: bool) -> Request | None:
        """The next stream step (`last`: the last one of the run); None: it cannot be sent."""
        raise NotImplementedError

    def problem(self, is_step: bool, header_length: str | None, data: bytes) -> str | None:
        """Why a 200 answer is not the one asked for (y of the right shape), or None."""
        raise NotImplementedError

    def open(self) -> None:
        """Untimed, before the run: what its stream steps need."""

    def close(self) -> None:
        """Untimed, after the run: release what `open` or the steps took."""

    def stepped(self, last: bool) -> None:
        """A stream step was answered as it should be."""


class _V1Client(_Client):
    """Predicts on /v1/predict; steps on a stream of its own (opened and deleted untimed); x and
    y in the model's own layout, nested JSON lists."""

    def __init__(self, run: _Run, index: int) -> None:
        super().__init__(run, index)
        self.predict_body = self.json_x(self.x)
        self.step_body = self.json_x(self.x[:STREAM_BATCH])
        self.stream_path: str | None = None

    def layout(self, array: np.ndarray) -> np.ndarray:
        return array if self.work.batch_first else array.transpose(1, 0, 2)

    def json_x(self, x: np.ndarray) -> bytes:
        return json.dumps({"x": self.layout(x).tolist()}).encode()

    def open(self) -> None:
        if not any(self.run.schedule):
            return
        body = json.dumps({"batch": STREAM_BATCH}).encode()
        status, _, data = self.send(("POST", "/v1/streams", body, JSON_HEADERS))
        with contextlib.suppress(ValueError, KeyError, TypeError):  # a 201 without its url
            self.stream_path = json.loads(data)["url"] + "/step" if status == 201 else None
        if self.stream_path is None:
            self.failed(status, error_message(data))

    def predict_request(self) -> Request:
        return "POST", "/v1/predict", self.predict_body, JSON_HEADERS

    def step_request(self, last: bool) -> Request | None:
        if self.stream_path is None:
            return None
        return "POST", self.stream_path, self.step_body, JSON_HEADERS

    def problem(self, is_step: bool, header_length: str | None, data: bytes) -> str | None:
        batch, seq, size = self.y_shape(is_step)
        want = (batch, seq, size) if self.work.batch_first else (seq, batch, size)
        try:
            y = np.asarray(json.loads(data)["y"], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            return f"the answer has no y of numbers: {exc}"
        if y.shape != want:
            return f"y has shape {list(y.shape)}, expected {list(want)}"
        return None

    def close(self) -> None:
        if self.stream_path is not None:
            self.send(("DELETE", self.stream_path.removesuffix("/step"), None, {}))


class _V2Client(_Client):
    """Infer requests to /v2/models/{name}/infer, x and y batch-first, JSON or binary tensors;
    steps are the requests of one sequence of its own (started by its first successful step,
    ended by its last, or by one more request if the run stopped early)."""

    def __init__(self, run: _Run, index: int, binary: bool) -> None:
        super().__init__(run, index)
        self.binary = binary
        self.path = v2.model_path(self.work.model) + "/infer"
        self.predict = self.infer(self.x, None)
        sequence_id = run.sequence_base + index
        chunk = self.x[:STREAM_BATCH]
        self.steps = {
            (start, end): self.infer(
                chunk, v2.sequence_parameters(sequence_id, start=start, end=end)
            )
            for start in (False, True)
            for end in (False, True)
        }
        self.started = self.ended = False

    def infer(self, x: np.ndarray, parameters: dict | None) -> Request:
        body, headers = v2.infer_request(x, binary=self.binary, parameters=parameters)
        return "POST", self.path, body, headers

    def predict_request(self) -> Request:
        return self.predict

    def step_request(self, last: bool) -> Request:
        return self.steps[(not self.started, last)]

    def problem(self, is_step: bool, header_length: str | None, data: bytes) -> str | None:
        return v2.answer_problem(data, header_length, self.y_shape(is_step), self.binary)

    def stepped(self, last: bool) -> None:
        self.started = True
        self.ended = last

    def close(self) -> None:
        if self.started and not self.ended:  # the run stopped early: release the sequence
            self.send(self.steps[(False, True)])


class _Run:
    """One API's run (the `position`th of its load test): its clients started together,
    their numbers merged."""

    def __init__(self, api: str, work: Workload, position: int) -> None:
        self.api, self.work = api, work
        self.sequence_base = work.sequence_base + position * work.clients
        n, total = round(work.requests * work.stream_fraction), work.requests
        # Spread each client's stream steps evenly among its predicts (a Bresenham schedule).
        self.schedule = [
            math.floor((k + 1) * n / total) > math.floor(k * n / total) for k in range(total)
        ]
        self.last_step = max((k for k, s in enumerate(self.schedule) if s), default=-1)
        self.gate = threading.Barrier(work.clients)
        self.deadline = math.inf

    def client(self, index: int) -> _Client:
        if self.api == "v1":
            return _V1Client(self, index)
        return _V2Client(self, index, binary=self.api == "v2-binary")

    def __call__(self) -> dict[str, Any]:
        work = self.work
        clients = [self.client(i) for i in range(work.clients)]
        threads = [threading.Thread(target=c.main, daemon=True) for c in clients]
        began = time.perf_counter()
        self.deadline = began + work.max_seconds
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(work.max_seconds + work.timeout * 3)
        wall = time.perf_counter() - began
        times = {kind: [t for c in clients for t in c.times[kind]] for kind in KINDS}
        done = sum(map(len, times.values()))
        errors = sum(c.errors for c in clients)
        first = min((c.first for c in clients if c.first is not None), default=None)
        return {
            "requests": done + errors,
            "errors": errors,
            "first_error": None if first is None else {"status": first[1], "error": first[2]},
            "seconds": round(wall, 3),
            "requests_per_s": round(done / wall, 1) if wall > 0 else None,
            "latency": _summary(times["predict"] + times["stream_step"]),
            **{kind: _summary(times[kind]) for kind in KINDS},
        }


def error_message(data: bytes) -> str:
    """The server's one sentence from an error answer, or the start of whatever came back."""
    try:
        return str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        return data[:200].decode("utf-8", "replace")


def run_api(api: str, work: Workload, position: int) -> dict[str, Any]:
    """`api`'s run of `work`, the `position`th run of its load test: its requests, errors,
    first error, wall time, requests/s and latencies (all, predicts, stream steps)."""
    return _Run(api, work, position)()
