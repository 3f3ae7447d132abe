"""``POST /v1/audio/conversation`` (problem+json errors)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from handler.deps import (
    ContextDep,
    SettingsDep,
    parse_body,
    require_api_key,
    run_admitted,
)
from handler.routes.openapi import json_body, ref
from handler.schemas.dialogue import (
    MAX_BODY_BYTES,
    DialogueRequest,
    LinkedDialogue,
    SplitResponse,
    TimestampsRequest,
    TimestampsResponse,
    TimestampsSplitResponse,
)
from handler.services.dialogue import render_dialogue
from handler.services.timestamps import render_with_timestamps
from handler.settings import Settings

router = APIRouter(prefix="/v1/audio", dependencies=[Depends(require_api_key)])


def _body_limit(settings: Settings) -> int:
    """Largest body these routes read: ``max_request_bytes``, capped at the largest valid dialogue.

    The process-wide ``max_request_bytes`` (64 MiB by default) is sized for
    ``/v1/converse`` history audio; a dialogue body is only text, so one over
    :data:`MAX_BODY_BYTES` is refused (413) before it is read and parsed.
    """
    return min(settings.max_request_bytes, MAX_BODY_BYTES)


@router.post(
    "/conversation",
    responses={
        200: {
            "content": {
                "audio/wav": {},
                "audio/mpeg": {},
                "audio/pcm": {},
                "application/json": {
                    "schema": {"anyOf": [ref(SplitResponse), ref(LinkedDialogue)]}
                },
            }
        }
    },
    openapi_extra=json_body(DialogueRequest),
)
async def post_dialogue(request: Request, settings: SettingsDep, ctx: ContextDep) -> Response:
    """Stitched audio bytes, ``{audioSegments, warnings}`` with ``split: true``, or a link.

    A stitched file over the inline threshold comes back as JSON
    ``{"audio": {"url", "expires_in"}, "mediaType"}``.
    """
    body = await parse_body(request, DialogueRequest, _body_limit(settings))
    rendered = await run_admitted(request, ctx, lambda: render_dialogue(body, ctx))
    if rendered.segments is not None:
        return JSONResponse(rendered.segments.model_dump())
    if rendered.link is not None:
        linked = LinkedDialogue(audio=rendered.link, mediaType=rendered.media_type)
        return JSONResponse(linked.model_dump())
    return Response(content=rendered.body, media_type=rendered.media_type)


@router.post(
    "/conversation/with-timestamps",
    response_model=TimestampsResponse | TimestampsSplitResponse,
    openapi_extra=json_body(TimestampsRequest),
)
async def post_dialogue_with_timestamps(
    request: Request, settings: SettingsDep, ctx: ContextDep
) -> TimestampsResponse | TimestampsSplitResponse:
    """Stitched audio (base64) with word timestamps, or timed per-turn segments."""
    body = await parse_body(request, TimestampsRequest, _body_limit(settings))
    return await run_admitted(request, ctx, lambda: render_with_timestamps(body, ctx))
