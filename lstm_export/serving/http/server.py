"""`lstm-export serve`: an HTTP server over the onnxruntime runtime, JSON in and out.

Built on Starlette and uvicorn, with orjson writing the answers (the `serve`
extra). One `OnnxLSTM` session is shared by every request; onnxruntime, JSON
parsing and JSON encoding run on a thread pool, off the event loop, so
concurrent requests overlap. Streams keep
their (h, c) on the server: each has an asyncio lock (FIFO), so concurrent
chunks to one stream run one after another in the order they arrived, and a
refused chunk leaves the stream as it was. Idle streams expire after a TTL
(checked on access and by a sweeper that sleeps between sweeps), and the
number of open streams is capped.

Every error is `{"error": "one sentence"}` with its status: 400 bad input,
404 unknown stream or route (no slash redirects), 405 wrong method, 413 over a
size limit, 415 a body not sent as `application/json`, 429 too many streams,
403 a POST or DELETE carrying an `Origin` header (sent by a web page).
The body limit is enforced before any JSON is parsed: first on Content-Length,
then by counting bytes as the body arrives. Bodies must be UTF-8 JSON sent as
`application/json`, which a web page cannot send cross-origin without a CORS
preflight (never granted here); an empty POST needs no preflight, so a POST or
DELETE carrying `Origin` is refused too: other sites cannot drive the server.
Each request's steps x batch is capped (`max_elements`), so that one request's
work and answer stay bounded however its shape splits between the two.

Connections are bounded below the app, in a subclass of uvicorn's h11 protocol
(`serve` always uses it): uvicorn itself has no deadline for receiving a request
(its keep-alive timer restarts on every byte), its `limit_concurrency` answers
plain text and does not bound open sockets, and its parser errors are plain
text. Here a request's line and headers must arrive within `header_timeout`
(counted from the connection's opening, or from the request's first byte on a
kept-alive connection) and its body within `body_timeout` of the headers, else
a JSON 408; an answer that backs up in the server (a client that does not read)
must drain within `write_timeout`, else the connection is dropped. Past
`max_connections`, a new connection is answered a JSON 503 (GET /healthz is
still answered); past `spare_connections` more it is closed at once. Request
bodies (by Content-Length) and answers not yet handed to the kernel count
against `max_bytes_in_flight`: a request or answer that would pass it gets a
JSON 503 with `Retry-After`. On SIGINT/SIGTERM requests in flight get
`shutdown_timeout`; connections still open then are answered 503 (or dropped).
onnxruntime's memory arena is off and glibc is asked to return freed memory, so
that the process shrinks back once abusive clients are gone.

Importing this module never imports torch, and works without the extra:
`ServerLimits` and `load_test` (a stdlib-only load generator) need nothing
more; `create_app` and `serve` say which extra to install.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import http.client
import json
import logging
import math
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from lstm_export.artifacts import MANIFEST_FILE, ONNX_FILE
from lstm_export.errors import UsageError
from lstm_export.files import read_manifest, sha256
from lstm_export.runtime.onnx import OnnxLSTM, Stream, session_options

try:  # the `serve` extra
    import h11
    import orjson
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import Response
    from starlette.routing import Route
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError:  # pragma: no cover - exercised only without the extra
    HAVE_FRAMEWORK = False
else:
    HAVE_FRAMEWORK = True

JSON = "application/json"
MiB = 1024 * 1024
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
log = logging.getLogger("uvicorn.error")  # uvicorn's own log: configured, shown with its lines


# --------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class ServerLimits:
    """What one request, one connection and the whole server may hold or take.

    Over a request's limit is a 413 (streams: 429); a request too slow to arrive is a 408;
    past the connection cap or the bytes in flight, a 503 with Retry-After.
    """

    max_body_bytes: int = 8 * MiB  # request body, checked before parsing
    max_seq_len: int = 4096  # time steps in one predict request or one stream chunk
    max_batch: int = 64  # sequences per request or stream
    # steps x batch per predict or chunk: bounds one request's compute and its answer
    # (8192 x hidden 256 floats is ~24 MB of JSON), which seq and batch alone do not.
    max_elements: int = 8192
    max_streams: int = 256  # open streams at once
    stream_ttl: float = 300.0  # seconds a stream may stay idle before it expires
    # Connections (see the module docstring).
    header_timeout: float = 10.0  # seconds for a request's line and headers to arrive
    body_timeout: float = 30.0  # seconds for its body to arrive, counted from its headers
    write_timeout: float = 30.0  # seconds for an answer backed up in the server to drain
    max_connections: int = 256  # connections open at once (and spare_connections more)
    # Request bodies (by Content-Length) plus answers not yet handed to the kernel.
    max_bytes_in_flight: int = 256 * MiB
    shutdown_timeout: float = 1.0  # seconds requests in flight get after SIGINT/SIGTERM

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value <= 0:
                raise UsageError(f"{f.name} must be a positive number, got {value!r}")
            if f.type != "float" and not isinstance(value, int):
                raise UsageError(f"{f.name} must be an integer, got {value!r}")
        if self.max_bytes_in_flight < self.max_body_bytes:
            raise UsageError(
                f"max_bytes_in_flight ({self.max_bytes_in_flight}) must be at least "
                f"max_body_bytes ({self.max_body_bytes}): a largest body would never fit"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class HTTPError(Exception):
    """An answer other than 200, with one sentence for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# --------------------------------------------------------------------------- JSON <-> arrays


