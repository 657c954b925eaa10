"""The HTTP routes: each parses its body (protocol.py) and makes one call into the Service.
Errors of every kind leave as OpenAI's error object with the right status, never a trace."""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import LMForgeError
from lmforge.server.protocol import AskRequest, ChatRequest, CompletionRequest, EmbeddingRequest
from lmforge.server.service import APIError, Service

log = logging.getLogger("lmforge.server")
STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 408: "timeout", 413: "request_too_large",
                422: "invalid_request_error", 429: "rate_limit_error", 503: "server_overloaded"}


def create_app(service: Service, api_key: str | None = None, cors: list[str] | tuple = ()) -> FastAPI:
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    def error(status: int, message: str, param: str | None = None, code: str | None = None,
              type: str | None = None, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(APIError(status, message, type or STATUS_TYPES.get(status, "server_error"), param,
                                     code).body(), status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(LMForgeError)
    async def _lmforge_error(request: Request, e: LMForgeError):
        return error(400, str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid" or (not where and first.get("type") in ("model_attributes_type",
                                                                                       "dict_type")):
            return error(400, "the body is not a JSON object", code="invalid_json")
        msg = f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid request")
        return error(422, msg, param=where or None, code=first.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        msg = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error(e.status_code, msg.get(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.exception("request failed: %s %s", request.method, request.url.path)
        return error(500, "internal server error (see the server's log)", type="server_error")

    app.add_middleware(BodyLimit, limit=service.limits.max_body)
    app.add_middleware(Count, service=service)
    if cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    async def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "a valid API key is needed: Authorization: Bearer KEY", type="authentication_error",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def gone(request: Request):
        return request.is_disconnected

    def reply(result):
        if isinstance(result, dict):
            return result
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    v1 = [Depends(authorized)]

    @app.get("/v1/models", dependencies=v1)
    async def models():
        return service.list_models()

    @app.get("/v1/models/{name:path}", dependencies=v1)
    async def model(name: str):
        for m in service.list_models()["data"]:
            if m["id"] == name:
                return m
        raise APIError(404, f"the model {name!r} is not served here", param="model", code="model_not_found")

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat(body: ChatRequest, request: Request):
        return reply(await service.chat(body, gone(request)))

    @app.post("/v1/completions", dependencies=v1)
    async def completions(body: CompletionRequest, request: Request):
        return reply(await service.complete(body, gone(request)))

    @app.post("/v1/embeddings", dependencies=v1)
    async def embeddings(body: EmbeddingRequest):
        return await service.embed(body)

    @app.post("/v1/rag/ask", dependencies=v1)
    async def rag_ask(body: AskRequest, request: Request):
        return reply(await service.ask(body, gone(request)))

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    static = Path(__file__).parent / "static"
    page = (static / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    # only the files shipped in the package (StaticFiles keeps every path inside the folder)
    app.mount("/static", StaticFiles(directory=static), name="static")

    _register_gauges(service)
    return app


class BodyLimit:
    """Refuse a body past `limit` bytes with 413, from its Content-Length or while it streams in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _too_large(send, self.limit)
        seen = 0
        started = False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        async def tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await _too_large(send, self.limit)


class Count:
    """Count requests by route and status for /metrics (a plain ASGI layer: streaming untouched)."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def tracked(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        finally:
            path = getattr(scope.get("route"), "path", "other")
            self.service.metrics.requests.labels(path, str(status)).inc()


class _TooLarge(Exception):
    pass


async def _too_large(send, limit: int) -> None:
    import json

    body = json.dumps(APIError(413, f"the request body is larger than {limit:,} bytes",
                               "request_too_large", None, "body_too_large").body()).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _register_gauges(service: Service) -> None:
    """Queue depth, busy slots and the recent token rate, read when /metrics is scraped."""
    from prometheus_client.core import GaugeMetricFamily

    class Live:
        def collect(self):
            busy = GaugeMetricFamily("lmforge_busy_slots", "Sequences holding a cache slot.", labels=["model"])
            queue = GaugeMetricFamily("lmforge_queue_depth", "Requests waiting for a slot.", labels=["model"])
            for name, n in service.busy_slots().items():
                busy.add_metric([name], n)
            for name, n in service.queue_depth().items():
                queue.add_metric([name], n)
            rate = GaugeMetricFamily("lmforge_tokens_per_second",
                                     f"Tokens generated per second over the last {service.metrics.WINDOW:.0f} s.",
                                     value=service.metrics.tokens_per_second())
            yield from (busy, queue, rate)

    service.metrics.registry.register(Live())
