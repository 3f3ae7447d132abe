"""Typed FastAPI dependencies: settings, Triton client, model catalogue, auth, body parsing."""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from functools import partial
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, HTTPConnection

from handler.engines.catalog import ModelCatalog
from handler.errors import (
    AuthenticationError,
    ClientClosedRequest,
    InvalidRequest,
    PayloadTooLarge,
    RateLimited,
    ValidationItem,
    uses_problem_json,
)
from handler.services.admission import Admission
from handler.services.context import RequestContext
from handler.services.deadline import within_deadline
from handler.services.telemetry import RequestRecord
from handler.settings import Settings
from handler.storage import BlobStore, Storage
from handler.triton import TritonClient

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
# A Content-Length in ASCII digits (str.isdigit() also takes "²", which int() refuses).
_CONTENT_LENGTH = re.compile(r"[0-9]+")


def get_settings(request: Request) -> Settings:
    """The app's settings."""
    settings: Settings = request.app.state.settings
    return settings


def get_triton(request: Request) -> TritonClient:
    """The app's one Triton client."""
    triton: TritonClient = request.app.state.triton
    return triton


def get_catalog(request: Request) -> ModelCatalog:
    """The app's model catalogue."""
    catalog: ModelCatalog = request.app.state.catalog
    return catalog


def get_storage(request: Request) -> Storage:
    """The app's storage backend."""
    storage: Storage = request.app.state.storage
    return storage


def get_blobs(request: Request) -> BlobStore:
    """The app's blob store."""
    blobs: BlobStore = request.app.state.blobs
    return blobs


def get_key_id(request: Request) -> str:
    """Id of the authenticated key (set by :func:`require_api_key`)."""
    return str(request.state.key_id)


def get_request_id(request: Request) -> str:
    """The request id set by the request middleware."""
    return str(request.state.request_id)


def get_deadline(request: Request) -> float:
    """The request's deadline, ``time.monotonic()`` seconds (set on arrival)."""
    return float(request.state.deadline)


