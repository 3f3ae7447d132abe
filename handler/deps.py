"""Typed FastAPI dependencies: settings, Triton client, model catalogue, auth, body parsing."""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from handler.engines.catalog import ModelCatalog
from handler.errors import (
    AuthenticationError,
    InvalidRequest,
    RateLimited,
    ValidationItem,
    uses_problem_json,
)
from handler.services.context import RequestContext
from handler.settings import Settings
from handler.storage import BlobStore, Storage
from handler.triton import TritonClient

M = TypeVar("M", bound=BaseModel)


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
    """The request id set by the request-id middleware."""
    return str(request.state.request_id)


SettingsDep = Annotated[Settings, Depends(get_settings)]
TritonDep = Annotated[TritonClient, Depends(get_triton)]
CatalogDep = Annotated[ModelCatalog, Depends(get_catalog)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
StorageDep = Annotated[Storage, Depends(get_storage)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
KeyIdDep = Annotated[str, Depends(get_key_id)]


def presented_key(request: Request) -> str | None:
    """The API key from ``Authorization: Bearer <key>`` or ``X-API-Key``, if any."""
    authorization = request.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


async def require_api_key(request: Request, settings: SettingsDep, storage: StorageDep) -> None:
    """Authenticate the key, then take one token from its rate-limit bucket.

    The key's SHA-256 is compared in constant time with every configured
    digest. ``request.state.key_id`` (first 16 hex digits of the digest) and
    ``request.state.rate_limit`` (the bucket decision, turned into
    ``X-RateLimit-*`` headers by the app) are set.

    Raises:
        AuthenticationError: no key, or a key whose digest is not configured.
        RateLimited: the key's bucket is empty (``Retry-After`` set).
    """
    key = presented_key(request)
    if key is None:
        raise AuthenticationError("missing API key: send Authorization: Bearer <key>")
    digest = hashlib.sha256(key.encode()).hexdigest()
    matched = False
    for accepted in settings.key_digests:
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
) -> RequestContext:
    """The :class:`RequestContext` of an authenticated request."""
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


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` declaring ``model`` as the JSON request body.

    Routes read their body with :func:`parse_body` (auth and size checks come
    first), so FastAPI does not see the model; this puts it in the OpenAPI document.
    """
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


async def parse_body(request: Request, model: type[M], max_bytes: int) -> M:
    """Read the JSON body (size-checked first) and validate it against ``model``.

    Raises:
        InvalidRequest: body larger than ``max_bytes``, not JSON, or not a valid ``model``.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise InvalidRequest(f"request body exceeds {max_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > max_bytes:
            raise InvalidRequest(f"request body exceeds {max_bytes} bytes")
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as error:
        raise validation_error(error, request.url.path) from error
