"""Saved voices: create (validated against the model), fetch, list, delete."""

from __future__ import annotations

import asyncio
import time
import uuid

from starlette.concurrency import run_in_threadpool

from handler.engines.kokoro import VoiceSpecError
from handler.errors import InvalidRequest, NotFound
from handler.schemas.storage import Voice, VoiceCreate, VoiceList
from handler.services.context import RequestContext
from handler.storage.base import SavedVoice, decode_cursor


def public(voice: SavedVoice) -> Voice:
    """The API shape of a stored voice."""
    return Voice(
        id=voice.id,
        name=voice.name,
        model=voice.model,
        voice=voice.voice,
        reference_audio_id=voice.reference_audio_id,
        transcript=voice.transcript,
        created_at=voice.created_at,
    )


async def new_voice(body: VoiceCreate, ctx: RequestContext) -> SavedVoice:
    """Validate a voice for the caller's key; not yet stored (:func:`save_voice`).

    A Kokoro voice is a bundled voice or blend (``voice``); reference clips
    (``reference_audio_id`` + ``transcript``) need a model that clones voices,
    which the served models do not.

    Raises:
        InvalidRequest: unknown model, bad voice spec, or a clip for a model without cloning.
        ServiceUnavailable: Triton unreachable (the served models are read from it).
    """
    model = await ctx.catalog.resolve(body.model, ["model"])
    if body.reference_audio_id is not None or body.transcript is not None:
        raise InvalidRequest(
            f"model {model.id!r} has no voice cloning: save a bundled voice or blend as 'voice'"
        )
    if body.voice is None:
        raise InvalidRequest("'voice' is required (a bundled voice or a blend)")
    try:
        _, engine = await ctx.catalog.resolve_named_voices(model.id, ["model"])
        spec = engine.parse_voice(body.voice)
    except VoiceSpecError as error:
        raise InvalidRequest(f"voice: {error}") from error
    voice = SavedVoice(
        id=str(uuid.uuid4()),
        key_id=ctx.key_id,
        name=body.name,
        model=model.id,
        voice=spec,
        reference_audio_id=None,
        transcript=None,
        created_at=time.time(),
    )
    return voice


async def save_voice(voice: SavedVoice, ctx: RequestContext) -> Voice:
    """Store ``voice`` and return its public form.

    The write runs to its end even if the caller is cancelled meanwhile, so a
    request is never refused after its voice was stored.
    """
    await asyncio.shield(run_in_threadpool(ctx.storage.put_voice, voice))
    return public(voice)


async def get_voice(voice_id: str, ctx: RequestContext) -> Voice:
    """The caller's voice.

    Raises:
        NotFound: no such voice for this key.
    """
    voice = await ctx.saved_voice(voice_id)
    if voice is None:
        raise NotFound(f"no voice {voice_id!r}")
    return public(voice)


async def delete_voice(voice_id: str, ctx: RequestContext) -> None:
    """Delete the caller's voice.

    Raises:
        NotFound: no such voice for this key.
    """
    if not await run_in_threadpool(ctx.storage.delete_voice, ctx.key_id, voice_id):
        raise NotFound(f"no voice {voice_id!r}")


async def list_voices(limit: int, cursor: str | None, ctx: RequestContext) -> VoiceList:
    """One page of the caller's voices, oldest first.

    Raises:
        InvalidRequest: ``limit`` outside 1..200 or a cursor this service did not issue.
    """
    if not 1 <= limit <= 200:
        raise InvalidRequest("limit must be between 1 and 200")
    try:
        after = decode_cursor(cursor) if cursor else None
    except ValueError as error:
        raise InvalidRequest("cursor: not a cursor from a previous page") from error
    page = await run_in_threadpool(ctx.storage.list_voices, ctx.key_id, limit, after)
    return VoiceList(
        data=[public(v) for v in page.voices], next_cursor=page.next_cursor, has_more=page.has_more
    )
