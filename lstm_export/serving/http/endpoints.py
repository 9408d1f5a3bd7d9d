"""Each route of the /v1 API, and what every route shares: reading a body within its limit,
writing an answer or an error as JSON.

An endpoint reads its request, asks the service, writes its answer; errors are raised
(`HTTPError`, `UsageError`) and become answers in the app's exception handlers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from lstm_export.serving.http.codec import BINARY, JSON, encode, error_body, is_json_type
from lstm_export.serving.http.limits import COMMITTED, HTTPError
from lstm_export.serving.http.service import Service


def json_response(status: int, data: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(encode(data), status, headers=headers, media_type=JSON)


class CommittedResponse(Response):
    """The answer to a stateful step, whose bytes were reserved (`Load.reserve`) before the
    step changed a stream's or sequence's state: marked so that the connection protocol
    sends it and never replaces it with a 413 or 503 (which would leave the client unaware
    that its state moved), and the reservation handed back once it is sent."""

    def __init__(
        self, content: bytes, headers: dict[str, str], release: Callable[[], None]
    ) -> None:
        super().__init__(content, 200, headers=headers)
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, COMMITTED: True}
            await send(message)

        try:
            await super().__call__(scope, receive, marked)
        finally:
            self.release()


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message), status, headers=headers, media_type=JSON)


def _body_type_refusal(content_type: str | None, size: int, binary: bool) -> str | None:
    """Why a body's Content-Type is refused (a 415), or None.

    JSON bodies must come as `application/json`: pages on other sites can POST text/plain or
    forms to 127.0.0.1 without asking, but not JSON. No body needs no Content-Type (POST
    /v1/streams). A `binary` route (/v2 infer) also takes `application/octet-stream` and no
    Content-Type at all, as tritonclient sends it; its guard against web pages is the Origin
    refusal (`RefuseWebPages`), which every POST passes first.
    """
    if content_type is None:
        if size and not binary:
            return (
                "the request has a body but no Content-Type; "
                "send it with Content-Type: application/json"
            )
        return None
    if is_json_type(content_type):
        return None
    if binary and content_type.partition(";")[0].strip().lower() == BINARY:
        return None
    wanted = "application/json or application/octet-stream" if binary else "application/json"
    return f"send the body as Content-Type: {wanted} (UTF-8), not {content_type[:100]!r}"


async def read_body(request: Request, limit: int, *, binary: bool = False) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes,
    and with 415 for a Content-Type the route does not take (see `_body_type_refusal`; a
    wrong type is refused before the body is read)."""
    content_type = request.headers.get("content-type")
    if content_type is not None:
        refusal = _body_type_refusal(content_type, 0, binary)
        if refusal is not None:
            raise HTTPError(415, refusal, {"Connection": "close"})
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
    refusal = _body_type_refusal(content_type, size, binary)
    if refusal is not None:
        raise HTTPError(415, refusal)
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
        answer, release = await self.service.step(request.path_params["stream_id"], body)
        return CommittedResponse(answer, {"Content-Type": JSON}, release)

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
