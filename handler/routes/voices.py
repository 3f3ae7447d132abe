"""``/v1/voices``: saved voices (Kalpa error envelope)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from handler.deps import ContextDep, SettingsDep, parse_body, require_api_key
from handler.routes.openapi import json_body
from handler.schemas.storage import Voice, VoiceCreate, VoiceList
from handler.services import voices
from handler.services.deadline import within_deadline

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.post(
    "/voices",
    status_code=201,
    response_model=Voice,
    openapi_extra=json_body(VoiceCreate),
)
async def create_voice(request: Request, settings: SettingsDep, ctx: ContextDep) -> Voice:
    """Save a bundled voice or blend under a name; its id is a ``voiceId``."""
    body = await parse_body(request, VoiceCreate, settings.max_request_bytes)
    return await within_deadline(voices.create_voice(body, ctx), ctx.deadline)


@router.get("/voices", response_model=VoiceList)
async def list_voices(ctx: ContextDep, limit: str = "50", cursor: str | None = None) -> VoiceList:
    """The caller's voices, oldest first, ``limit`` (1-200, default 50) per page."""
    return await voices.list_voices(int(limit) if limit.isdigit() else 0, cursor, ctx)


@router.get("/voices/{voice_id}", response_model=Voice)
async def get_voice(voice_id: str, ctx: ContextDep) -> Voice:
    """One saved voice."""
    return await voices.get_voice(voice_id, ctx)


@router.delete("/voices/{voice_id}", status_code=204)
async def delete_voice(voice_id: str, ctx: ContextDep) -> Response:
    """Delete a saved voice (204)."""
    await voices.delete_voice(voice_id, ctx)
    return Response(status_code=204)