def _reject_constant(name: str) -> None:
    raise HTTPError(
        400, f"the body holds {name}, which is not a finite number; send finite numbers"
    )


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def _parse(text: str) -> Any:
    """JSON text as Python values: orjson first, the stdlib for what orjson refuses.

    Parsing holds the GIL, so while a large body parses, the event loop (and /healthz) waits:
    orjson takes a third to a half of the time. It refuses NaN, Infinity and deep nesting without
    saying why, so anything it refuses goes to json.loads, whose errors name the problem.
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text, parse_constant=_reject_constant)


def decode_object(body: bytes, allowed: Sequence[str], required: Sequence[str] = ()) -> dict:
    """The body as a JSON object with only `allowed` keys; 400 with the reason otherwise.

    Only UTF-8 is read (RFC 8259; a BOM is skipped): json.loads would also read UTF-16 and
    UTF-32 bytes, in which the boolean check below could not see a `true`.
    """
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise HTTPError(
            400,
            f"the request body is not valid JSON: it must be UTF-8, but byte {exc.start} "
            f"is not ({exc.reason})",
        ) from None
    if not text.strip():
        if required:
            raise HTTPError(
                400, f"the request body is empty; send a JSON object with {required[0]!r}"
            )
        return {}
    try:
        data = _parse(text)
    except HTTPError:
        raise
    except RecursionError:
        raise HTTPError(400, "the request body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, an int of 4300+ digits
        raise HTTPError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HTTPError(400, f"the request body must be a JSON object, got {_json_type(data)}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise HTTPError(400, f"unknown key(s) {unknown}; expected some of {sorted(allowed)}")
    missing = [key for key in required if key not in data]
    if missing:
        raise HTTPError(400, f"missing key {missing[0]!r} in the request body")
    # Every value this API takes is a number or a list of numbers, and every key is checked
    # above, so a true/false literal anywhere in the text is a boolean where a number belongs
    # (numpy would otherwise read [1.5, true] as [1.5, 1.0]). json.loads of a str reads a
    # boolean only from these exact letters, so scanning the text parsed misses none.
    if "true" in text or "false" in text:
        raise HTTPError(400, "the body holds true or false where a number belongs; send numbers")
    return data


_KIND_NAMES = {"b": "booleans", "U": "strings", "S": "strings", "O": "null, objects or huge ints"}


def to_array(name: str, value: object) -> np.ndarray:
    """A JSON nested list of numbers as a float64 array; 400 for anything else."""
    if not isinstance(value, list):
        raise HTTPError(400, f"{name} must be a nested list of numbers, got {_json_type(value)}")
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        raise HTTPError(
            400, f"{name} must be a rectangular nested list of numbers (every row the same length)"
        ) from None
    if array.dtype.kind not in "iuf":
        found = _KIND_NAMES.get(array.dtype.kind, str(array.dtype))
        raise HTTPError(400, f"{name} must hold only numbers, found {found}")
    return array.astype(np.float64, copy=False)


def encode(data: dict[str, Any]) -> bytes:
    """JSON with arrays as nested lists. orjson writes each float32 in its shortest form that
    reads back to the same float32 (0.1, not 0.10000000149011612): exact, and ~15x faster and
    half the size of the stdlib's float64 digits."""
    plain = {
        k: np.ascontiguousarray(v) if isinstance(v, np.ndarray) else v for k, v in data.items()
    }
    return orjson.dumps(plain, option=orjson.OPT_SERIALIZE_NUMPY)


def is_json_type(content_type: str) -> bool:
    """Whether a Content-Type is application/json, with no charset or a UTF-8 one."""
    media, _, params = content_type.partition(";")
    if media.strip().lower() != JSON:
        return False
    for param in params.split(";"):
        name, _, value = param.partition("=")
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            return False
    return True


def describe_model(runtime: OnnxLSTM, limits: ServerLimits) -> dict[str, Any]:
    """What GET /v1/model answers: config, signature, artifacts' sha256, limits.

    With a manifest.json beside model.onnx, its artifacts and signature are reported, and
    the served file must match it (config and sha256): a tampered export does not start.
    """
    path = runtime.path
    digest = sha256(path)
    manifest_path = path.parent / MANIFEST_FILE
    # Bounded: a regular file under the size limit, JSON of limited depth; None when absent.
    manifest = read_manifest(path.parent) if path.name == ONNX_FILE else None
    if manifest is not None:
        try:
            recorded = manifest["artifacts"][path.name]["sha256"]
        except (KeyError, TypeError):
            raise UsageError(f"{manifest_path} is not a readable lstm-export manifest") from None
        if recorded != digest:
            raise UsageError(
                f"{path} does not match {manifest_path} (sha256 {digest[:12]}... but the "
                f"manifest says {str(recorded)[:12]}...); re-export it or remove the manifest"
            )
        if manifest.get("config") != runtime.config.to_dict():
            raise UsageError(f"{path}'s config does not match {manifest_path}")
    info: dict[str, Any] = {
        "name": (manifest or {}).get("name") or (path.parent.name or path.stem),
        "config": runtime.config.to_dict(),
        "signature": (manifest or {}).get("signature") or runtime.signature(),
        "served": path.name,
        "artifacts": {path.name: {"sha256": digest, "bytes": path.stat().st_size}},
        "limits": limits.to_dict(),
        "providers": runtime.providers,
    }
    if manifest is not None:
        info["artifacts"] = {
            name: {"sha256": entry.get("sha256"), "bytes": entry.get("bytes")}
            for name, entry in manifest["artifacts"].items()
            if isinstance(entry, dict)
        }
    return info


# --------------------------------------------------------------------------- streams


@dataclass(eq=False)
class StreamEntry:
    id: str
    stream: Stream
    last_used: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    busy: int = 0  # requests holding or waiting for this stream: never expired while > 0
    closed: bool = False


