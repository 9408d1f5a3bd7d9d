"""`serve-bench`: a load generator for the HTTP server, stdlib and numpy only, and its verdict.

`load_test` drives a running server from client threads (http.client, one keep-alive
connection each) with one workload, once per API, one API after the other: `v1` (the /v1
JSON API), `v2-json` and `v2-binary` (the Open Inference Protocol with JSON tensors, and with
Triton's binary tensors; requests built by `v2_requests`). It reports each run's requests/s,
p50/p99/mean latencies, errors and first error side by side, with ratios against the first
run (v1). `serve_and_load_test` first starts the server in a child process (the library's
entry point, `python -m lstm_export.serving.http`), so that the clients' threads do not share
its GIL. `all_failed`, `first_error_reason` and `error_lines` are the verdict on a report.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lstm_export.benchmarks import v2_requests as v2
from lstm_export.benchmarks.load_clients import STREAM_BATCH, Workload, error_message, run_api
from lstm_export.config import positive_int
from lstm_export.errors import UsageError

APIS = ("v1", "v2-json", "v2-binary")
"""The APIs a load test can run, in the order it runs them by default."""


def checked_apis(apis: Sequence[str]) -> tuple[str, ...]:
    """`apis` as a tuple, each one of APIS and none twice; a UsageError otherwise."""
    chosen = tuple(apis)
    unknown = [name for name in chosen if name not in APIS]
    if not chosen or unknown or len(set(chosen)) != len(chosen):
        raise UsageError(
            f"apis must name one or more of {', '.join(APIS)}, each once; got {list(chosen)}"
        )
    return chosen


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else round(value / base, 3)


def load_test(
    base_url: str,
    *,
    clients: int,
    requests: int,
    seq: int,
    batch: int,
    stream_fraction: float,
    apis: Sequence[str] = APIS,
    timeout: float = 30.0,
    max_seconds: float = 300.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Drive a running server from `clients` threads, `requests` requests each, once per API
    in `apis` (one run after the other, on the same server); time them.

    The workload is the same in every run: predicts of x [batch sequences, seq steps]
    (/v1 in the model's layout, /v2 batch-first), and a `stream_fraction` of each client's
    requests that are chunks of seq steps at batch 1 on a state of its own (a /v1 stream,
    or a /v2 sequence: Triton's sequence batcher takes batch 1), with the same x values.
    Each client first sends one untimed predict. An answer counts when it is a 200 with y
    of the right shape (checked after its time is taken). Stdlib and numpy only (http.client,
    one keep-alive connection per client). Bounded: per run at most clients x requests
    requests, each with `timeout` seconds, and no new request after `max_seconds`.

    Returns the settings, each run's requests/s (successful requests over wall time),
    p50/p99/mean ms (all, predicts, stream steps), errors and first error (`status`, 0: no
    answer; `error`), its ratios against the first run (the `baseline`), and the totals.
    """
    for name, value in (("clients", clients), ("requests", requests), ("seq", seq)):
        positive_int(name, value)
    positive_int("batch", batch)
    apis = checked_apis(apis)
    if not 0.0 <= stream_fraction <= 1.0:
        raise UsageError(f"stream_fraction must be between 0 and 1, got {stream_fraction!r}")
    parts = urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        raise UsageError(f"base_url must look like http://127.0.0.1:8000, got {base_url!r}")
    host, port = parts.hostname, parts.port or 80
    info = _get(host, port, timeout, "/v1/model", base_url)
    model = str(info["name"])
    if any(api != "v1" for api in apis):  # the model under its /v1 name on /v2 too
        _get(host, port, timeout, v2.model_path(model), base_url)
    config = info["config"]
    notes = []
    if stream_fraction and not info.get("streaming", True):  # a bidirectional model
        notes.append(f"{base_url} serves a model that cannot stream; every request is a predict")
        stream_fraction = 0.0
    if stream_fraction:
        notes.append(
            f"stream steps are chunks of {seq} steps at batch {STREAM_BATCH} in every API "
            f"(/v1 streams too, as /v2 sequences must be); predicts are batch {batch}"
        )
    if "v1" in apis and len(apis) > 1:
        notes.append("/v1 answers carry y, hn and cn; /v2 requests ask for y alone")
    work = Workload(
        host=host,
        port=port,
        timeout=timeout,
        max_seconds=max_seconds,
        seed=seed,
        clients=clients,
        requests=requests,
        seq=seq,
        batch=batch,
        stream_fraction=stream_fraction,
        model=model,
        input_size=config["input_size"],
        output_size=config["hidden_size"] * (2 if config.get("bidirectional") else 1),
        batch_first=bool(config.get("batch_first", False)),
        sequence_base=random.SystemRandom().randrange(1, 1 << 62),
    )
    runs = {api: run_api(api, work, position) for position, api in enumerate(apis)}
    baseline = runs[apis[0]]
    for run in runs.values():
        run["vs_baseline"] = {
            "requests_per_s": _ratio(run["requests_per_s"], baseline["requests_per_s"]),
            "p50": _ratio(run["latency"]["p50_ms"], baseline["latency"]["p50_ms"]),
            "p99": _ratio(run["latency"]["p99_ms"], baseline["latency"]["p99_ms"]),
            **{
                f"{kind}_p50": _ratio(run[kind]["p50_ms"], baseline[kind]["p50_ms"])
                for kind in ("predict", "stream_step")
            },
        }
    first = next(({"api": a, **r["first_error"]} for a, r in runs.items() if r["errors"]), None)
    return {
        "clients": clients,
        "requests_per_client": requests,
        "seq": seq,
        "batch": batch,
        "stream_batch": STREAM_BATCH,
        "stream_fraction": stream_fraction,
        "model": model,
        "apis": list(apis),
        "baseline": apis[0],
        "requests": sum(r["requests"] for r in runs.values()),
        "errors": sum(r["errors"] for r in runs.values()),
        "first_error": first,
        "runs": runs,
        "notes": notes,
    }


