"""``POST /v1/audio/conversation``: validate every turn, synthesise, normalise, stitch.

Everything is validated before any synthesis (one bad turn fails the whole
request). Turns are then synthesised concurrently; output order follows the
request. Each turn is peak-normalised to ``volumeDbfs`` on its own, then
turns are joined with ``gapMs`` of silence. Under ``split`` each segment is
exactly the samples that turn contributes to the stitched file. Voicing
(:func:`voice_dialogue`) and levelling (:func:`level_dialogue`) are separate
steps so that ``/with-timestamps`` aligns words between them, on the models'
own audio.

Normalising, stitching, encoding and base64 run in worker threads: for a long
turn they take seconds of CPU, during which the event loop must go on serving
other requests, live sessions and deadline and disconnect checks.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from handler.audio import (
    MEDIA_TYPES,
    check_mp3_bitrate,
    encode,
    ms_to_samples,
    peak_normalize,
    stitch,
)
from handler.engines.catalog import ServedModel
from handler.engines.kokoro import KokoroEngine, VoiceSpecError
from handler.errors import InvalidRequest, ValidationItem
from handler.schemas.dialogue import (
    AudioSegment,
    DialogueRequest,
    DialogueTurn,
    LinkedAudio,
    SplitResponse,
)
from handler.services.context import Delivered, RequestContext
from handler.services.turn_input import require_speakable
from handler.tasks import gather_or_cancel


@dataclass(frozen=True)
class TurnPlan:
    """A validated turn: its model (and that model's named-voice engine), voice spec and text."""

    index: int
    model: ServedModel
    engine: KokoroEngine
    voice: str
    text: str


@dataclass(frozen=True)
class RenderedDialogue:
    """The stitched result, or its segments under ``split``.

    Exactly one of: ``body`` (the encoded stitched file), ``link`` (the stitched
    file's URL when it is too big inline), ``segments`` (the split response).
    """

    media_type: str
    body: bytes | None
    link: LinkedAudio | None
    segments: SplitResponse | None


def _invalid(message: str, path: list[str | int], index: int | None, code: str) -> InvalidRequest:
    return InvalidRequest(
        message,
        code=code,
        turn_index=index,
        validation=[ValidationItem([str(p) for p in path], message)],
    )


def _served_voice(
    engine: KokoroEngine, spec: str, path: list[str | int], index: int, about: str = ""
) -> str:
    """``spec`` in canonical form, checked against the voices ``engine``'s model serves now.

    Raises:
        InvalidRequest: ``unknown_voice`` at ``path``; the message is ``about``
            followed by what is wrong with the spec.
    """
    try:
        return engine.parse_voice(spec)
    except VoiceSpecError as error:
        raise _invalid(f"{about}{error}", path, index, "unknown_voice") from error


async def _saved_voice_turn(ctx: RequestContext, turn: DialogueTurn, index: int) -> TurnPlan:
    """Plan a turn that names a saved voice: the voice's model and spec are used.

    The saved spec is checked again: the model may have stopped serving a
    voice since it was saved, and Triton would refuse it mid-request (502).

    Raises:
        InvalidRequest: at ``turns[index].voiceId``: ``voiceId`` with ``voice`` or
            ``model``; no such saved voice for the key (``voice_not_found``); its
            model is no longer served (``unknown_model``); or its voice is not
            (``unknown_voice``).
        ServiceUnavailable: Triton unreachable.
    """
    path: list[str | int] = ["turns", index, "voiceId"]
    if turn.voice is not None or turn.model is not None:
        raise _invalid(
            "a turn uses either voiceId or model + voice, not both", path, index, "validation_error"
        )
    saved = await ctx.saved_voice(str(turn.voiceId))
    if saved is None or saved.voice is None:
        raise _invalid(
            f"no saved voice {turn.voiceId!r} for this key", path, index, "voice_not_found"
        )
    model, engine = await ctx.catalog.resolve_named_voices(
        saved.model, [str(p) for p in path], index
    )
    voice = _served_voice(engine, saved.voice, path, index, f"saved voice {turn.voiceId!r}: ")
    return TurnPlan(index, model, engine, voice, turn.text)


async def plan_turns(request: DialogueRequest, ctx: RequestContext) -> list[TurnPlan]:
    """Validate every turn and resolve its model and voice (saved voices included).

    The MP3 bitrate is checked against the turns' sample rate (MP3 allows
    different bitrates at different rates).

    Raises:
        InvalidRequest: with ``validation[].path`` and ``turn_index`` of the first bad turn.
    """
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
        if not turn.text.strip():
            raise _invalid("text must not be blank", [*base, "text"], index, "validation_error")
        require_speakable(turn.text, ["turns", str(index), "text"], index)
        if turn.voiceId is not None:
            plans.append(await _saved_voice_turn(ctx, turn, index))
            continue
        if turn.voice is None:
            raise _invalid("each turn needs a voice", [*base, "voice"], index, "validation_error")
        model_path = [*base, "model"] if turn.model is not None else ["model"]
        model, engine = await ctx.catalog.resolve_named_voices(
            turn.model or request.model, [str(p) for p in model_path], index
        )
        voice = _served_voice(engine, turn.voice, [*base, "voice"], index)
        plans.append(TurnPlan(index, model, engine, voice, turn.text))
    rates = {plan.engine.sample_rate for plan in plans}
    if len(rates) > 1:
        raise _invalid(
            "all turns' models must share one sample rate", ["turns"], None, "validation_error"
        )
    if request.audio_format == "mp3":
        try:
            check_mp3_bitrate(request.mp3_bitrate_kbps, rates.pop())
        except ValueError as error:
            raise _invalid(str(error), ["output", "bitrate"], None, "validation_error") from error
    return plans


@dataclass(frozen=True)
class VoicedDialogue:
    """Every turn voiced, as the models produced it (before peak normalisation).

    Attributes:
        plans: the validated turns, in request order.
        turns: float32 mono audio per turn at ``sample_rate`` Hz, shape
            [n_samples], at the model's own level.
        sample_rate: Hz.
    """

    plans: list[TurnPlan]
    turns: list[np.ndarray]
    sample_rate: int


@dataclass(frozen=True)
class SynthesizedDialogue:
    """Every turn voiced and peak-normalised, before encoding.

    Attributes:
        plans: the validated turns, in request order.
        turns: float32 mono audio per turn at ``sample_rate`` Hz, normalised.
        sample_rate: Hz.
        gap_samples: silence between consecutive turns, samples.
    """

    plans: list[TurnPlan]
    turns: list[np.ndarray]
    sample_rate: int
    gap_samples: int

    @property
    def output_s(self) -> float:
        """Duration of the stitched audio (gaps included), seconds."""
        gaps = self.gap_samples * (len(self.turns) - 1)
        return (sum(map(len, self.turns)) + gaps) / self.sample_rate

    async def record_usage(self, ctx: RequestContext) -> None:
        """Meter the request (call once it has succeeded)."""
        await ctx.record_usage(sum(len(plan.text) for plan in self.plans), 0.0, self.output_s)

    def turn_offsets_s(self) -> list[float]:
        """Start of each turn in the stitched audio, seconds."""
        offsets, position = [], 0
        for samples in self.turns:
            offsets.append(position / self.sample_rate)
            position += len(samples) + self.gap_samples
        return offsets


async def voice_dialogue(request: DialogueRequest, ctx: RequestContext) -> VoicedDialogue:
    """Validate, moderate and synthesise every turn concurrently; no levelling yet.

    Each turn's synthesis is a child event of the request's log record. Usage
    is not recorded here: the caller meters the request once it has succeeded.

    Raises:
        InvalidRequest: validation failed (nothing was synthesised).
        ServiceUnavailable, InferenceError: from Triton.
    """
    plans = await plan_turns(request, ctx)
    await ctx.moderate([plan.text for plan in plans])
    ctx.record.model = ",".join(sorted({plan.model.id for plan in plans}))
    sample_rate = plans[0].engine.sample_rate

    async def voiced(plan: TurnPlan) -> np.ndarray:
        started = time.monotonic()
        audio = await plan.engine.synthesize(ctx.triton, plan.text, plan.voice, 1.0)
        ctx.record.turn(
            plan.index,
            "voice",
            started,
            characters=len(plan.text),
            audio_seconds=round(len(audio) / sample_rate, 3),
        )
        return audio

    turns = await gather_or_cancel(*(voiced(plan) for plan in plans))
    return VoicedDialogue(plans, turns, sample_rate)


async def level_dialogue(request: DialogueRequest, voiced: VoicedDialogue) -> SynthesizedDialogue:
    """Peak-normalise each turn on its own, in a worker thread.

    Args:
        request: gives ``volumeDbfs`` (peak target, dBFS, -60..0) and ``gapMs``.
        voiced: float32 turns at the models' own level, [n_samples] each.

    Returns:
        The same turns, float32 and of the same lengths (a gain moves no
        sample, so times measured on ``voiced`` hold), each peaking at
        ``volumeDbfs`` unless it is below one 16-bit step
        (:data:`handler.audio.PCM16_LSB`), and ``gapMs`` as samples.

    Raises:
        NonFiniteAudioError: a NaN or infinite sample (the engines refuse
            such model output first).
    """
    normalised = await run_in_threadpool(
        lambda: [peak_normalize(audio, request.volumeDbfs) for audio in voiced.turns]
    )
    return SynthesizedDialogue(
        voiced.plans,
        normalised,
        voiced.sample_rate,
        ms_to_samples(request.gapMs, voiced.sample_rate),
    )


async def synthesize_dialogue(
    request: DialogueRequest, ctx: RequestContext
) -> SynthesizedDialogue:
    """Validate, synthesise every turn concurrently, peak-normalise.

    See :func:`voice_dialogue` and :func:`level_dialogue`.

    Raises:
        InvalidRequest: validation failed (nothing was synthesised).
        ServiceUnavailable, InferenceError: from Triton.
    """
    return await level_dialogue(request, await voice_dialogue(request, ctx))


def _encoder(
    request: DialogueRequest, sample_rate: int
) -> tuple[str, str, Callable[[np.ndarray], bytes]]:
    audio_format = request.audio_format

    def encoded(samples: np.ndarray) -> bytes:
        return encode(samples, sample_rate, audio_format, request.mp3_bitrate_kbps)

    extension = "raw" if audio_format == "pcm" else audio_format
    return MEDIA_TYPES[audio_format], extension, encoded


async def inline_base64(delivered: Delivered) -> str | None:
    """The delivered bytes as base64 text (encoded in a worker thread); None when sent as a URL."""
    data = delivered.data
    if not data:
        return None
    return await run_in_threadpool(lambda: base64.b64encode(data).decode())


async def encode_segments(
    request: DialogueRequest, ctx: RequestContext, voiced: SynthesizedDialogue
) -> list[AudioSegment]:
    """One segment per turn; all as URLs when together they exceed the inline threshold."""
    media_type, extension, encoded = _encoder(request, voiced.sample_rate)
    blocks = await run_in_threadpool(lambda: [encoded(samples) for samples in voiced.turns])
    too_big = sum(map(len, blocks)) > ctx.settings.inline_audio_max_bytes
    segments = []
    for plan, samples, block in zip(voiced.plans, voiced.turns, blocks, strict=True):
        delivered = await ctx.deliver(
            f"turn-{plan.index}.{extension}", block, media_type, force_url=too_big
        )
        segments.append(
            AudioSegment(
                audio=await inline_base64(delivered),
                url=delivered.url,
                expires_in=delivered.expires_in,
                mediaType=media_type,
                durationMs=round(len(samples) * 1000 / voiced.sample_rate),
                turnIndex=plan.index,
            )
        )
    return segments


async def encode_stitched(
    request: DialogueRequest, ctx: RequestContext, voiced: SynthesizedDialogue
) -> tuple[str, Delivered]:
    """The stitched file's media type and its bytes (or URL when over the threshold)."""
    media_type, extension, encoded = _encoder(request, voiced.sample_rate)
    data = await run_in_threadpool(lambda: encoded(stitch(voiced.turns, voiced.gap_samples)))
    return media_type, await ctx.deliver(
        f"conversation.{extension}", data, media_type, force_url=False
    )


async def render_dialogue(
    request: DialogueRequest, ctx: RequestContext
) -> RenderedDialogue:
    """Synthesise, then encode the stitched file or (``split``) the per-turn segments.

    Audio over ``inline_audio_max_bytes`` (the stitched file, or all segments
    together) comes back as URLs instead of bytes.

    Raises:
        InvalidRequest: validation failed (nothing was synthesised).
        ServiceUnavailable, InferenceError: from Triton.
    """
    voiced = await synthesize_dialogue(request, ctx)
    if request.split:
        segments = await encode_segments(request, ctx, voiced)
        await voiced.record_usage(ctx)
        media_type = segments[0].mediaType
        return RenderedDialogue(media_type, None, None, SplitResponse(audioSegments=segments))
    media_type, delivered = await encode_stitched(request, ctx, voiced)
    await voiced.record_usage(ctx)
    if delivered.url is not None and delivered.expires_in is not None:
        link = LinkedAudio(url=delivered.url, expires_in=delivered.expires_in)
        return RenderedDialogue(media_type, None, link, None)
    return RenderedDialogue(media_type, delivered.data, None, None)