class StreamStore:
    """Open streams by id. Used from the event loop thread only, so it needs no lock."""

    def __init__(self, max_streams: int, ttl: float, clock: Callable[[], float] = time.monotonic):
        self.max_streams = max_streams
        self.ttl = ttl
        self.clock = clock
        self._streams: dict[str, StreamEntry] = {}

    def __len__(self) -> int:
        return len(self._streams)

    def _expired(self, entry: StreamEntry, now: float) -> bool:
        return entry.busy == 0 and now - entry.last_used > self.ttl

    def sweep(self) -> int:
        """Close idle streams past their TTL; how many were closed."""
        now = self.clock()
        expired = [e for e in self._streams.values() if self._expired(e, now)]
        for entry in expired:
            self._close(entry)
        return len(expired)

    def _close(self, entry: StreamEntry) -> None:
        entry.closed = True
        self._streams.pop(entry.id, None)

    def create(self, stream: Stream) -> StreamEntry:
        if len(self._streams) >= self.max_streams:
            self.sweep()
        if len(self._streams) >= self.max_streams:
            retry = max(1, math.ceil(self.ttl))
            raise HTTPError(
                429,
                f"too many open streams (limit {self.max_streams}); delete one, or retry once "
                f"idle streams expire (after {self.ttl:g} s)",
                {"Retry-After": str(retry)},
            )
        entry = StreamEntry(secrets.token_urlsafe(16), stream, self.clock())
        self._streams[entry.id] = entry
        return entry

    def get(self, stream_id: str) -> StreamEntry:
        entry = self._streams.get(stream_id)
        if entry is not None and self._expired(entry, self.clock()):
            self._close(entry)
            entry = None
        if entry is None:
            raise HTTPError(
                404,
                f"no open stream {stream_id!r}: it was never created, was deleted, "
                f"or expired after {self.ttl:g} s idle",
            )
        return entry

    def delete(self, stream_id: str) -> StreamEntry:
        entry = self.get(stream_id)
        self._close(entry)
        return entry


# --------------------------------------------------------------------------- load and memory

SMALL_ANSWER = 64 * 1024  # answers this small (errors, /healthz) are counted, never refused
TRIM_AFTER = 16 * MiB  # bytes in flight after which memory is handed back once they are gone


class Load:
    """What the server holds now: connections and bytes in flight (request bodies, answers).

    Used from the event loop thread only. `take` refuses what would pass the budget; `add`
    counts what is let through anyway (small answers); `peak` is the most held since memory
    was last trimmed.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.peak = 0
        self.connections = 0
        self.shutting_down = False

    def take(self, size: int) -> bool:
        if self.bytes + size > self.max_bytes:
            return False
        self.add(size)
        return True

    def add(self, size: int) -> None:
        self.bytes += size
        self.peak = max(self.peak, self.bytes)

    def give(self, size: int) -> None:
        self.bytes -= size

    def busy_message(self, size: int, what: str) -> str:
        return (
            f"the server is busy: {self.bytes} bytes of requests and answers are in flight, and "
            f"{what} of {size} bytes would pass its limit of {self.max_bytes} "
            "(--max-bytes-in-flight); retry shortly"
        )


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (mallopt, malloc_trim), else None (musl, macOS)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


M_MMAP_THRESHOLD = -3


def tune_malloc() -> None:
    """Serve large blocks (answers, bodies, arrays) from their own mappings, which free()
    returns to the OS at once: glibc otherwise raises its mmap threshold to the largest block
    freed (up to 32 MiB), and 24 MB answers then stay in the heap after they are freed."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MiB)


