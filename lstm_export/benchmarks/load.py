"""`serve-bench`: a load generator for the HTTP server, stdlib only, and its verdict.

`load_test` drives a running server from client threads (http.client, one keep-alive
connection each) and reports requests/s, p50/p99 latencies and the first error;
`serve_and_load_test` first starts the server in a child process (the library's entry
point, `python -m lstm_export.serving.http`), so that the clients' threads do not share its
GIL. `all_failed` and `first_error_reason` are the pass/fail decision on a report.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lstm_export.config import positive_int
from lstm_export.errors import UsageError


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


def load_test(
    base_url: str,
    *,
    clients: int,
    requests: int,
    seq: int,
    batch: int,
    stream_fraction: float,
    timeout: float = 30.0,
    max_seconds: float = 300.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Drive a running server from `clients` threads, `requests` requests each; time them.

    A `stream_fraction` of each client's requests are steps on one stream of its own
    (created before and deleted after, untimed); the rest are whole-sequence predicts.
    Every request sends x of shape [seq, batch, input_size]. Stdlib only (http.client,
    one keep-alive connection per client). Bounded: at most clients x requests requests,
    each with `timeout` seconds, and no new request after `max_seconds`.

    Returns requests/s (successful requests over wall time), p50/p99/mean ms for predicts
    and stream steps, the number of errors (non-2xx answers and failed requests) and the
    first error's `status` (0: no answer) and `error` message, so that a run in which the
    server refused everything says why.
    """
    for name, value in (("clients", clients), ("requests", requests), ("seq", seq)):
        positive_int(name, value)
    positive_int("batch", batch)
    if not 0.0 <= stream_fraction <= 1.0:
        raise UsageError(f"stream_fraction must be between 0 and 1, got {stream_fraction!r}")
    parts = urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        raise UsageError(f"base_url must look like http://127.0.0.1:8000, got {base_url!r}")
    host, port = parts.hostname, parts.port or 80

    def connect() -> http.client.HTTPConnection:
        return http.client.HTTPConnection(host, port, timeout=timeout)

    probe = connect()
    try:
        probe.request("GET", "/v1/model")
        answer = probe.getresponse()
        info = json.loads(answer.read())
        if answer.status != 200:
            raise UsageError(f"GET {base_url}/v1/model answered {answer.status}: {info}")
    except OSError as exc:
        raise UsageError(f"cannot reach {base_url}: {exc}") from None
    finally:
        probe.close()
    config = info["config"]
    input_size = config["input_size"]
    batch_first = bool(config.get("batch_first", False))
    notes = []
    if stream_fraction and not info.get("streaming", True):  # a bidirectional model
        notes.append(f"{base_url} serves a model that cannot stream; every request is a predict")
        stream_fraction = 0.0
    headers = {"Content-Type": "application/json"}
    n_stream = round(requests * stream_fraction)
    # Spread each client's stream steps evenly among its predicts (a Bresenham schedule).
    schedule = [
        math.floor((k + 1) * n_stream / requests) > math.floor(k * n_stream / requests)
        for k in range(requests)
    ]
    lock = threading.Lock()
    predict_times: list[float] = []
    step_times: list[float] = []
    errors = 0
    first_error: tuple[float, int, str] | None = None  # (when, status, message)
    start_gate = threading.Barrier(clients)
    deadline = [0.0]

    def client(index: int) -> None:
        nonlocal errors, first_error
        rng = random.Random(seed * 1_000_003 + index)
        rows = [[rng.uniform(-1, 1) for _ in range(input_size)] for _ in range(batch)]
        # One step of every row, repeated seq times, in the model's own layout.
        x = [[row] * seq for row in rows] if batch_first else [rows] * seq
        body = json.dumps({"x": x}).encode()
        conn = connect()
        mine_p, mine_s, mine_errors = [], [], 0
        mine_first: tuple[float, int, str] | None = None

        def send(method: str, path: str, payload: bytes | None) -> tuple[int, bytes]:
            nonlocal conn, mine_first
            try:
                conn.request(method, path, body=payload, headers=headers)
                response = conn.getresponse()
                status, data = response.status, response.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = connect()
                status, data = 0, f"no answer to {method} {path}: {exc!r}".encode()
            if status >= 300 and mine_first is None:
                mine_first = (time.perf_counter(), status, _error_message(data))
            return status, data

        try:
            stream_path = None
            if n_stream:
                status, data = send("POST", "/v1/streams", json.dumps({"batch": batch}).encode())
                if status == 201:
                    stream_path = json.loads(data)["url"] + "/step"
            with contextlib.suppress(threading.BrokenBarrierError):
                start_gate.wait(timeout)
            for is_step in schedule:
                if time.perf_counter() > deadline[0]:
                    break
                if is_step and stream_path is None:  # its creation failed: recorded above
                    mine_errors += 1
                    continue
                began = time.perf_counter()
                status, _ = send("POST", stream_path if is_step else "/v1/predict", body)
                elapsed = time.perf_counter() - began
                if status != 200:
                    mine_errors += 1
                elif is_step:
                    mine_s.append(elapsed)
                else:
                    mine_p.append(elapsed)
            if stream_path is not None:
                send("DELETE", stream_path.removesuffix("/step"), None)
        finally:
            conn.close()
            with lock:
                predict_times.extend(mine_p)
                step_times.extend(mine_s)
                errors += mine_errors
                if mine_first is not None and (first_error is None or mine_first < first_error):
                    first_error = mine_first

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    began = time.perf_counter()
    deadline[0] = began + max_seconds
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max_seconds + timeout * 3)
    wall = time.perf_counter() - began
    done = len(predict_times) + len(step_times)
    first = None if first_error is None else {"status": first_error[1], "error": first_error[2]}
    return {
        "clients": clients,
        "requests_per_client": requests,
        "seq": seq,
        "batch": batch,
        "stream_fraction": stream_fraction,
        "requests": done + errors,
        "errors": errors,
        "first_error": first,
        "seconds": round(wall, 3),
        "requests_per_s": round(done / wall, 1) if wall > 0 else None,
        "predict": _summary(predict_times),
        "stream_step": _summary(step_times),
        "notes": notes,
    }


