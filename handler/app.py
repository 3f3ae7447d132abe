"""``create_app(settings) -> FastAPI``: routes, request ids, auth and error rendering."""

from __future__ import annotations

import logging
import math
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from handler.engines.catalog import ModelCatalog
from handler.errors import ApiError, MethodNotAllowed, NotFound, internal_error, render
from handler.moderation import load_policy
from handler.routes import (
    conversations,
    converse,
    dialogue,
    files,
    health,
    playground,
    usage,
    voices,
)
from handler.routes.openapi import API_DESCRIPTION, build_openapi
from handler.services.admission import Admission
from handler.services.telemetry import Metrics, RequestRecord, request_logger
from handler.sessions.base import ConversationFactory
from handler.sessions.live import live_conversations
from handler.sessions.transport import SessionHub
from handler.settings import Settings
from handler.storage import make_blob_store, make_storage
from handler.triton import TritonClient

REQUEST_ID_HEADER = "X-Request-ID"
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
logger = logging.getLogger("converse")


def _new_request_id(sent: str) -> str:
    return sent if _CLIENT_REQUEST_ID.match(sent) else f"req_{uuid.uuid4().hex}"


def _rate_limit_headers(state: dict[str, Any]) -> dict[str, str]:
    """``X-RateLimit-*`` once the key's bucket was consulted, else nothing."""
    decision = state.get("rate_limit")
    if decision is None:
        return {}
    return {
        "X-RateLimit-Limit": str(decision.limit),
        "X-RateLimit-Remaining": str(decision.remaining),
        "X-RateLimit-Reset": str(math.ceil(decision.reset_s)),
    }


class RequestMiddleware:
    """Per HTTP request: id, deadline and telemetry record on arrival; headers; the log line.

    On arrival ``scope["state"]`` gets ``request_id`` (a valid client
    ``X-Request-ID`` or ``req_<32 hex>``), ``deadline`` (``time.monotonic()`` +
    ``triton_timeout_s``) and ``record`` (:class:`RequestRecord`). Every
    response carries ``X-Request-ID`` and, once the key's bucket was consulted,
    ``X-RateLimit-*``. When the answer has gone out the record is written as one
    JSON line (``log_requests``) and counted in ``metrics`` (when enabled).
    """

    def __init__(
        self,
        app: ASGIApp,
        settings: Settings,
        admission: Admission,
        metrics: Metrics | None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.admission = admission
        self.metrics = metrics
        self.log = request_logger() if settings.log_requests else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run one request through the app with its id, deadline and record."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        request_id = _new_request_id(Headers(scope=scope).get(REQUEST_ID_HEADER, ""))
        record = RequestRecord(request_id, scope["method"], scope["path"])
        state.update(
            request_id=request_id,
            deadline=record.started + self.settings.triton_timeout_s,
            record=record,
        )

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = request_id
                for name, value in _rate_limit_headers(state).items():
                    headers[name] = value
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as error:
            # The app's Exception handler answers the client only after this line is
            # logged (it runs in the outermost middleware), so the detail is set here.
            record.status = record.status or 500
            record.error_code = record.error_code or "internal_error"
            record.error_detail = record.error_detail or internal_error(error).detail
            raise
        finally:
            record.route = str(getattr(scope.get("route"), "path", ""))
            record.key_id = str(state.get("key_id", ""))
            if self.log is not None:
                self.log.info(record.line())
            if self.metrics is not None:
                self.metrics.observe(record)


def _error_response(request: Request, error: ApiError) -> Response:
    """The error in its path's style, with the request id and rate-limit headers."""
    request_id = str(request.state.request_id)
    record: RequestRecord = request.state.record
    record.error_code = error.code
    record.error_detail = error.detail
    response = render(error, request.url.path, request_id)
    response.headers[REQUEST_ID_HEADER] = request_id
    response.headers.update(_rate_limit_headers(request.scope.get("state", {})))
    return response


def create_app(
    settings: Settings | None = None, conversation_factory: ConversationFactory | None = None
) -> FastAPI:
    """Build the API app.

    Args:
        settings: configuration; read from ``CONVERSE_*`` env vars when None.
        conversation_factory: builds the conversation behind each session socket
            (``state.conversation_factory``); None: the live conversation
            (:func:`handler.sessions.live.live_conversations`).

    Returns:
        A FastAPI app whose ``state`` holds ``settings``, ``triton`` (the one
        Triton client), ``catalog`` (the model catalogue), ``admission`` (the
        inference slots), ``metrics`` (None unless ``metrics_enabled``),
        ``session_hub`` (live session sockets) and ``conversation_factory``.
    """
    settings = settings or Settings()
    triton = TritonClient(
        settings.triton_url,
        settings.triton_max_inflight,
        settings.retry_after_s,
        settings.triton_grpc_url if settings.triton_protocol == "grpc" else None,
    )
    admission = Admission(
        settings.admission_max_active,
        settings.admission_max_queued,
        settings.admission_key_share,
        settings.retry_after_s,
    )
    metrics = Metrics(admission) if settings.metrics_enabled else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await triton.close()

    app = FastAPI(
        title="converse",
        version="0.1.0",
        description=API_DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=lambda route: route.name,
    )
    app.state.settings = settings
    app.state.triton = triton
    app.state.catalog = ModelCatalog(settings, triton)
    app.state.storage = make_storage(settings)
    app.state.blobs = make_blob_store(settings)
    app.state.moderation = load_policy(settings)
    app.state.admission = admission
    app.state.metrics = metrics
    app.state.session_hub = SessionHub()
    app.state.conversation_factory = conversation_factory or live_conversations(app.state)
    app.add_middleware(RequestMiddleware, settings=settings, admission=admission, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> Response:
        return _error_response(request, error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        if error.status_code == 405:
            # Starlette's error carries the route's methods as Allow (RFC 9110, 15.5.6: a
            # 405 must list them).
            not_allowed = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}",
                                           headers=dict(error.headers or {}))
            return _error_response(request, not_allowed)
        if error.status_code == 404:
            return _error_response(request, NotFound(f"no route {request.url.path}"))
        return _error_response(request, ApiError(str(error.detail)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> Response:
        logger.exception("unhandled error (request %s)", request.state.request_id, exc_info=error)
        return _error_response(request, internal_error(error))

    app.include_router(health.router)
    app.include_router(converse.router)
    app.include_router(dialogue.router)
    app.include_router(voices.router)
    app.include_router(usage.router)
    app.include_router(files.uploads)
    app.include_router(files.files)
    app.include_router(conversations.router)
    app.include_router(conversations.stream_router)
    app.include_router(playground.router)
    app.openapi = partial(build_openapi, app)  # type: ignore[method-assign]
    return app
