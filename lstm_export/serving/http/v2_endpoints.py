"""Each route of the Open Inference Protocol (KServe v2) as Triton answers it over HTTP:
health, server and model metadata, model readiness, and infer, under /v2; the model's
routes also under /versions/1.

Errors are `{"error": "..."}` like every answer of this server (and like Triton's).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lstm_export.serving.http.endpoints import CommittedResponse, json_response, read_body
from lstm_export.serving.http.v2_codec import HEADER_LENGTH
from lstm_export.serving.http.v2_service import OpenInference

HEALTH_ROUTES = ("/v2/health/live", "/v2/health/ready")
"""Answered even past the connection cap, as /healthz is: probes must see a busy server live."""


class V2Endpoints:
    """Each /v2 route: its request read, `OpenInference` asked, its answer written."""

    def __init__(self, inference: OpenInference) -> None:
        self.inference = inference

    def model_of(self, request: Request) -> None:
        params = request.path_params
        self.inference.check_model(params["model"], params.get("version"))

    async def live(self, request: Request) -> Response:
        return json_response(200, {"live": True})

    async def ready(self, request: Request) -> Response:
        return json_response(200, {"ready": True})

    async def server(self, request: Request) -> Response:
        return json_response(200, self.inference.server_metadata())

    async def model(self, request: Request) -> Response:
        self.model_of(request)
        return json_response(200, self.inference.model_metadata())

    async def model_ready(self, request: Request) -> Response:
        self.model_of(request)
        return json_response(200, {"name": self.inference.name, "ready": True})

    async def infer(self, request: Request) -> Response:
        self.model_of(request)  # before the body is read: an unknown model costs nothing
        limit = self.inference.service.limits.max_body_bytes
        body = await read_body(request, limit, binary=True)
        headers = request.headers
        answer, answer_headers, reserved = await self.inference.infer(
            body,
            headers.get(HEADER_LENGTH),
            headers.get("content-encoding"),
            headers.get("accept-encoding"),
        )
        if not reserved:
            return Response(answer, 200, headers=answer_headers)
        load = self.inference.service.load
        return CommittedResponse(answer, answer_headers, lambda: load.give(reserved))

    def routes(self) -> list[Route]:
        model = "/v2/models/{model}"
        version = model + "/versions/{version}"
        return [
            Route("/v2", self.server, methods=["GET"]),
            Route(HEALTH_ROUTES[0], self.live, methods=["GET"]),
            Route(HEALTH_ROUTES[1], self.ready, methods=["GET"]),
            *(
                route
                for base in (model, version)
                for route in (
                    Route(base, self.model, methods=["GET"]),
                    Route(base + "/ready", self.model_ready, methods=["GET"]),
                    Route(base + "/infer", self.infer, methods=["POST"]),
                )
            ),
        ]