def _error_message(data: bytes) -> str:
    """The server's one sentence from an error answer, or the start of whatever came back."""
    try:
        return str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        return data[:200].decode("utf-8", "replace")


def serve_and_load_test(export_dir: Path | str, **load: Any) -> dict[str, Any]:
    """Start the server (`python -m lstm_export.serving.http`) on a free loopback port in a
    child process, and `load_test` it.

    A child process, so that the clients' threads do not share the server's GIL.
    `load` goes to `load_test`; the server is stopped with SIGTERM afterwards.
    """
    command = [sys.executable, "-m", "lstm_export.serving.http", str(export_dir)]
    command += ["--port", "0", "--no-access-log", "--log-level", "warning"]
    child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        url = _ready_url(child, deadline=time.monotonic() + 120)
        return load_test(url, **load)
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _ready_url(child: subprocess.Popen, deadline: float) -> str:
    """The URL from the server's ready line, or the child's one-line error."""
    assert child.stderr is not None
    lines = []
    while time.monotonic() < deadline:
        line = child.stderr.readline()
        if not line:  # the child exited before it was ready
            break
        lines.append(line.strip())
        found = re.search(r"on (http://\S+) ", line)
        if found:
            return found.group(1)
    reason = lines[-1].removeprefix("error: ") if lines else "no output"
    raise UsageError(f"the server did not start: {reason}")


def all_failed(report: dict[str, Any]) -> bool:
    """Whether a run measured nothing (every request failed): it must not pass in CI."""
    return report["requests"] > 0 and report["errors"] == report["requests"]


def first_error_reason(report: dict[str, Any]) -> str:
    """Why the first failed request failed, as one clause ("" when none failed)."""
    first = report["first_error"]
    return "" if first is None else f"the first answered {first['status']}: {first['error']}"
