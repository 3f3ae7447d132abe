"""``/v1/voices``: saved voices (Kalpa error envelope)."""

from __future__ import annotations

import re

from fastapi import APIRouter, Depends, Request, Response

from handler.deps import ContextDep, SettingsDep, parse_body, require_api_key
from handler.errors import NotFound
from handler.routes.openapi import json_body
from handler.schemas.storage import Voice, VoiceCreate, VoiceList
from handler.services import voices
from handler.services.deadline import within_deadline
from handler.storage.base import is_voice_id

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
_LIMIT = re.compile(r"0*([0-9]{1,9})")  # leading zeros were always accepted ("007" is 7)


@router.post(
    "/voices",
    status_code=201,
    response_model=Voice,
    openapi_extra=json_body(VoiceCreate),
)
async def create_voice(request: Request, settings: SettingsDep, ctx: ContextDep) -> Voice:
    """Save a bundled voice or blend under a name; its id is a ``voiceId``.

    Validation runs under the request's deadline; the write after it does not,
    so a 504 never leaves a stored voice behind (a retry would store a second).
    """
    body = await parse_body(request, VoiceCreate, settings.max_request_bytes)
    voice = await within_deadline(voices.new_voice(body, ctx), ctx.deadline)
    return await voices.save_voice(voice, ctx)


@router.get("/voices", response_model=VoiceList)
async def list_voices(ctx: ContextDep, limit: str = "50", cursor: str | None = None) -> VoiceList:
    """The caller's voices, oldest first, ``limit`` (1-200, default 50) per page.

    Raises:
        InvalidRequest: ``limit`` is not a whole number in 1..200 (any other text,
            including non-ASCII digits, is out of range), or a foreign ``cursor``.
    """
    # ASCII digits only (str.isdigit() takes "¹", which int() refuses), and few enough
    # that int() never meets its 4300-digit limit; anything else is out of range.
    match = _LIMIT.fullmatch(limit)
    return await voices.list_voices(int(match.group(1)) if match else 0, cursor, ctx)


def _known_shape(voice_id: str) -> str:
    """``voice_id`` when it can be a saved voice's id.

    Raises:
        NotFound: it cannot (ids are UUIDs), before storage is asked: DynamoDB
            refuses a key over 1024 bytes with an error, not an empty answer.
    """
    if not is_voice_id(voice_id):
        raise NotFound(f"no voice {voice_id!r}")
    return voice_id


@router.get("/voices/{voice_id}", response_model=Voice)
async def get_voice(voice_id: str, ctx: ContextDep) -> Voice:
    """One saved voice.

    Raises:
        NotFound: no such voice for this key.
    """
    return await voices.get_voice(_known_shape(voice_id), ctx)


@router.delete("/voices/{voice_id}", status_code=204)
async def delete_voice(voice_id: str, ctx: ContextDep) -> Response:
    """Delete a saved voice (204).

    Raises:
        NotFound: no such voice for this key.
    """
    await voices.delete_voice(_known_shape(voice_id), ctx)
    return Response(status_code=204)
