"""``POST /v1/converse``: validate the conversation, voice the open turn, meter usage.

Rules (kalpa-converse.md), all checked before any synthesis:
  * every turn but the last carries text and/or audio;
  * the open (last) turn carries text to voice; text and audio together -> 400,
    audio alone -> 400 (nothing to generate); speaker only -> needs a model
    with the ``author`` mode (none is served yet) -> 400;
  * speaker labels must be the model's advertised ones;
  * history audio: at most 25 MiB decoded per turn, decodable WAV;
  * ``params`` must be ones the model supports, inside its ranges.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from handler.audio import encode_wav
from handler.errors import InvalidRequest
from handler.models.catalog import ServedModel
from handler.schemas.converse import (
    ConverseParams,
    ConverseRequest,
    ConverseResponse,
    Reply,
    ReplyAudio,
    Usage,
)
from handler.services.common import (
    decode_turn_audio,
    load_uploaded_audio,
    resolve_model,
    within_deadline,
)
from handler.services.context import RequestContext

# Parameters each family accepts; the rest of ConverseParams belongs to codec LMs.
_KOKORO_PARAMS = frozenset({"speed"})


@dataclass(frozen=True)
class _Plan:
    model: ServedModel
    speaker: str
    text: str
    speed: float
    input_audio_seconds: float


def _check_params(model: ServedModel, params: ConverseParams | None) -> float:
    """Validate ``params`` against the model; returns the speaking rate."""
    given = params.model_dump(exclude_none=True) if params else {}
    unsupported = sorted(set(given) - _KOKORO_PARAMS)
    if unsupported:
        raise InvalidRequest(
            f"params {', '.join(unsupported)} not supported by model {model.id!r} "
            f"(supported: {', '.join(sorted(_KOKORO_PARAMS))})"
        )
    speed = float(given.get("speed", 1.0))
    low, high = model.adapter.speed_range
    if not low <= speed <= high:
        raise InvalidRequest(f"params.speed must be within [{low}, {high}] for {model.id!r}")
    return speed


async def _history_audio_seconds(request: ConverseRequest, ctx: RequestContext) -> float:
    """Decode every history clip (inline or uploaded) and sum their durations."""
    seconds = 0.0
    for index, turn in enumerate(request.conversation[:-1]):
        if turn.audio_wav_b64 and turn.audio_id:
            raise InvalidRequest(
                f"conversation[{index}]: send audio_wav_b64 or audio_id, not both",
                turn_index=index,
            )
        if turn.audio_wav_b64:
            seconds += decode_turn_audio(turn.audio_wav_b64, index).duration_s
        elif turn.audio_id:
            seconds += (await load_uploaded_audio(ctx, turn.audio_id, index)).duration_s
    return seconds


async def _plan(request: ConverseRequest, ctx: RequestContext) -> _Plan:
    model = await resolve_model(ctx.catalog, request.model, ["model"])
    history, open_turn = request.conversation[:-1], request.conversation[-1]
    last = len(request.conversation) - 1
    for index, turn in enumerate(request.conversation):
        if turn.speaker not in model.speakers:
            raise InvalidRequest(
                f"conversation[{index}].speaker {turn.speaker!r} is not a speaker label of "
                f"{model.id!r}; use one of {model.speakers}",
                turn_index=index,
            )
    for index, turn in enumerate(history):
        if not (turn.text and turn.text.strip()) and not (turn.audio_wav_b64 or turn.audio_id):
            raise InvalidRequest(
                f"conversation[{index}]: a history turn needs text and/or audio_wav_b64",
                turn_index=index,
            )
    has_text = bool(open_turn.text and open_turn.text.strip())
    open_audio = open_turn.audio_wav_b64 or open_turn.audio_id
    if has_text and open_audio:
        raise InvalidRequest(
            f"conversation[{last}]: the open turn already has text and audio; "
            "nothing is left to generate",
            turn_index=last,
        )
    if open_audio:
        raise InvalidRequest(
            f"conversation[{last}]: the open turn carries audio only; send text to voice, "
            "or only a speaker to have the turn authored",
            turn_index=last,
        )
    if not has_text and "author" not in model.modes:
        raise InvalidRequest(
            f"conversation[{last}]: authoring the open turn needs a model with the 'author' "
            f"mode, and {model.id!r} has modes {model.modes}; give the open turn text",
            turn_index=last,
        )
    speed = _check_params(model, request.params)
    input_audio_seconds = await _history_audio_seconds(request, ctx)
    return _Plan(model, open_turn.speaker, str(open_turn.text), speed, input_audio_seconds)


async def converse(request: ConverseRequest, ctx: RequestContext) -> ConverseResponse:
    """Voice the open turn as its speaker, build the response and record usage.

    History is validated and metered; Kokoro voices the open turn on its own
    (it has no context), with the voice bound to the speaker label. Audio over
    ``inline_audio_max_bytes`` comes back as ``audio.url`` + ``expires_in``.

    Raises:
        InvalidRequest: a spec rule or cap is broken (before any synthesis).
        ServiceUnavailable, InferenceError, DeadlineExceeded: from Triton.
    """
    plan = await _plan(request, ctx)
    adapter = plan.model.adapter
    voice = adapter.speaker_voices[int(plan.speaker)]
    settings = ctx.settings
    audio = await within_deadline(
        adapter.synthesize(ctx.triton, plan.text, voice, plan.speed, settings.sentence_pause_ms),
        settings.triton_timeout_s,
    )
    delivered = await ctx.deliver(
        "reply.wav", encode_wav(audio, adapter.sample_rate), "audio/wav", force_url=False
    )
    usage = Usage(
        input_chars=sum(len(turn.text or "") for turn in request.conversation),
        input_audio_seconds=round(plan.input_audio_seconds, 3),
        output_audio_seconds=round(len(audio) / adapter.sample_rate, 3),
    )
    await ctx.record_usage(usage.input_chars, usage.input_audio_seconds, usage.output_audio_seconds)
    return ConverseResponse(
        request_id=ctx.request_id,
        model=plan.model.id,
        reply=Reply(
            speaker=plan.speaker,
            text=plan.text,
            audio=ReplyAudio(
                sample_rate=adapter.sample_rate,
                num_quantizers=plan.model.num_quantizers,
                data_b64=base64.b64encode(delivered.data).decode() if delivered.data else None,
                url=delivered.url,
                expires_in=delivered.expires_in,
            ),
        ),
        usage=usage,
    )
