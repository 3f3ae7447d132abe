"""Uploads (``POST /v1/uploads``) and the local blob store's signed file URLs.

With the S3 blob backend, upload and download URLs are S3 presigned URLs and
``/v1/files/*`` answers 404. With the local backend, ``GET``/``PUT
/v1/files/{key}?expires=&signature=`` serve them; they need no API key (the
signature is the credential), like presigned URLs.
"""

from __future__ import annotations

import re
import time
import uuid

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from handler.deps import BlobsDep, ContextDep, read_body, require_api_key
from handler.errors import AuthenticationError, NotFound
from handler.schemas.converse import MAX_TURN_AUDIO_BYTES
from handler.schemas.storage import Upload
from handler.storage.blobs import LocalBlobStore

uploads = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
files = APIRouter(prefix="/v1")
# Unix seconds in ASCII digits (str.isdigit() takes "²", which int() refuses), and few
# enough that int() never meets its 4300-digit limit; anything else is no valid signature.
_EXPIRES = re.compile(r"[0-9]{1,20}")


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
    """The local blob store, once ``signature`` is valid for ``method`` on ``key``.

    Raises:
        NotFound: blobs live in the object store (S3 serves its own URLs).
        AuthenticationError: ``expires`` is no Unix time in ASCII digits, has
            passed, or ``signature`` does not sign it (401).
    """
    if not isinstance(blobs, LocalBlobStore):
        raise NotFound("files are served by the object store")
    valid = _EXPIRES.fullmatch(expires) is not None and blobs.verify(
        method, key, int(expires), signature, time.time()
    )
    if not valid:
        raise AuthenticationError("invalid or expired file signature")
    return blobs


@files.get("/files/{key:path}")
async def download(key: str, blobs: BlobsDep, expires: str = "", signature: str = "") -> Response:
    """The object's bytes (signed local URL: ``expires`` unix seconds, ``signature``).

    Raises:
        AuthenticationError: the signature is missing, wrong or expired (401).
        NotFound: no such file, or blobs live in the object store (404).
    """
    store = _local_store(blobs, "GET", key, expires, signature)
    path = await run_in_threadpool(store.file, key)
    if path is None:
        raise NotFound(f"no file {key!r}")
    media_type = await run_in_threadpool(store.content_type, key)
    # Streamed from disk in worker threads: the event loop never reads the file, nor holds it whole.
    return FileResponse(path, media_type=media_type)


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
    """Store an upload (signed local URL: ``expires``, ``signature``); at most 25 MiB.

    Raises:
        AuthenticationError: the signature is missing, wrong or expired (401).
        PayloadTooLarge: the body is (or its ``Content-Length`` says it is) over
            25 MiB (413; a declared size is refused before the body is read).
        ClientClosedRequest: the client disconnected while sending it (499, logged only).
    """
    store = _local_store(blobs, "PUT", key, expires, signature)
    body = await read_body(request, MAX_TURN_AUDIO_BYTES)
    await run_in_threadpool(store.put, key, body, request.headers.get("content-type", "audio/wav"))
    return Response(status_code=204)
