"""Typed FastAPI dependencies: settings, Triton client, model catalogue, auth, body parsing."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from handler.errors import AuthenticationError, InvalidRequest, ValidationItem, uses_problem_json
from handler.models.catalog import ModelCatalog
from handler.settings import Settings
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


def get_request_id(request: Request) -> str:
    """The request id set by the request-id middleware."""
    return str(request.state.request_id)


SettingsDep = Annotated[Settings, Depends(get_settings)]
TritonDep = Annotated[TritonClient, Depends(get_triton)]
CatalogDep = Annotated[ModelCatalog, Depends(get_catalog)]
RequestIdDep = Annotated[str, Depends(get_request_id)]


def presented_key(request: Request) -> str | None:
    """The API key from ``Authorization: Bearer <key>`` or ``X-API-Key``, if any."""
    authorization = request.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """Accept the request only with a configured key (SHA-256 compared in constant time).

    Raises:
        AuthenticationError: no key, or a key whose digest is not configured.
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
