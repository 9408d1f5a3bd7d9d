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

Importing this module never imports torch, and works without the extra:
`ServerLimits` and `load_test` (a stdlib-only load generator) need nothing
more; `create_app` and `serve` say which extra to install.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from lstm_export.artifacts import MANIFEST_FILE, ONNX_FILE
from lstm_export.errors import UsageError
from lstm_export.files import read_manifest, sha256
from lstm_export.runtime import OnnxLSTM, Stream

try:  # the `serve` extra
    import orjson
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import Response
    from starlette.routing import Route
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
    """What one request and the whole server may hold; over a limit is a 413 (streams: 429)."""

    max_body_bytes: int = 8 * MiB  # request body, checked before parsing
    max_seq_len: int = 4096  # time steps in one predict request or one stream chunk
    max_batch: int = 64  # sequences per request or stream
    # steps x batch per predict or chunk: bounds one request's compute and its answer
    # (8192 x hidden 256 floats is ~24 MB of JSON), which seq and batch alone do not.
    max_elements: int = 8192
    max_streams: int = 256  # open streams at once
    stream_ttl: float = 300.0  # seconds a stream may stay idle before it expires

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value <= 0:
                raise UsageError(f"{f.name} must be a positive number, got {value!r}")
            if f.name != "stream_ttl" and not isinstance(value, int):
                raise UsageError(f"{f.name} must be an integer, got {value!r}")

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


# --------------------------------------------------------------------------- the service


class Service:
    """The endpoints' logic, over one shared runtime, a thread pool and the stream store."""

    def __init__(self, runtime: OnnxLSTM, limits: ServerLimits, workers: int) -> None:
        self.runtime = runtime
        self.limits = limits
        self.info = describe_model(runtime, limits)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="lstm-serve")
        self.store = StreamStore(limits.max_streams, limits.stream_ttl)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def sweep_forever(self) -> None:
        interval = min(max(self.limits.stream_ttl / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(interval)
            closed = self.store.sweep()
            if closed:
                log.info("closed %d idle stream(s)", closed)

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
        return _json(200, {"status": "ok", "streams": len(self.store)})

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
    instead); `workers` the size of the thread pool that runs requests (default: CPU count).
    Pass `runtime` to share an already-loaded `OnnxLSTM` (then `export_dir` is ignored).
    """
    _require_framework()
    limits = limits or ServerLimits()
    if workers is not None and (isinstance(workers, bool) or workers < 1):
        raise UsageError(f"workers must be an integer >= 1, got {workers!r}")
    if runtime is None:
        runtime = OnnxLSTM(
            export_dir, threads=threads, optimization=optimization, providers=providers
        )
    service = Service(runtime, limits, workers or max(2, os.cpu_count() or 1))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        sweeper = asyncio.create_task(service.sweep_forever())
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
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


def _listen(host: str, port: int) -> socket.socket:
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
        sock.listen(1024)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


KEEP_ALIVE_SECONDS = 60


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

    Everything that can fail for a user reason (export folder, port, options) fails with
    `UsageError` before the server starts. `on_ready` gets the URL once the port is
    listening (default: one line on stderr); port 0 picks a free port.
    """
    _require_framework()
    if log_level not in LOG_LEVELS:
        raise UsageError(f"log_level must be one of {list(LOG_LEVELS)}, got {log_level!r}")
    app = create_app(
        export_dir, limits, threads=threads, workers=workers, optimization=optimization
    )
    sock = _listen(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    url = f"http://{shown}:{bound_port}"
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        timeout_graceful_shutdown=10,
        # uvicorn's 5 s default closes a keep-alive connection under a client that pauses
        # between requests on a busy machine; its next request then dies mid-send.
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )
    server = uvicorn.Server(config)
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
