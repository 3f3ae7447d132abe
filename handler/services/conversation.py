"""``POST /v1/audio/conversation``: validate every turn, synthesise, normalise, stitch.

Everything is validated before any synthesis (one bad turn fails the whole
request). Turns are then synthesised concurrently; output order follows the
request. Each turn is peak-normalised to ``volumeDbfs`` on its own, then
turns are joined with ``gapMs`` of silence. Under ``split`` each segment is
exactly the samples that turn contributes to the stitched file.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass

import numpy as np

from handler.audio import (
    MEDIA_TYPES,
    encode,
    mp3_compression_level,
    ms_to_samples,
    peak_normalize,
    stitch,
)
from handler.errors import InvalidRequest, ValidationItem
from handler.models.catalog import ModelCatalog, ServedModel
from handler.models.kokoro import VoiceSpecError, parse_voice_spec
from handler.schemas.conversation import AudioSegment, ConversationRequest, SplitResponse
from handler.services.common import resolve_model, within_deadline
from handler.settings import Settings
from handler.triton import TritonClient


@dataclass(frozen=True)
class TurnPlan:
    """A validated turn: its model, canonical voice spec and text."""

    index: int
    model: ServedModel
    voice: str
    text: str


@dataclass(frozen=True)
class RenderedConversation:
    """The stitched result, or its segments under ``split``.

    ``body`` is the encoded stitched file (None under split); ``segments`` the
    split response (None otherwise).
    """

    media_type: str
    body: bytes | None
    segments: SplitResponse | None


def _invalid(message: str, path: list[str | int], index: int | None, code: str) -> InvalidRequest:
    return InvalidRequest(
        message,
        code=code,
        turn_index=index,
        validation=[ValidationItem([str(p) for p in path], message)],
    )


async def plan_turns(request: ConversationRequest, catalog: ModelCatalog) -> list[TurnPlan]:
    """Validate every turn and resolve its model and voice.

    Raises:
        InvalidRequest: with ``validation[].path`` and ``turn_index`` of the first bad turn.
    """
    if request.audio_format == "mp3":
        try:
            mp3_compression_level(request.mp3_bitrate_kbps, 24_000)
        except ValueError as error:
            raise _invalid(str(error), ["output", "bitrate"], None, "validation_error") from error
    plans = []
    for index, turn in enumerate(request.turns):
        base: list[str | int] = ["turns", index]
        if request.model is not None and turn.model is not None:
            raise _invalid(
                "set model at the top level or on each turn, not both",
                [*base, "model"],
                index,
                "validation_error",
            )
        if turn.voiceId is not None:
            if turn.voice is not None or turn.model is not None:
                raise _invalid(
                    "a turn uses either voiceId or model + voice, not both",
                    [*base, "voiceId"],
                    index,
                    "validation_error",
                )
            raise _invalid(
                "saved voices (voiceId) are not available on this server yet; use an inline voice",
                [*base, "voiceId"],
                index,
                "voice_id_unsupported",
            )
        if turn.voice is None:
            raise _invalid("each turn needs a voice", [*base, "voice"], index, "validation_error")
        model_path = [*base, "model"] if turn.model is not None else ["model"]
        model = await resolve_model(
            catalog, turn.model or request.model, [str(p) for p in model_path], index
        )
        try:
            voice = parse_voice_spec(turn.voice, model.adapter.voices)
        except VoiceSpecError as error:
            raise _invalid(str(error), [*base, "voice"], index, "unknown_voice") from error
        if not turn.text.strip():
            raise _invalid("text must not be blank", [*base, "text"], index, "validation_error")
        plans.append(TurnPlan(index, model, voice, turn.text))
    rates = {plan.model.sample_rate for plan in plans}
    if len(rates) > 1:
        raise _invalid(
            "all turns' models must share one sample rate", ["turns"], None, "validation_error"
        )
    return plans


async def render_conversation(
    request: ConversationRequest,
    catalog: ModelCatalog,
    triton: TritonClient,
    settings: Settings,
) -> RenderedConversation:
    """Validate, synthesise every turn concurrently, normalise, stitch and encode.

    Raises:
        InvalidRequest: validation failed (nothing was synthesised).
        ServiceUnavailable, InferenceError, DeadlineExceeded: from Triton.
    """
    plans = await plan_turns(request, catalog)
    sample_rate = plans[0].model.sample_rate
    synthesis = asyncio.gather(
        *(
            plan.model.adapter.synthesize(
                triton, plan.text, plan.voice, 1.0, settings.sentence_pause_ms
            )
            for plan in plans
        )
    )
    turns = await within_deadline(synthesis, settings.triton_timeout_s)
    normalised = [peak_normalize(audio, request.volumeDbfs) for audio in turns]
    audio_format = request.audio_format
    media_type = MEDIA_TYPES[audio_format]

    def encoded(samples: np.ndarray) -> bytes:
        return encode(samples, sample_rate, audio_format, request.mp3_bitrate_kbps)

    if request.split:
        segments = [
            AudioSegment(
                audio=base64.b64encode(encoded(samples)).decode(),
                mediaType=media_type,
                durationMs=round(len(samples) * 1000 / sample_rate),
                turnIndex=plan.index,
            )
            for plan, samples in zip(plans, normalised, strict=True)
        ]
        return RenderedConversation(media_type, None, SplitResponse(audioSegments=segments))
    stitched = stitch(normalised, ms_to_samples(request.gapMs, sample_rate))
    return RenderedConversation(media_type, encoded(stitched), None)
