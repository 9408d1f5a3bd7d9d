"""`lstm-export serve` in a subprocess on a free loopback port, for the tests that drive it.

Imported as `from server_process import ...` (tests/ is on sys.path). Only 127.0.0.1 is
ever contacted; every server is stopped by the test that started it.
"""

from __future__ import annotations

import http.client
import json
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from helpers import small_model
from lstm_export.pipeline import export
from lstm_export.runtime.onnx import OnnxLSTM

LOOPBACK = "127.0.0.1"
TIMEOUT = 30  # seconds, per request
LIMITS = {
    "max_body_bytes": 64 * 1024,
    "max_seq_len": 64,
    "max_batch": 4,
    "max_elements": 200,  # under max_seq_len x max_batch, so that it is the limit that bites
    "max_streams": 64,
    "stream_ttl": 120.0,
    "header_timeout": 10.0,
    "body_timeout": 30.0,
    "write_timeout": 30.0,
    "max_connections": 64,
    "max_bytes_in_flight": 64 * 1024 * 1024,
    "shutdown_timeout": 1.0,
}


@dataclass
class Exported:
    """A small LayerNorm model, its export folder, and that folder's onnxruntime runtime."""

    model: torch.nn.Module
    folder: Path
    runtime: OnnxLSTM


def small_export(folder: Path) -> Exported:
    """The model most server tests serve: 2 layers, input 5, hidden 8, seed 3."""
    model = small_model(True, 2, seed=3)
    out = export(model, folder).out_dir
    return Exported(model, out, OnnxLSTM(out, threads=1))


class Server:
    """`lstm-export serve DIR --port 0` in a subprocess; its port read off its log."""

    def __init__(
        self,
        folder: Path,
        log_path: Path,
        *,
        files: int | None = None,
        flags: tuple[str, ...] = (),
        **limits: float,
    ) -> None:
        """`limits` override LIMITS (as --max-body-bytes etc.); `flags` are more of serve's
        options as given on its command line (["--expose-state"])."""
        options = []
        for key, value in {**LIMITS, **limits}.items():
            options += [f"--{key.replace('_', '-')}", str(value)]
        self.log_path = log_path
        self.log_file = log_path.open("wb")
        command = [sys.executable, "-m", "lstm_export.cli", "serve", str(folder)]
        command += ["--host", LOOPBACK, "--port", "0", *options, *flags]
        self.proc = subprocess.Popen(
            command,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=None if files is None else lambda: file_limit(files),
        )
        self.port = self._wait_for_port()

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = re.search(rf"http://{re.escape(LOOPBACK)}:(\d+)", self.log())
            if found:
                return int(found.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"the server did not start:\n{self.log()}")

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log_file.close()
        return self.proc.returncode


def file_limit(files: int) -> None:
    """In a child before exec: at most `files` open files, soft and hard (ulimit -n)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))


@dataclass
class Reply:
    status: int
    data: dict
    headers: dict[str, str]


class Client:
    """One keep-alive HTTP/1.1 connection; every answer must be JSON."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection(LOOPBACK, port, timeout=TIMEOUT)

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        payload = raw if raw is not None else None if body is None else json.dumps(body).encode()
        if headers is None:
            headers = {} if payload is None else {"Content-Type": "application/json"}
        self.conn.request(method, path, body=payload, headers=headers)
        response = self.conn.getresponse()
        text = response.read()
        assert response.getheader("content-type") == "application/json", text[:200]
        return Reply(response.status, json.loads(text), dict(response.getheaders()))

    def predict(self, x: np.ndarray, state=None) -> Reply:
        body = {"x": x.tolist()}
        if state is not None:
            body |= {"h0": state[0].tolist(), "c0": state[1].tolist()}
        return self.call("POST", "/v1/predict", body)

    def close(self) -> None:
        self.conn.close()


@contextmanager
def running_server(folder: Path, log_path: Path, **options: object) -> Iterator[Server]:
    """A Server for the block, then stopped: it must exit 0."""
    running = Server(folder, log_path, **options)
    try:
        yield running
    finally:
        code = running.stop()
        assert code == 0, running.log()
