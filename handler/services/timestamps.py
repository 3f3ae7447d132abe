"""``POST /v1/audio/conversation/with-timestamps``: stitched audio plus word timing.

Each turn's own audio, as the model produced it (before peak normalisation),
is resampled to 16 kHz and its text is forced-aligned by the ``aligner``
model; when alignment fails, Whisper's word timestamps for that turn are used
instead (and a warning says so); when both fail the request answers 503
``timestamps_unavailable``. Normalisation is a gain and moves no sample, so the
times hold for the normalised audio; aligning before it keeps them independent
of ``volumeDbfs``: pocketsphinx hears 16-bit samples, and a turn levelled to
-60 dBFS peaks at 32 of them (on the real stack, 3 of 12 turns then failed to
align and fell back to Whisper, and aligned words moved by up to 230 ms).
Whisper is asked for English: the conversation request carries no language
(the speechbase spec has no such field) and Kokoro's frontend phonemises
English only. Stitched timestamps add each turn's start in the stitched file
(gaps included); split segments carry block-relative ones. Resampling runs in
a worker thread, off the event loop (see :mod:`handler.services.dialogue`).
"""

from __future__ import annotations

import time

import numpy as np
from starlette.concurrency import run_in_threadpool

from handler.audio import resample
from handler.errors import InferenceError, TimestampsUnavailable
from handler.schemas.dialogue import (
    DialogueWord,
    SegmentWord,
    TimedAudioSegment,
    TimestampsRequest,
    TimestampsResponse,
    TimestampsSplitResponse,
)
from handler.services.context import RequestContext
from handler.services.dialogue import (
    TurnPlan,
    VoicedDialogue,
    encode_segments,
    encode_stitched,
    inline_base64,
    level_dialogue,
    voice_dialogue,
)
from handler.tasks import gather_or_cancel
from handler.transcription import SPEECH_SAMPLE_RATE, TimedWord, align, transcribe

# Whisper's language for the fallback (see the module docstring).
FALLBACK_LANGUAGE = "en"


def _clamped(words: list[TimedWord], duration_s: float) -> list[TimedWord]:
    """Keep intervals inside [0, duration] and in order without overlap."""
    result: list[TimedWord] = []
    floor = 0.0
    for word in words:
        start = min(max(word.start, floor), duration_s)
        end = min(max(word.end, start), duration_s)
        result.append(TimedWord(word.text, round(start, 3), round(end, 3)))
        floor = end
    return result


async def _turn_words(
    ctx: RequestContext, plan: TurnPlan, samples: np.ndarray, sample_rate: int
) -> tuple[list[TimedWord], str | None]:
    audio = await run_in_threadpool(resample, samples, sample_rate, SPEECH_SAMPLE_RATE)
    duration_s = len(samples) / sample_rate
    started = time.monotonic()
    try:
        words = _clamped(await align(ctx.triton, audio, plan.text), duration_s)
    except InferenceError:
        ctx.record.turn(plan.index, "align", started, failed=True)
    else:
        ctx.record.turn(plan.index, "align", started, words=len(words))
        return words, None
    started = time.monotonic()
    try:
        _, words = await transcribe(ctx.triton, audio, FALLBACK_LANGUAGE)
    except InferenceError as error:
        raise TimestampsUnavailable(
            f"turn {plan.index}: neither alignment nor speech recognition produced timestamps",
            turn_index=plan.index,
            headers={"Retry-After": str(ctx.settings.retry_after_s)},
        ) from error
    ctx.record.turn(plan.index, "transcribe", started, words=len(words))
    warning = f"turn {plan.index}: forced alignment failed; word timestamps come from ASR"
    return _clamped(words, duration_s), warning


async def _all_words(
    ctx: RequestContext, voiced: VoicedDialogue
) -> tuple[list[list[TimedWord]], list[str]]:
    results = await gather_or_cancel(
        *(
            _turn_words(ctx, plan, samples, voiced.sample_rate)
            for plan, samples in zip(voiced.plans, voiced.turns, strict=True)
        )
    )
    return [words for words, _ in results], [w for _, w in results if w]


async def render_with_timestamps(
    request: TimestampsRequest, ctx: RequestContext
) -> TimestampsResponse | TimestampsSplitResponse:
    """Synthesise, time every word (unless ``timestamps`` is "off"), encode, then meter.

    Usage is recorded only once the timestamps exist: a request that fails
    (e.g. 503 ``timestamps_unavailable``) is not metered.

    Raises:
        InvalidRequest: validation failed (nothing was synthesised).
        TimestampsUnavailable: a turn could be timed neither way (503).
        ServiceUnavailable, InferenceError: from Triton.
    """
    unlevelled = await voice_dialogue(request, ctx)
    if request.timestamps == "on":
        per_turn, warnings = await _all_words(ctx, unlevelled)
    else:
        per_turn, warnings = [[] for _ in unlevelled.turns], []
    voiced = await level_dialogue(request, unlevelled)
    del unlevelled  # not kept beside the levelled copy while encoding
    if request.split:
        segments = await encode_segments(request, ctx, voiced)
        timed = [
            TimedAudioSegment(
                **segment.model_dump(),
                timestamps=[SegmentWord(text=w.text, start=w.start, end=w.end) for w in words],
            )
            for segment, words in zip(segments, per_turn, strict=True)
        ]
        await voiced.record_usage(ctx)
        return TimestampsSplitResponse(audioSegments=timed, warnings=warnings)
    media_type, delivered = await encode_stitched(request, ctx, voiced)
    stitched = [
        DialogueWord(
            text=w.text,
            start=round(w.start + offset, 3),
            end=round(w.end + offset, 3),
            turnIndex=plan.index,
        )
        for plan, offset, words in zip(voiced.plans, voiced.turn_offsets_s(), per_turn, strict=True)
        for w in words
    ]
    await voiced.record_usage(ctx)
    return TimestampsResponse(
        audio=await inline_base64(delivered),
        url=delivered.url,
        expires_in=delivered.expires_in,
        mediaType=media_type,
        warnings=warnings,
        timestamps=stitched,
    )
