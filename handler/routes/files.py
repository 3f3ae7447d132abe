"""Uploads (``POST /v1/uploads``) and the local blob store's signed file URLs.

With the S3 blob backend, upload and download URLs are S3 presigned URLs and
``/v1/files/*`` answers 404. With the local backend, ``GET``/``PUT
/v1/files/{key}?expires=&signature=`` serve them; they need no API key (the
signature is the credential), like presigned URLs.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request, Response

from handler.deps import BlobsDep, ContextDep, require_api_key
from handler.errors import AuthenticationError, InvalidRequest, NotFound
from handler.schemas.converse import MAX_TURN_AUDIO_BYTES
from handler.schemas.storage import Upload
from handler.storage.blobs import LocalBlobStore

uploads = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
files = APIRouter(prefix="/v1")


@uploads.post("/uploads", status_code=201, response_model=Upload)
async def create_upload(ctx: ContextDep) -> Upload:
    """A PUT URL for one WAV clip (at most 25 MiB) and the ``audio_id`` turns can use."""
    upload_id = uuid.uuid4().hex
    expires = ctx.settings.url_expires_s
    url = ctx.blobs.upload_url(ctx.upload_key(upload_id), expires, ctx.base_url)
    return Upload(id=upload_id, upload_url=url, expires_in=expires, max_bytes=MAX_TURN_AUDIO_BYTES)


def _local_store(
    blobs: object, method: str, key: str, expires: str, signature: str
) -> LocalBlobStore:
    if not isinstance(blobs, LocalBlobStore):
        raise NotFound("files are served by the object store")
    if not (expires.isdigit() and blobs.verify(method, key, int(expires), signature, time.time())):
        raise AuthenticationError("invalid or expired file signature")
    return blobs


@files.get("/files/{key:path}")
async def download(key: str, blobs: BlobsDep, expires: str = "", signature: str = "") -> Response:
    """The object's bytes (signed local URL: ``expires`` unix seconds, ``signature``)."""
    store = _local_store(blobs, "GET", key, expires, signature)
    data = store.get(key, max_bytes=1 << 31)
    if data is None:
        raise NotFound(f"no file {key!r}")
    return Response(content=data, media_type=store.content_type(key))


@files.put(
    "/files/{key:path}",
    status_code=204,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                media_type: {"schema": {"type": "string", "format": "binary"}}
                for media_type in ("audio/wav", "application/octet-stream")
            },
        }
    },
)
async def upload(
    key: str, request: Request, blobs: BlobsDep, expires: str = "", signature: str = ""
) -> Response:
    """Store an upload (signed local URL: ``expires``, ``signature``); at most 25 MiB."""
    store = _local_store(blobs, "PUT", key, expires, signature)
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_TURN_AUDIO_BYTES:
            raise InvalidRequest(f"upload exceeds {MAX_TURN_AUDIO_BYTES} bytes (25 MiB)")
    store.put(key, bytes(body), request.headers.get("content-type", "audio/wav"))
    return Response(status_code=204)