def trim_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; elsewhere nothing)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class _Notices:
    """Warnings about abusive clients, at most one line per kind every `every` seconds (with
    the count since the last line), so that a flood of bad connections cannot flood the log."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def __call__(self, kind: str, message: str) -> None:
        now = time.monotonic()
        self._count[kind] = self._count.get(kind, 0) + 1
        if now - self._last.get(kind, -math.inf) >= self.every:
            count = self._count.pop(kind)
            self._last[kind] = now
            more = f" ({count} times in the last {self.every:g} s)" if count > 1 else ""
            log.warning("%s%s", message, more)


# --------------------------------------------------------------------------- the service


class Service:
    """The endpoints' logic, over one shared runtime, a thread pool and the stream store."""

    def __init__(self, runtime: OnnxLSTM, limits: ServerLimits, workers: int) -> None:
        self.runtime = runtime
        self.limits = limits
        self.info = describe_model(runtime, limits)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="lstm-serve")
        self.store = StreamStore(limits.max_streams, limits.stream_ttl)
        self.load = Load(limits.max_bytes_in_flight)
        self.notice = _Notices()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def sweep_forever(self) -> None:
        interval = min(max(self.limits.stream_ttl / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(interval)
            closed = self.store.sweep()
            if closed:
                log.info("closed %d idle stream(s)", closed)

    async def trim_forever(self, interval: float = 0.5) -> None:
        """Once a burst of large requests is over (nothing in flight), return its memory."""
        while True:
            await asyncio.sleep(interval)
            if self.load.peak >= TRIM_AFTER and self.load.bytes == 0:
                self.load.peak = 0
                await self.call(trim_memory)

    async def body(self, request: Request) -> bytes:
        """The request body, refused with 413 as soon as it is known to exceed the limit.

        A body must come as `application/json` (else 415; a wrong type before the body is
        read): pages on other sites can POST text/plain or forms to 127.0.0.1 without asking,
        but not JSON. No body needs no Content-Type (POST /v1/streams).
        """
        content_type = request.headers.get("content-type")
        if content_type is not None and not is_json_type(content_type):
            raise HTTPError(
                415,
                f"send the body as Content-Type: application/json (UTF-8), not {content_type!r}",
                {"Connection": "close"},
            )
        limit = self.limits.max_body_bytes
        too_large = HTTPError(
            413,
            f"the request body is larger than this server's limit of {limit} bytes",
            {"Connection": "close"},
        )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
        except ClientDisconnect:
            raise HTTPError(400, "the client disconnected before sending the whole body") from None
        if content_type is None and size:
            raise HTTPError(
                415,
                "the request has a body but no Content-Type; "
                "send it with Content-Type: application/json",
            )
        return b"".join(chunks)

    def checked_x(self, value: object) -> np.ndarray:
        """x as an array, its size checked first on the lists' lengths: an x over the limits
        is refused before numpy converts it (the costly part of reading a request)."""
        rows = value[0] if isinstance(value, list) and value else None
        if isinstance(rows, list) and rows and isinstance(rows[0], list):  # [seq][batch][...]
            self.check_size(len(value), len(rows))
        x = to_array("x", value)
        if x.ndim == 3:
            self.check_size(*x.shape[:2])
        return x

    def check_size(self, seq: int, batch: int) -> None:
        """413 for too many steps, too large a batch or too many steps x batch in one x."""
        if seq > self.limits.max_seq_len:
            raise HTTPError(
                413,
                f"x has {seq} time steps; this server takes at most "
                f"{self.limits.max_seq_len} per request",
            )
        self.check_batch("x", batch)
        if seq * batch > self.limits.max_elements:
            raise HTTPError(
                413,
                f"x has {seq} steps x batch {batch} = {seq * batch} elements; this server "
                f"takes at most {self.limits.max_elements} per request: send fewer steps or "
                "a smaller batch",
            )

    def check_batch(self, name: str, batch: int) -> None:
        if batch > self.limits.max_batch:
            raise HTTPError(
                413,
                f"{name} has batch {batch}; this server takes at most {self.limits.max_batch}",
            )

    def checked_state(self, data: dict) -> tuple[np.ndarray, np.ndarray] | None:
        if ("h0" in data) != ("c0" in data):
            raise HTTPError(400, "h0 and c0 go together: send both or neither")
        if "h0" not in data:
            return None
        h0, c0 = to_array("h0", data["h0"]), to_array("c0", data["c0"])
        if h0.ndim == 3:
            self.check_batch("h0", h0.shape[1])
        return h0, c0

    # ---- work done on the thread pool

    def predict_work(self, body: bytes) -> bytes:
        data = decode_object(body, ("x", "h0", "c0"), required=("x",))
        x = self.checked_x(data["x"])
        state = self.checked_state(data)
        y, (h, c) = self.runtime.run(x, state)
        return encode({"y": y, "hn": h, "cn": c})

    def new_stream_work(self, body: bytes) -> Stream:
        data = decode_object(body, ("batch", "h0", "c0"))
        state = self.checked_state(data)
        batch = data.get("batch")
        if batch is not None:
            if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
                raise HTTPError(400, f"batch must be an integer >= 1, got {json.dumps(batch)}")
            self.check_batch("the stream", batch)
            if state is None:
                cfg = self.runtime.config
                zeros = np.zeros((cfg.num_layers, batch, cfg.hidden_size), np.float32)
                state = (zeros, zeros)
        if state is not None:
            state = self.runtime.check_state(state, batch)
        return self.runtime.stream(state)

    def step_work(self, entry: StreamEntry, body: bytes) -> dict[str, Any]:
        data = decode_object(body, ("x",), required=("x",))
        x = self.checked_x(data["x"])
        y = entry.stream.step(x)
        h, c = entry.stream.state
        return {"y": y, "hn": h, "cn": c, "steps": entry.stream.steps}

    # ---- endpoints

    async def healthz(self, request: Request) -> Response:
        load = self.load
        answer = {"status": "ok", "streams": len(self.store), "connections": load.connections}
        return _json(200, answer | {"bytes_in_flight": load.bytes})

    async def model(self, request: Request) -> Response:
        return _json(200, self.info)

    async def predict(self, request: Request) -> Response:
        body = await self.body(request)
        return Response(await self.call(self.predict_work, body), 200, media_type=JSON)

    async def create_stream(self, request: Request) -> Response:
        body = await self.body(request)
        stream = await self.call(self.new_stream_work, body)
        entry = self.store.create(stream)
        location = f"/v1/streams/{entry.id}"
        answer = {
            "id": entry.id,
            "url": location,
            "batch": stream.batch,
            "ttl_seconds": self.limits.stream_ttl,
        }
        return _json(201, answer, {"Location": location})

    async def step(self, request: Request) -> Response:
        body = await self.body(request)
        entry = self.store.get(request.path_params["stream_id"])
        entry.busy += 1
        try:
            async with entry.lock:  # FIFO: chunks run in the order they arrived
                if entry.closed:
                    raise HTTPError(404, f"stream {entry.id!r} was deleted")
                result = await self.call(self.step_work, entry, body)
        finally:
            entry.busy -= 1
            entry.last_used = self.store.clock()
        return Response(await self.call(encode, result), 200, media_type=JSON)

    async def stream_resource(self, request: Request) -> Response:
        """GET: the stream's batch, steps and idle time; DELETE: close it."""
        stream_id = request.path_params["stream_id"]
        if request.method == "DELETE":
            entry = self.store.delete(stream_id)
            return _json(200, {"deleted": entry.id, "steps": entry.stream.steps})
        return _json(200, self._describe(self.store.get(stream_id)))

    def _describe(self, entry: StreamEntry) -> dict[str, Any]:
        return {
            "id": entry.id,
            "batch": entry.stream.batch,
            "steps": entry.stream.steps,
            "idle_seconds": round(self.store.clock() - entry.last_used, 3),
            "ttl_seconds": self.limits.stream_ttl,
        }


def _json(status: int, data: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(encode(data), status, headers=headers, media_type=JSON)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return _json(status, {"error": message}, headers)


def _endpoint(handler: Callable[[Request], Awaitable[Response]]) -> Callable:
    """Our errors as JSON: HTTPError with its status, UsageError (bad input) as 400."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            _refuse_web_pages(request)
            return await handler(request)
        except HTTPError as exc:
            return _error(exc.status, exc.message, exc.headers)
        except UsageError as exc:
            return _error(400, str(exc))

    return wrapped


def _refuse_web_pages(request: Request) -> None:
    """403 for a POST or DELETE that a web page sent (browsers add `Origin` to those).

    The API is for programs; a page on another site can still send an empty POST without a
    preflight (it would open streams up to the cap), and JSON-only bodies do not stop that.
    """
    origin = request.headers.get("origin")
    if origin is not None and request.method in ("POST", "DELETE"):
        raise HTTPError(
            403,
            f"requests from web pages (Origin: {origin[:100]}) are refused: this API is for "
            "programs; send the request without an Origin header",
        )


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no route {request.url.path}; see GET /v1/model and the README's API section"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}"
    else:
        message = str(exc.detail)
    return _error(exc.status_code, message, dict(exc.headers or {}))


async def _internal_error(request: Request, exc: Exception) -> Response:
    return _error(500, "internal server error; the server log has the details")


def _require_framework() -> None:
    if not HAVE_FRAMEWORK:
        raise UsageError(
            "serving needs the 'serve' extra: pip install 'lstm-export[serve]' "
            "(starlette, uvicorn and orjson)"
        )


def create_app(
    export_dir: Path | str,
    limits: ServerLimits | None = None,
    *,
    runtime: OnnxLSTM | None = None,
    threads: int | None = 1,
    workers: int | None = None,
    optimization: str = "all",
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> Starlette:
    """The ASGI app over an export folder or .onnx file.

    `threads` is onnxruntime's intra-op threads per request (1: requests run in parallel
    instead), at most the CPU count; `workers` the size of the thread pool that runs requests
    (default: CPU count, at least 2), at most 4 x the CPU count. Pass `runtime` to share an
    already-loaded `OnnxLSTM` (then `export_dir` is ignored). onnxruntime's memory arena is
    off in the session built here: it would keep the peak of every burst for good.
    """
    _require_framework()
    limits = limits or ServerLimits()
    cpus = cpu_count()
    for name, value, most in (("threads", threads, cpus), ("workers", workers, 4 * cpus)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be an integer >= 1, got {value!r}")
        if value > most:
            rule = "the CPU count" if name == "threads" else "4 x the CPU count"
            raise UsageError(f"{name} must be at most {most} ({rule}, {cpus} here), got {value}")
    if runtime is None:
        options = session_options(threads, optimization)
        options.enable_cpu_mem_arena = False
        runtime = OnnxLSTM(export_dir, options=options, providers=providers)
    service = Service(runtime, limits, workers or max(2, cpus))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(functools.partial(_loop_error, service.notice))
        tasks = [asyncio.create_task(service.sweep_forever())]
        tasks.append(asyncio.create_task(service.trim_forever()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            service.pool.shutdown(wait=False, cancel_futures=True)

    routes = [
        Route("/healthz", _endpoint(service.healthz), methods=["GET"]),
        Route("/v1/model", _endpoint(service.model), methods=["GET"]),
        Route("/v1/predict", _endpoint(service.predict), methods=["POST"]),
        Route("/v1/streams", _endpoint(service.create_stream), methods=["POST"]),
        Route(
            "/v1/streams/{stream_id}",
            _endpoint(service.stream_resource),
            methods=["GET", "DELETE"],
        ),
        Route("/v1/streams/{stream_id}/step", _endpoint(service.step), methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_exception, Exception: _internal_error},
    )
    # A slash redirect is a 307 with an empty body; every answer here is JSON, so /healthz/
    # is a JSON 404 like any unknown route.
    app.router.redirect_slashes = False
    app.state.service = service
    return app


# --------------------------------------------------------------------------- connections

HEAD_LIMIT = 16 * 1024  # request line + headers: h11's own bound on an incomplete head
OVER_CAP_HEAD_SECONDS = 1.0  # a connection past the cap has this long to send its head
FD_RESERVE = 64  # file descriptors kept for the model, the log, the pool, the listener
# The listen backlog, which is also how many connections asyncio accepts in one go (each
# open until it is handled, and a few such batches can overlap): uvicorn's default, or a
# quarter of the files the limit leaves.
MAX_BACKLOG, MIN_BACKLOG, BATCHES = 2048, 16, 4


def spare_connections(max_connections: int) -> int:
    """Connections past the cap that are still read (and answered 503, or /healthz)."""
    return max(16, max_connections // 4)


def _raw_json(status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """A whole `Connection: close` answer as bytes, for where h11 cannot send one."""
    body = encode({"error": message})
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"content-type: {JSON}"]
    lines += [f"content-length: {len(body)}", "connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _json_start(status: int, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> dict:
    pairs = [("content-type", JSON), ("content-length", str(len(body))), *headers]
    return {
        "type": "http.response.start",
        "status": status,
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in pairs],
    }


def protocol_class(service: Service) -> type:
    """uvicorn's h11 protocol with this server's deadlines, caps and budget (see the module
    docstring). A class per server: its instances share `service`'s limits and load."""
    _require_framework()
    limits, load = service.limits, service.load
    spare = spare_connections(limits.max_connections)
    notice = service.notice
    retry = [("retry-after", "1")]
    close = [("connection", "close")]

    class LimitedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.inner_app, self.app = self.app, self.guarded_app
            self.dropped = False  # closed at accept, past the cap and its spare
            self.over_cap = False
            self.lost = False
            self.timer: asyncio.TimerHandle | None = None
            self.timer_kind: str | None = None  # "head" or "body"
            self.write_timer: asyncio.TimerHandle | None = None
            self.answer_bytes = 0  # this connection's answers not yet handed to the kernel
            self.answered: object = None  # the cycle this protocol answered itself
            self.jobs: set[asyncio.Task] = set()

        # ---- the connection's life

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            open_now = len(self.server_state.connections)
            if open_now >= limits.max_connections + spare:
                self.dropped = True
                transport.abort()
                notice(
                    "dropped",
                    f"closed a new connection unanswered: {open_now} are open, the cap "
                    f"(--max-connections {limits.max_connections}) and {spare} spare",
                )
                return
            super().connection_made(transport)
            load.connections = len(self.connections)
            # Told when the write buffer is empty (resume_writing): answers are counted until
            # then, and one that does not drain in write_timeout drops the connection.
            transport.set_write_buffer_limits(high=0)
            self.over_cap = open_now >= limits.max_connections
            self.update_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.dropped:
                return
            self.lost = True
            self.cancel_timer()
            self.cancel_write_timer()
            self.release_answers()
            super().connection_lost(exc)
            load.connections = len(self.connections)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self.update_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.update_timer()

        # ---- deadlines for receiving a request

        def update_timer(self) -> None:
            """Head deadline while a request's head is awaited (on a fresh connection, or once a
            kept-alive one has sent a byte of it); body deadline while its body is awaited."""
            state = self.conn.their_state
            if self.transport.is_closing():
                kind = None
            elif state is h11.SEND_BODY:
                kind = "body"
            elif state is h11.IDLE and (self.cycle is None or self.conn.trailing_data[0]):
                kind = "head"
            else:
                kind = None
            if kind == self.timer_kind:
                return
            self.cancel_timer()
            if kind is not None:
                if kind == "body":
                    seconds = limits.body_timeout
                elif self.over_cap:
                    seconds = min(limits.header_timeout, OVER_CAP_HEAD_SECONDS)
                else:
                    seconds = limits.header_timeout
                self.timer = self.loop.call_later(seconds, self.timed_out, kind)
                self.timer_kind = kind

        def cancel_timer(self) -> None:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.timer_kind = None

        def timed_out(self, kind: str) -> None:
            self.timer = self.timer_kind = None
            if self.transport.is_closing():
                return
            if kind == "head" and self.over_cap:
                self.refuse_raw(503, self.over_cap_message(), retry)
            elif kind == "head":
                notice("head", f"cut off a request head slower than {limits.header_timeout:g} s")
                self.refuse_raw(
                    408,
                    f"the request line and headers did not arrive within "
                    f"{limits.header_timeout:g} s (--header-timeout)",
                )
            elif self.cycle is not None and not self.cycle.response_started:
                notice("body", f"cut off a request body slower than {limits.body_timeout:g} s")
                self.answer(
                    self.cycle,
                    408,
                    f"the request body did not arrive within {limits.body_timeout:g} s of its "
                    "headers (--body-timeout)",
                )
            else:  # answered already; the rest of the body is late
                self.transport.close()

        def over_cap_message(self) -> str:
            return (
                f"the server has too many connections open (limit {limits.max_connections}, "
                "--max-connections); retry shortly"
            )

        def refuse_raw(
            self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()
        ) -> None:
            """Answer outside h11 (which sends a response only to a request it has parsed)."""
            self.transport.write(_raw_json(status, message, headers))
            self.transport.close()

        def answer(
            self, cycle: Any, status: int, message: str, headers: Sequence[tuple[str, str]] = ()
        ) -> None:
            """Answer the request of `cycle` now, with Connection: close; the app's own answer,
            if it ever comes, is dropped."""
            self.answered = cycle
            cycle.keep_alive = False

            async def send() -> None:
                body = encode({"error": message})
                try:
                    await cycle.send(_json_start(status, body, [*headers, *close]))
                    await cycle.send({"type": "http.response.body", "body": body})
                except (h11.LocalProtocolError, RuntimeError):  # h11 cannot answer now
                    self.transport.abort()

            job = self.loop.create_task(send())
            self.jobs.add(job)
            job.add_done_callback(self.jobs.discard)

        def send_400_response(self, msg: str) -> None:
            """A request h11 cannot parse: JSON with h11's reason (called while handling its
            RemoteProtocolError) and its status hint (400, or 431 for a head too large)."""
            exc = sys.exc_info()[1]
            status = getattr(exc, "error_status_hint", 400)
            # h11's reason without the raw bytes it quotes ("illegal header line: bytearray(...)")
            reason = str(exc or "").split(": bytearray(")[0][:200] or "it could not be parsed"
            message = f"the request is not valid HTTP/1.1: {reason}"
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                if cycle.response_started:  # mid-answer: nothing can be said any more
                    self.transport.abort()
                else:  # a bad chunk in a body the app is reading
                    self.answer(cycle, status, message)
                return
            self.refuse_raw(status, message)

        # ---- answers leaving the server

        def pause_writing(self) -> None:
            super().pause_writing()
            if self.write_timer is None:
                self.write_timer = self.loop.call_later(limits.write_timeout, self.write_timed_out)

        def resume_writing(self) -> None:  # the write buffer is empty (high water 0)
            super().resume_writing()
            self.cancel_write_timer()
            self.release_answers()

        def cancel_write_timer(self) -> None:
            if self.write_timer is not None:
                self.write_timer.cancel()
                self.write_timer = None

        def release_answers(self) -> None:
            load.give(self.answer_bytes)
            self.answer_bytes = 0

        def write_timed_out(self) -> None:
            self.write_timer = None
            notice(
                "write",
                f"dropped a connection whose answer was not read within {limits.write_timeout:g} s",
            )
            self.transport.abort()  # close() would wait for the buffer to drain

        # ---- shutdown

        def shutdown(self) -> None:
            load.shutting_down = True
            try:
                super().shutdown()
            except h11.LocalProtocolError:  # answered and closing already
                self.transport.abort()
            self.loop.call_later(limits.shutdown_timeout, self.force_close)

        def force_close(self) -> None:
            """shutdown_timeout after SIGINT/SIGTERM: answer 503 to a request not yet answered,
            drop anything else still open (a client not reading, a slow body)."""
            if self.lost:
                return
            cycle = self.cycle
            if cycle is not None and not cycle.response_started and self.answered is not cycle:
                self.answer(cycle, 503, "the server is shutting down; retry later")
                self.loop.call_later(0.2, self.transport.abort)
            else:
                self.transport.abort()

        # ---- the app, guarded: admission, the budget, answers counted

        async def guarded_app(self, scope: Any, receive: Callable, send: Callable) -> None:
            if scope["type"] != "http":
                return await self.inner_app(scope, receive, send)
            cycle = self.cycle
            refusal = self.admit(scope)
            if refusal is not None:
                status, message, headers = refusal
                body = encode({"error": message})
                await send(_json_start(status, body, [*headers, *close]))
                await send({"type": "http.response.body", "body": body})
                return
            reserved = self.request_bytes(scope)
            if reserved and not load.take(reserved):
                notice("budget", load.busy_message(reserved, "a request body"))
                message = load.busy_message(reserved, "this request's body")
                body = encode({"error": message})
                await send(_json_start(503, body, [*retry, *close]))
                await send({"type": "http.response.body", "body": body})
                return
            start: dict | None = None

            async def counted_send(message: Any) -> None:
                nonlocal start
                if self.answered is cycle:
                    return
                if message["type"] == "http.response.start":
                    start = message  # held until the body's size is known
                    return
                if message["type"] == "http.response.body":
                    size = len(message.get("body", b""))
                    if start is not None:
                        head, start = start, None
                        if size > SMALL_ANSWER and not load.take(size):
                            notice("budget", load.busy_message(size, "an answer"))
                            status = 413 if size > load.max_bytes else 503
                            text = load.busy_message(size, "this answer")
                            if status == 413:
                                text = (
                                    f"the answer would be {size} bytes, more than this "
                                    f"server's limit of {load.max_bytes} bytes in flight; "
                                    "send fewer steps or a smaller batch"
                                )
                            body = encode({"error": text})
                            await send(_json_start(status, body, retry if status == 503 else []))
                            await send({"type": "http.response.body", "body": body})
                            return
                        if size <= SMALL_ANSWER:
                            load.add(size)
                        self.answer_bytes += size
                        if self.over_cap:  # /healthz past the cap: then closed
                            head = {
                                **head,
                                "headers": [*head["headers"], (b"connection", b"close")],
                            }
                        await send(head)
                    else:
                        load.add(size)
                        self.answer_bytes += size
                    await send(message)
                    if self.transport.get_write_buffer_size() == 0:
                        self.release_answers()  # all handed to the kernel already
                    return
                await send(message)

            try:
                await self.inner_app(scope, receive, counted_send)
            except asyncio.CancelledError:
                if not load.shutting_down:
                    raise
                # uvicorn cancels what still runs past its graceful timeout: end quietly.
                notice("cancelled", "cancelled a request still running at shutdown")
                cycle.disconnected = True
                self.transport.abort()
            finally:
                if reserved:
                    load.give(reserved)

        def admit(self, scope: Any) -> tuple[int, str, list] | None:
            """Why this request is refused before the app sees it, or None."""
            head = len(scope["raw_path"]) + len(scope["query_string"])
            head += sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if head > HEAD_LIMIT:
                return (
                    431,
                    f"the request line and headers are {head} bytes; this server takes at "
                    f"most {HEAD_LIMIT}",
                    [],
                )
            if self.over_cap:
                if scope["path"] == "/healthz" and scope["method"] in ("GET", "HEAD"):
                    return None  # answered, then closed
                notice("cap", self.over_cap_message())
                return 503, self.over_cap_message(), retry
            return None

        def request_bytes(self, scope: Any) -> int:
            """What a request's body counts against the budget: its Content-Length (at most the
            body limit, beyond which it is refused unread), or the body limit when chunked."""
            length = chunked = None
            for name, value in scope["headers"]:
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    chunked = True
            if chunked:
                return limits.max_body_bytes
            return min(length or 0, limits.max_body_bytes)

    return LimitedH11Protocol


class _QuietParserLines(logging.Filter):
    """uvicorn's warning for each request its parser refuses (or an upgrade it cannot do), as
    one line per 10 s: a client sending garbage in a loop must not grow the log by a line each."""

    LINES = ("Invalid HTTP request received.", "Unsupported upgrade request.")

    def __init__(self, notice: _Notices) -> None:
        super().__init__()
        self.notice = notice

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.LINES:
            self.notice(message, f"uvicorn: {message}")
            return False
        return True


def _loop_error(notice: _Notices, loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """asyncio's errors, but out of file descriptors in accept() (asyncio retries it every
    second) as one line at most every 10 s, not a traceback each time."""
    if context.get("message") == "socket.accept() out of system resource":
        notice("accept", f"cannot accept connections: {context.get('exception')}; retrying")
    else:
        loop.default_exception_handler(context)


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _listen(host: str, port: int, backlog: int = MAX_BACKLOG) -> socket.socket:
    """A listening socket, or a UsageError saying why not (port taken, unknown host)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UsageError(f"port must be an integer from 0 to 65535, got {port!r}")
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


KEEP_ALIVE_SECONDS = 60
SHUTDOWN_MARGIN = 0.5  # after shutdown_timeout, for the requests answered 503 to end


def _files_needed(max_connections: int) -> int:
    """Open files for the cap, its spare, FD_RESERVE and batches of the smallest backlog."""
    fixed = max_connections + spare_connections(max_connections) + FD_RESERVE
    return fixed + BATCHES * MIN_BACKLOG


def _backlog(max_connections: int) -> int:
    """The accept backlog the file limit leaves room for, after raising the soft limit (up to
    the hard one); UsageError, naming the flag to lower, if that is not even MIN_BACKLOG.
    Past the limit, accept() fails and the server stops answering new connections."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return MAX_BACKLOG
    needed = _files_needed(max_connections)
    fixed = needed - BATCHES * MIN_BACKLOG
    wanted = fixed + BATCHES * MAX_BACKLOG
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(raised, soft), hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return MAX_BACKLOG
    if soft < needed:
        most = max_connections
        while most and _files_needed(most) > soft:
            most -= 1
        hint = f"lower --max-connections to {most}" if most else "raise it"
        raise UsageError(
            f"--max-connections {max_connections} needs {needed} open files (the cap, "
            f"{spare_connections(max_connections)} spare, {needed - fixed + FD_RESERVE} "
            f"more), but this process may open only {soft} (ulimit -n); {hint}"
        )
    return min(MAX_BACKLOG, (soft - fixed) // BATCHES)


def serve(
    export_dir: Path | str,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServerLimits | None = None,
    *,
    threads: int | None = 1,
    workers: int | None = None,
    optimization: str = "all",
    log_level: str = "info",
    access_log: bool = True,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully and return (exit code 0).

    Everything that can fail for a user reason (export folder, port, options, too low a file
    limit for `max_connections`) fails with `UsageError` before the server starts. `on_ready`
    gets the URL once the port is listening (default: one line on stderr); port 0 picks a
    free port. Sets glibc's mmap threshold for the process (see `tune_malloc`).
    """
    _require_framework()
    if log_level not in LOG_LEVELS:
        raise UsageError(f"log_level must be one of {list(LOG_LEVELS)}, got {log_level!r}")
    limits = limits or ServerLimits()
    backlog = _backlog(limits.max_connections)
    app = create_app(
        export_dir, limits, threads=threads, workers=workers, optimization=optimization
    )
    tune_malloc()
    sock = _listen(host, port, backlog)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    url = f"http://{shown}:{bound_port}"
    config = uvicorn.Config(
        app,
        # Our h11 subclass: deadlines, the connection cap, the byte budget, JSON errors.
        http=protocol_class(app.state.service),
        ws="none",
        h11_max_incomplete_event_size=HEAD_LIMIT,
        backlog=backlog,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        # The protocol ends what is still open after shutdown_timeout; uvicorn cancels what
        # still runs after this (a computation; the request is answered 503 already).
        timeout_graceful_shutdown=limits.shutdown_timeout + SHUTDOWN_MARGIN,
        # uvicorn's 5 s default closes a keep-alive connection under a client that pauses
        # between requests on a busy machine; its next request then dies mid-send.
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )
    server = uvicorn.Server(config)
    quiet = _QuietParserLines(app.state.service.notice)
    log.addFilter(quiet)
    name = app.state.service.info["name"]
    if on_ready is not None:
        on_ready(url)
    else:
        print(f"lstm-export: serving {name!r} on {url} (Ctrl+C to stop)", file=sys.stderr)
        sys.stderr.flush()

    # uvicorn handles SIGINT/SIGTERM itself, then re-raises the signal once it has shut down
    # so that the default action (KeyboardInterrupt, death by SIGTERM) follows. A graceful
    # stop should be exit code 0, so the handler beneath uvicorn's just asks it to stop.
    def stop(signum: int, frame: object) -> None:
        server.should_exit = True

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.removeFilter(quiet)
        sock.close()


# --------------------------------------------------------------------------- load test


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
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(batch, int) or batch < 1:
        raise UsageError(f"batch must be an integer >= 1, got {batch!r}")
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
    input_size = info["config"]["input_size"]
    headers = {"Content-Type": JSON}
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
        x = [[[rng.uniform(-1, 1) for _ in range(input_size)] for _ in range(batch)]]
        body = json.dumps({"x": x * seq}).encode()
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
    }


def _error_message(data: bytes) -> str:
    """The server's one sentence from an error answer, or the start of whatever came back."""
    try:
        return str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        return data[:200].decode("utf-8", "replace")


def serve_and_load_test(export_dir: Path | str, **load: Any) -> dict[str, Any]:
    """Start `lstm-export serve` on a free loopback port in a child process, `load_test` it.

    A child process, so that the clients' threads do not share the server's GIL.
    `load` goes to `load_test`; the server is stopped with SIGTERM afterwards.
    """
    command = [sys.executable, "-m", "lstm_export.cli", "serve", str(export_dir)]
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