def _get(host: str, port: int, timeout: float, path: str, base_url: str) -> dict[str, Any]:
    """GET `path`'s JSON answer; a UsageError unless it is a 200."""
    probe = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        probe.request("GET", path)
        answer = probe.getresponse()
        status, data = answer.status, answer.read()
    except (OSError, http.client.HTTPException) as exc:
        raise UsageError(f"cannot reach {base_url}: {exc}") from None
    finally:
        probe.close()
    if status != 200:
        raise UsageError(f"GET {base_url}{path} answered {status}: {error_message(data)}")
    return json.loads(data)


def serve_and_load_test(export_dir: Path | str, **load: Any) -> dict[str, Any]:
    """Start the server (`python -m lstm_export.serving.http`) on a free loopback port in a
    child process, once, and `load_test` it (every API of `apis`, one after the other).

    A child process, so that the clients' threads do not share the server's GIL.
    `load` goes to `load_test`; the server is stopped with SIGTERM afterwards.
    """
    if "apis" in load:  # refused before a server is started for nothing
        load["apis"] = checked_apis(load["apis"])
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
    """Why the first failed request failed, as one clause ("" when none failed); a whole
    report's names the API (the first run that had an error), a run's does not."""
    first = report["first_error"]
    if first is None:
        return ""
    api = f"{first['api']}: " if "api" in first else ""
    return f"{api}the first answered {first['status']}: {first['error']}"


def error_lines(report: dict[str, Any]) -> list[str]:
    """One line per API whose run had errors: how many, and why the first failed."""
    lines = []
    for api, run in report["runs"].items():
        if run["errors"]:
            share = "every request failed" if all_failed(run) else "requests failed"
            counts = f"{run['errors']} of {run['requests']}"
            lines.append(f"{api}: {share} ({counts}); {first_error_reason(run)}")
    return lines
