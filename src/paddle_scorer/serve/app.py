"""The HTTP edge (FastAPI): routes, API key, body limit, and OpenAI-shaped errors for everything.

No request can take the server down or get a traceback: bad requests are 4xx with OpenAI's error
shape, unknown routes 404, wrong methods 405, a body over the limit 413, a missing or wrong key 401;
anything unexpected is logged on the server's stderr and answered with a 500 that says so in one
sentence. The engine thread starts with the app and stops with it.
"""

from __future__ import annotations

import functools
import logging
import secrets
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from paddle_scorer.serve.engine import Cancelled, EngineStopped
from paddle_scorer.serve.protocol import (
    CHAT_FIELDS,
    CLASSIFY_FIELDS,
    COMPLETION_FIELDS,
    ProtocolError,
    error_body,
    parse_json,
    unknown_fields,
)
from paddle_scorer.serve.service import ClientGone, Service

log = logging.getLogger("paddle_scorer.serve")
OPEN_PATHS = frozenset({"/health"})


def create_app(service: Service, api_key: str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.engine.start()
        try:
            yield
        finally:
            service.engine.stop()
            service.close()

    app = FastAPI(title="paddle-scorer serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.service = service
    if api_key is not None:
        # a plain ASGI middleware, not @app.middleware("http"): that one wraps the request's receive channel, and a
        # route behind it could not see its client disconnect (the work of a client that left would run on)
        app.add_middleware(_Auth, key=api_key)
    _error_handlers(app)
    _routes(app, service, _Bodies(service))
    return app


def guarded(route):
    """Every exception a route raises becomes an OpenAI-shaped answer; never a traceback to the client."""

    @functools.wraps(route)
    async def run(request: Request):
        try:
            return await route(request)
        except ProtocolError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        except EngineStopped as exc:
            return _error(503, str(exc), type="server_error", code="shutting_down")
        except (ClientGone, Cancelled):  # nobody is listening; the work was cancelled
            return Response(status_code=499)
        except ClientDisconnect:  # the client hung up while sending its body: nothing to answer, nothing wrong here
            log.info("client hung up during its request body (%s %s)", request.method, request.url.path)
            return Response(status_code=499)
        except FloatingPointError as exc:
            return _error(500, str(exc), type="server_error", code="non_finite")
        except Exception as exc:  # the server keeps serving; the traceback goes to its log
            log.exception("unexpected error on %s %s", request.method, request.url.path)
            return _error(500, f"internal error ({type(exc).__name__}); the server logged it and keeps serving.",
                          type="server_error", code="internal_error")

    return run


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            msg = f"no route {request.method} {request.url.path}; this server has {route_list(app)}."
            return _error(404, msg, code="not_found")
        if exc.status_code == 405:
            return _error(405, f"{request.method} is not allowed on {request.url.path}.", code="method_not_allowed")
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _error(400, f"invalid request: {exc.errors()[:1]}")


class _Bodies:
    """Request bodies read within ``--max-body`` (the declared length first, then as they stream in), parsed off the
    event loop; fields the server does not know are logged once each."""

    def __init__(self, service: Service):
        self.service = service
        self.warned: set[str] = set()

    async def __call__(self, request: Request, fields: set[str] | None = None) -> dict:
        limit = self.service.options.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        body = await self.service.off(parse_json, b"".join(chunks))  # a large body is parsed off the event loop
        if fields is not None:
            extra = [f for f in unknown_fields(body, fields) if f not in self.warned]
            if extra:
                self.warned.update(extra)
                log.warning("ignoring request field(s) this server does not know: %s", ", ".join(extra))
        return body


def _routes(app: FastAPI, service: Service, body_of: _Bodies) -> None:
    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/v1/models")
    async def models():
        return service.models()

    @app.get("/v1/models/{model_id:path}")
    @guarded
    async def model(request: Request):
        return service.model_card(service.resolve(request.path_params["model_id"]))

    @app.post("/v1/completions")
    @guarded
    async def completions(request: Request):
        return _answer(await service.completions(await body_of(request, COMPLETION_FIELDS), request))

    @app.post("/v1/chat/completions")
    @guarded
    async def chat(request: Request):
        return _answer(await service.chat(await body_of(request, CHAT_FIELDS), request))

    @app.post("/v1/classify")
    @guarded
    async def classify(request: Request):
        return _answer(await service.classify(await body_of(request, CLASSIFY_FIELDS), request))

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return service.tokenizer_info()

    @app.post("/tokenize")
    @guarded
    async def tokenize(request: Request):
        return _answer(await service.tokenize(await body_of(request)))

    @app.post("/detokenize")
    @guarded
    async def detokenize(request: Request):
        return _answer(await service.detokenize(await body_of(request)))


def _answer(result):
    """Bytes already encoded off the event loop, or a stream of server-sent events."""
    if isinstance(result, (bytes, bytearray)):
        return Response(content=bytes(result), media_type="application/json")
    return StreamingResponse(result, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def route_list(app: FastAPI) -> str:
    """The routes this app serves, as ``METHOD /path`` phrases (built from the app, so it never drifts)."""
    shown = []
    for route in app.routes:
        methods = sorted(getattr(route, "methods", None) or ())
        path = getattr(route, "path", None)
        if path and methods:
            shown += [f"{m} {path}" for m in methods if m != "HEAD"]
    return ", ".join(shown)


class _Auth:
    """``Authorization: Bearer KEY`` on every route but /health (an ASGI middleware: see create_app)."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") not in OPEN_PATHS and not _authorized(scope, self.key):
            response = _error(401, "a valid API key is needed: send the header `Authorization: Bearer KEY` with the "
                                   "key the server was started with (--api-key).", code="invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _authorized(scope, key: str) -> bool:
    header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), key.encode())


def _too_large(limit: int) -> ProtocolError:
    return ProtocolError(f"the request body is larger than this server's limit of {limit} bytes (--max-body); "
                         "send fewer prompts per request.", status=413, code="request_too_large")


def _error(status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, None, code), status_code=status, headers=headers)
