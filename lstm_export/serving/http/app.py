"""The ASGI app: the /v1 and /v2 routes, and every error as `{"error": "one sentence"}`.

Statuses: 400 bad input, 404 unknown stream, model or route (no slash redirects), 405 wrong
method, 409 what the served model cannot do (a stream of a bidirectional model), 413 over a
size limit, 415 a body in a content type the route does not take (/v1: `application/json`;
/v2 infer: that, `application/octet-stream` or none), 429 too many streams and sequences,
503 an answer that does not fit the bytes in flight now, 403 a POST or DELETE carrying an
`Origin` header (sent by a web page), 500 a bug (the log has the traceback). Errors become
answers in starlette's exception handlers (`HTTPError` with its status, `UsageError` as
400), and web pages are refused by a middleware before any route runs.

The body limit is enforced before any body is parsed: first on Content-Length, then by
counting bytes as the body arrives. /v1 bodies must be UTF-8 JSON sent as
`application/json`, which a web page cannot send cross-origin without a CORS preflight
(never granted here); an empty POST needs no preflight, and /v2 takes bodies without a
Content-Type (as tritonclient sends them), so a POST or DELETE carrying `Origin` is refused
too: other sites cannot drive the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from lstm_export.artifacts import check_model_name
from lstm_export.config import positive_int
from lstm_export.errors import UsageError
from lstm_export.runtime.onnx import OnnxLSTM, session_options
from lstm_export.serving.http.endpoints import Endpoints, error_response
from lstm_export.serving.http.limits import HTTPError, ServerLimits, cpu_count
from lstm_export.serving.http.notices import loop_error
from lstm_export.serving.http.service import Service
from lstm_export.serving.http.v2_endpoints import V2Endpoints
from lstm_export.serving.http.v2_service import OpenInference


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
        message = (
            f"no route {request.url.path}; see GET /v1/model, GET /v2/models/NAME and the "
            "README's API section"
        )
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
    name: str | None = None,
    expose_state: bool = False,
    fused_kernel: bool = False,
) -> Starlette:
    """The ASGI app over an export folder or .onnx file: the /v1 API and the Open Inference
    Protocol's /v2 (model `name`, default the export's; hn/cn among its outputs with
    `expose_state`, as `lstm-export triton --expose-state` lists them).

    `threads` is onnxruntime's intra-op threads per request (1: requests run in parallel
    instead), at most the CPU count; `workers` the size of the thread pool that runs requests
    (default: CPU count, at least 2), at most 4 x the CPU count. Pass `runtime` to share an
    already-loaded `OnnxLSTM` (then `export_dir` is ignored). onnxruntime's memory arena is
    off in the session built here: it would keep the peak of every burst for good.

    `fused_kernel` serves the export's `model.fused.onnx` (`OnnxLSTM(fused=True)`: our own
    build of its op library, never the folder's copy) for /v1 and /v2 alike; a folder
    without it, or a machine where the library cannot be built, is a `UsageError`.
    """
    limits = limits or ServerLimits()
    cpus = cpu_count()
    for option, value, most in (("threads", threads, cpus), ("workers", workers, 4 * cpus)):
        if value is None:
            continue
        if positive_int(option, value) > most:
            rule = "the CPU count" if option == "threads" else "4 x the CPU count"
            raise UsageError(f"{option} must be at most {most} ({rule}, {cpus} here), got {value}")
    if runtime is None:
        options = session_options(threads, optimization)
        options.enable_cpu_mem_arena = False
        runtime = OnnxLSTM(export_dir, options=options, providers=providers, fused=fused_kernel)
    if name is not None:
        check_model_name(name)
    service = Service(runtime, limits, workers or max(2, cpus))
    inference = OpenInference(service, name, expose_state)

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
        routes=[*Endpoints(service).routes(), *V2Endpoints(inference).routes()],
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
    app.state.inference = inference
    return app
