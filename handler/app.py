"""``create_app(settings) -> FastAPI``: routes, request ids, auth and error rendering."""

from __future__ import annotations

import logging
import math
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from handler.engines.catalog import ModelCatalog
from handler.errors import ApiError, MethodNotAllowed, NotFound, render
from handler.moderation import load_policy
from handler.routes import converse, dialogue, files, health, usage, voices
from handler.settings import Settings
from handler.storage import make_blob_store, make_storage
from handler.triton import TritonClient

REQUEST_ID_HEADER = "X-Request-ID"
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
logger = logging.getLogger("converse")


def _request_id(request: Request) -> str:
    existing = getattr(request.state, "request_id", None)
    if existing:
        return str(existing)
    sent = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = sent if _CLIENT_REQUEST_ID.match(sent) else f"req_{uuid.uuid4().hex}"
    request.state.request_id = request_id
    return request_id


def _add_headers(request: Request, response: Response) -> Response:
    """``X-Request-ID`` always; ``X-RateLimit-*`` once the key's bucket was consulted."""
    response.headers[REQUEST_ID_HEADER] = _request_id(request)
    decision = getattr(request.state, "rate_limit", None)
    if decision is not None:
        response.headers["X-RateLimit-Limit"] = str(decision.limit)
        response.headers["X-RateLimit-Remaining"] = str(decision.remaining)
        response.headers["X-RateLimit-Reset"] = str(math.ceil(decision.reset_s))
    return response


def _error_response(request: Request, error: ApiError) -> Response:
    return _add_headers(request, render(error, request.url.path, _request_id(request)))


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API app.

    Args:
        settings: configuration; read from ``CONVERSE_*`` env vars when None.

    Returns:
        A FastAPI app whose ``state`` holds ``settings``, ``triton`` (the one
        Triton client) and ``catalog`` (the model catalogue).
    """
    settings = settings or Settings()
    triton = TritonClient(settings.triton_url, settings.triton_max_inflight, settings.retry_after_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await triton.close()

    app = FastAPI(
        title="converse",
        version="0.1.0",
        description="Self-hostable conversational speech API served from Triton.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.triton = triton
    app.state.catalog = ModelCatalog(settings, triton)
    app.state.storage = make_storage(settings)
    app.state.blobs = make_blob_store(settings)
    app.state.moderation = load_policy(settings)

    @app.middleware("http")
    async def request_id_header(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        _request_id(request)
        return _add_headers(request, await call_next(request))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> Response:
        return _error_response(request, error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        if error.status_code == 405:
            return _error_response(
                request, MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
            )
        if error.status_code == 404:
            return _error_response(request, NotFound(f"no route {request.url.path}"))
        return _error_response(request, ApiError(str(error.detail)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> Response:
        logger.exception("unhandled error", exc_info=error)
        return _error_response(request, ApiError("internal error"))

    app.include_router(health.router)
    app.include_router(converse.router)
    app.include_router(dialogue.router)
    app.include_router(voices.router)
    app.include_router(usage.router)
    app.include_router(files.uploads)
    app.include_router(files.files)
    return app
