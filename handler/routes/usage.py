"""``GET /v1/usage``: the calling key's totals (Kalpa error envelope)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from handler.deps import ContextDep, require_api_key
from handler.schemas.storage import KeyUsage

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.get("/usage", response_model=KeyUsage)
async def usage(ctx: ContextDep) -> KeyUsage:
    """Totals of every request made with the calling key."""
    totals = await run_in_threadpool(ctx.storage.get_usage, ctx.key_id)
    return KeyUsage(
        key_id=totals.key_id,
        requests=totals.requests,
        input_chars=totals.input_chars,
        input_audio_seconds=round(totals.input_audio_seconds, 3),
        output_audio_seconds=round(totals.output_audio_seconds, 3),
        last_request_ts=totals.last_request_ts,
    )
