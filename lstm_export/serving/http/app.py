"""The ASGI app: routes, request bodies, and every error as `{"error": "one sentence"}`.

Statuses: 400 bad input, 404 unknown stream or route (no slash redirects), 405 wrong method,
409 what the served model cannot do (a stream of a bidirectional model), 413 over a size
limit, 415 a body not sent as `application/json`, 429 too many streams,
403 a POST or DELETE carrying an `Origin` header (sent by a web page), 500 a bug (the log
has the traceback). Errors become answers in starlette's exception handlers (`HTTPError`
with its status, `UsageError` as 400), and web pages are refused by a middleware before
any route runs.

The body limit is enforced before any JSON is parsed: first on Content-Length, then by
counting bytes as the body arrives. Bodies must be UTF-8 JSON sent as `application/json`,
which a web page cannot send cross-origin without a CORS preflight (never granted here); an
empty POST needs no preflight, so a POST or DELETE carrying `Origin` is refused too: other
sites cannot drive the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from lstm_export.config import positive_int
from lstm_export.errors import UsageError
from lstm_export.runtime.onnx import OnnxLSTM, session_options
from lstm_export.serving.http.codec import JSON, encode, error_body, is_json_type
from lstm_export.serving.http.limits import HTTPError, ServerLimits, cpu_count
from lstm_export.serving.http.notices import loop_error
from lstm_export.serving.http.service import Service


def json_response(status: int, data: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(encode(data), status, headers=headers, media_type=JSON)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message), status, headers=headers, media_type=JSON)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes.

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


class Endpoints:
    """Each route: its request read, the service asked, its answer written."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def body(self, request: Request) -> bytes:
        return await read_body(request, self.service.limits.max_body_bytes)

    async def healthz(self, request: Request) -> Response:
        return json_response(200, self.service.health())

    async def model(self, request: Request) -> Response:
        return json_response(200, self.service.info)

    async def predict(self, request: Request) -> Response:
        answer = await self.service.predict(await self.body(request))
        return Response(answer, 200, media_type=JSON)

    async def create_stream(self, request: Request) -> Response:
        answer = await self.service.open_stream(await self.body(request))
        return json_response(201, answer, {"Location": answer["url"]})

    async def step(self, request: Request) -> Response:
        body = await self.body(request)
        answer = await self.service.step(request.path_params["stream_id"], body)
        return Response(answer, 200, media_type=JSON)

    async def stream_resource(self, request: Request) -> Response:
        """GET: the stream's batch, steps and idle time; DELETE: close it."""
        stream_id = request.path_params["stream_id"]
        if request.method == "DELETE":
            return json_response(200, self.service.close_stream(stream_id))
        return json_response(200, self.service.describe_stream(stream_id))

    def routes(self) -> list[Route]:
        return [
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/v1/model", self.model, methods=["GET"]),
            Route("/v1/predict", self.predict, methods=["POST"]),
            Route("/v1/streams", self.create_stream, methods=["POST"]),
            Route("/v1/streams/{stream_id}", self.stream_resource, methods=["GET", "DELETE"]),
            Route("/v1/streams/{stream_id}/step", self.step, methods=["POST"]),
        ]


class RefuseWebPages:
    """403 for a POST or DELETE that a web page sent (browsers add `Origin` to those).

    The API is for programs; a page on another site can still send an empty POST without a
    preflight (it would open streams up to the cap), and JSON-only bodies do not stop that.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "DELETE"):
            origin = Headers(scope=scope).get("origin")
            if origin is not None:
                refusal = error_response(
                    403,
                    f"requests from web pages (Origin: {origin[:100]}) are refused: this API "
                    "is for programs; send the request without an Origin header",
                )
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPError)
    return error_response(exc.status, exc.message, exc.headers)


async def bad_input(request: Request, exc: Exception) -> Response:
    """A `UsageError` from the runtime (a state of the wrong shape, say) is the client's."""
    return error_response(400, str(exc))


async def no_such_route(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no route {request.url.path}; see GET /v1/model and the README's API section"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, dict(exc.headers or {}))


async def internal_error(request: Request, exc: Exception) -> Response:
    return error_response(500, "internal server error; the server log has the details")


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
    limits = limits or ServerLimits()
    cpus = cpu_count()
    for name, value, most in (("threads", threads, cpus), ("workers", workers, 4 * cpus)):
        if value is None:
            continue
        if positive_int(name, value) > most:
            rule = "the CPU count" if name == "threads" else "4 x the CPU count"
            raise UsageError(f"{name} must be at most {most} ({rule}, {cpus} here), got {value}")
    if runtime is None:
        options = session_options(threads, optimization)
        options.enable_cpu_mem_arena = False
        runtime = OnnxLSTM(export_dir, options=options, providers=providers)
    service = Service(runtime, limits, workers or max(2, cpus))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(functools.partial(loop_error, service.notice))
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

    app = Starlette(
        routes=Endpoints(service).routes(),
        middleware=[Middleware(RefuseWebPages)],
        lifespan=lifespan,
        exception_handlers={
            HTTPError: refused,
            UsageError: bad_input,
            HTTPException: no_such_route,
            Exception: internal_error,
        },
    )
    # A slash redirect is a 307 with an empty body; every answer here is JSON, so /healthz/
    # is a JSON 404 like any unknown route.
    app.router.redirect_slashes = False
    app.state.service = service
    return app
