"""``/v1/voices`` (saved voices) and ``/v1/usage`` (Kalpa error envelope)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from handler.deps import ContextDep, SettingsDep, json_body, parse_body, require_api_key
from handler.schemas.storage import Usage, Voice, VoiceCreate, VoiceList
from handler.services import voices

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
    return await voices.create_voice(body, ctx)


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


@router.get("/usage", response_model=Usage)
async def usage(ctx: ContextDep) -> Usage:
    """Totals of every request made with the calling key."""
    totals = await run_in_threadpool(ctx.storage.get_usage, ctx.key_id)
    return Usage(
        key_id=totals.key_id,
        requests=totals.requests,
        input_chars=totals.input_chars,
        input_audio_seconds=round(totals.input_audio_seconds, 3),
        output_audio_seconds=round(totals.output_audio_seconds, 3),
        last_request_ts=totals.last_request_ts,
    )