SettingsDep = Annotated[Settings, Depends(get_settings)]
TritonDep = Annotated[TritonClient, Depends(get_triton)]
CatalogDep = Annotated[ModelCatalog, Depends(get_catalog)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
StorageDep = Annotated[Storage, Depends(get_storage)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
KeyIdDep = Annotated[str, Depends(get_key_id)]
DeadlineDep = Annotated[float, Depends(get_deadline)]


WEBSOCKET_KEY_PREFIX = "key."


def presented_key(request: HTTPConnection) -> str | None:
    """The API key from ``Authorization: Bearer <key>``, ``X-API-Key`` or a subprotocol.

    On a WebSocket handshake (browsers cannot set headers there) the key may come
    as a ``key.<key>`` entry of ``Sec-WebSocket-Protocol``.
    """
    authorization = request.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if request.headers.get("x-api-key"):
        return request.headers["x-api-key"]
    if request.scope["type"] == "websocket":
        for protocol in request.scope.get("subprotocols", []):
            if protocol.startswith(WEBSOCKET_KEY_PREFIX) and len(protocol) > 4:
                return str(protocol[len(WEBSOCKET_KEY_PREFIX) :])
    return None


async def require_api_key(
    request: HTTPConnection, settings: SettingsDep, storage: StorageDep
) -> None:
    """Authenticate the key, then take one token from its rate-limit bucket.

    The key's SHA-256 is compared in constant time with every configured
    digest. ``request.state.key_id`` (first 16 hex digits of the digest) and
    ``request.state.rate_limit`` (the bucket decision, turned into
    ``X-RateLimit-*`` headers by the app) are set.

    Raises:
        AuthenticationError: no key, or a key whose digest is not configured.
        ServiceUnavailable: the API keys secret could not be read (503,
            ``Retry-After``; see :meth:`Settings.load_key_digests`).
        RateLimited: the key's bucket is empty (``Retry-After`` set).
    """
    key = presented_key(request)
    if key is None:
        raise AuthenticationError("missing API key: send Authorization: Bearer <key>")
    digest = hashlib.sha256(key.encode()).hexdigest()
    matched = False
    for accepted in await settings.load_key_digests():
        matched |= hmac.compare_digest(digest, accepted)
    if not matched:
        raise AuthenticationError("invalid API key")
    request.state.key_id = digest[:16]
    decision = await run_in_threadpool(
        storage.take_token,
        request.state.key_id,
        settings.rate_limit_capacity,
        settings.rate_limit_per_minute / 60.0,
        time.time(),
    )
    request.state.rate_limit = decision
    if not decision.allowed:
        raise RateLimited(
            f"rate limit of {settings.rate_limit_capacity} requests exceeded; retry later",
            headers={"Retry-After": str(max(1, math.ceil(decision.retry_after_s)))},
        )


def get_context(
    request: Request,
    settings: SettingsDep,
    catalog: CatalogDep,
    triton: TritonDep,
    storage: StorageDep,
    blobs: BlobsDep,
    key_id: KeyIdDep,
    request_id: RequestIdDep,
    deadline: DeadlineDep,
) -> RequestContext:
    """The :class:`RequestContext` of an authenticated request."""
    record: RequestRecord = request.state.record
    return RequestContext(
        settings,
        catalog,
        triton,
        storage,
        blobs,
        key_id,
        request_id,
        str(request.base_url),
        request.app.state.moderation,
        deadline,
        record,
    )


ContextDep = Annotated[RequestContext, Depends(get_context)]


def validation_error(error: ValidationError, path: str) -> InvalidRequest:
    """Map a pydantic ValidationError to InvalidRequest in the style of ``path``'s spec."""
    items = [ValidationItem([str(part) for part in e["loc"]], e["msg"]) for e in error.errors()]
    first = error.errors()[0]["loc"] if error.errors() else ()
    turn_index = None
    if len(first) >= 2 and first[0] in ("turns", "conversation") and isinstance(first[1], int):
        turn_index = first[1]
    summary = "; ".join(f"{'.'.join(i.path) or 'body'}: {i.message}" for i in items[:5])
    code = "validation_error" if uses_problem_json(path) else "invalid_request"
    return InvalidRequest(summary, code=code, turn_index=turn_index, validation=items)


def _declares_more_than(declared: str | None, max_bytes: int) -> bool:
    """True when a ``Content-Length`` value (ASCII digits) says more than ``max_bytes``.

    Anything that is no ASCII number says nothing (the body is counted as it
    arrives); a number of more digits than ``max_bytes`` is larger without
    being converted, so ``int()`` never meets its 4300-digit limit.
    """
    if declared is None or _CONTENT_LENGTH.fullmatch(declared) is None:
        return False
    digits = declared.lstrip("0")
    return len(digits) > len(str(max_bytes)) or int(digits or "0") > max_bytes


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's body, at most ``max_bytes`` bytes, size-checked before it is kept.

    A ``Content-Length`` over the limit is refused before any byte is read; a
    body without one (chunked) or longer than it said is refused as soon as
    the bytes read pass the limit.

    Args:
        request: the HTTP request whose body is read (once).
        max_bytes: the most bytes accepted.

    Returns:
        The whole body.

    Raises:
        PayloadTooLarge: the body is (or says it is) larger than ``max_bytes`` (413).
        ClientClosedRequest: the client disconnected before its body ended (499,
            logged only).
    """
    if _declares_more_than(request.headers.get("content-length"), max_bytes):
        raise PayloadTooLarge(f"request body exceeds {max_bytes} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > max_bytes:
                raise PayloadTooLarge(f"request body exceeds {max_bytes} bytes")
    except ClientDisconnect as error:
        raise ClientClosedRequest(
            "the client closed the connection while sending its body",
            detail=f"disconnected after {len(body)} bytes of the body",
        ) from error
    return bytes(body)


async def parse_body(request: Request, model: type[M], max_bytes: int) -> M:
    """Read the JSON body (size-checked first, see :func:`read_body`) and validate it.

    Args:
        request: the HTTP request.
        model: the pydantic model the body must be.
        max_bytes: the most body bytes accepted.

    Returns:
        The validated ``model``.

    Raises:
        PayloadTooLarge: body larger than ``max_bytes`` (413).
        ClientClosedRequest: the client disconnected while sending it (499, logged only).
        InvalidRequest: not JSON, or not a valid ``model``.
    """
    body = await read_body(request, max_bytes)
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise validation_error(error, request.url.path) from error


async def client_gone(request: Request) -> None:
    """Return once the client has disconnected (call after the body was read)."""
    while (await request.receive())["type"] != "http.disconnect":
        continue


async def take_slot(stack: AsyncExitStack, request: Request, ctx: RequestContext) -> None:
    """Enter an admission slot for the request into ``stack`` (released when it closes).

    A client that goes away while the request waits in the queue takes it out
    of the queue at once, so its place and its key's share go to others.

    Raises:
        KeyOverShare: the key holds its share of a busy service (429, ``Retry-After``).
        Overloaded: the request cannot start and finish before its deadline (503).
        ClientClosedRequest: the client went away while the request waited (499, logged only).
    """
    admission: Admission = request.app.state.admission
    await within_deadline(
        stack.enter_async_context(admission.slot(ctx.key_id, ctx.deadline)),
        ctx.deadline,
        partial(client_gone, request),
    )


async def run_admitted(
    request: Request, ctx: RequestContext, work: Callable[[], Coroutine[Any, Any, T]]
) -> T:
    """Run an inference request's ``work`` in an admission slot, under its one deadline.

    The work is cancelled (and with it its Triton calls) when the deadline
    passes or the client disconnects.

    Raises:
        KeyOverShare, Overloaded, ClientClosedRequest: see :func:`take_slot`.
        DeadlineExceeded: the work did not finish before the deadline (504).
        ClientClosedRequest: the client went away (499, logged only).
    """
    async with AsyncExitStack() as stack:
        await take_slot(stack, request, ctx)
        return await within_deadline(work(), ctx.deadline, partial(client_gone, request))
