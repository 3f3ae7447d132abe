"""``POST /v1/converse``: validate the conversation, author and/or voice the open turn.

Rules (kalpa-converse.md), all checked before any synthesis:
  * every turn but the last carries text and/or audio;
  * the open (last) turn: text -> voice exactly that text; text and audio
    together -> 400 (nothing to generate); audio alone -> 400; speaker only ->
    author the text (needs the ``author`` mode), then voice it;
  * speaker labels must be the model's advertised ones;
  * history audio: at most 25 MiB decoded per turn, decodable WAV;
  * ``params`` must be ones the model supports, inside its ranges.

Kokoro voices the open turn on its own with the voice bound to its speaker
label; a CSM model voices it conditioned on every history turn (text, audio,
or audio with its Whisper transcript when ASR is served).
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass

import numpy as np

from handler.audio import DecodedAudio, encode_wav, resample
from handler.errors import InvalidRequest
from handler.models.author import AuthorParams, author_turn
from handler.models.catalog import ServedModel
from handler.models.csm import CsmModel, CsmParams, Segment
from handler.models.kokoro import KokoroModel
from handler.models.speech import SPEECH_SAMPLE_RATE, transcribe
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
    require_speakable,
    resolve_model,
    within_deadline,
)
from handler.services.context import RequestContext

# Parameters each use accepts: Kokoro voices with a speaking rate; authoring
# adds the author LM's sampling parameters; CSM takes the codec LM's sampling
# parameters (kalpa-converse ``params``).
_VOICE_PARAMS = frozenset({"speed"})
_AUTHOR_PARAMS = frozenset({"temperature", "top_k", "max_new_tokens", "seed"})
_CSM_PARAMS = frozenset(
    {
        "temperature", "depth_temperature", "top_k", "repetition_penalty", "penalty_window",
        "max_new_tokens", "quantizers", "seed",
    }
)
_AUTHOR_MAX_NEW_TOKENS = (16, 128)


@dataclass(frozen=True)
class _Plan:
    model: ServedModel
    speaker: str
    text: str | None
    speed: float
    author: AuthorParams | None
    csm: CsmParams | None
    clips: dict[int, DecodedAudio]


def _given_params(
    model: ServedModel, params: ConverseParams | None, supported: frozenset[str]
) -> dict[str, float | int]:
    """The params the request set, refusing any ``model`` does not take here."""
    given = params.model_dump(exclude_none=True) if params else {}
    unsupported = sorted(set(given) - supported)
    if unsupported:
        raise InvalidRequest(
            f"params {', '.join(unsupported)} not supported by model {model.id!r} for this "
            f"request (supported: {', '.join(sorted(supported))})"
        )
    return given


def _csm_params(
    model: ServedModel, adapter: CsmModel, params: ConverseParams | None
) -> CsmParams:
    """Validate ``params`` for a CSM model; unset ones take :class:`CsmParams` defaults.

    ``max_new_tokens`` must leave room for a prompt in the model's sequence.
    """
    given = _given_params(model, params, _CSM_PARAMS)
    if int(given.get("quantizers", 1)) > adapter.num_quantizers:
        raise InvalidRequest(
            f"params.quantizers must be within [1, {adapter.num_quantizers}] for {model.id!r}"
        )
    chosen = CsmParams(**given)  # type: ignore[arg-type]
    if chosen.max_new_tokens >= adapter.max_seq_len:
        raise InvalidRequest(
            f"params.max_new_tokens must be below {model.id!r}'s sequence length "
            f"{adapter.max_seq_len}"
        )
    return chosen


def _check_params(
    model: ServedModel, adapter: KokoroModel, params: ConverseParams | None, authoring: bool
) -> tuple[float, AuthorParams | None]:
    """Validate ``params`` against a Kokoro model and the request's use of it.

    Returns:
        The speaking rate, and the author sampling parameters when authoring.
    """
    supported = _VOICE_PARAMS | _AUTHOR_PARAMS if authoring else _VOICE_PARAMS
    given = _given_params(model, params, supported)
    speed = float(given.get("speed", 1.0))
    low, high = adapter.speed_range
    if not low <= speed <= high:
        raise InvalidRequest(f"params.speed must be within [{low}, {high}] for {model.id!r}")
    if not authoring:
        return speed, None
    defaults = AuthorParams()
    max_new = int(given.get("max_new_tokens", defaults.max_new_tokens))
    if not _AUTHOR_MAX_NEW_TOKENS[0] <= max_new <= _AUTHOR_MAX_NEW_TOKENS[1]:
        raise InvalidRequest(
            f"params.max_new_tokens must be within {list(_AUTHOR_MAX_NEW_TOKENS)} when authoring"
        )
    return speed, AuthorParams(
        temperature=float(given.get("temperature", defaults.temperature)),
        top_k=int(given.get("top_k", defaults.top_k)),
        max_new_tokens=max_new,
        seed=int(given.get("seed", defaults.seed)),
    )


async def _history_clips(request: ConverseRequest, ctx: RequestContext) -> dict[int, DecodedAudio]:
    """Decode every history clip (inline or uploaded), by turn index."""
    clips = {}
    for index, turn in enumerate(request.conversation[:-1]):
        if turn.audio_wav_b64 and turn.audio_id:
            raise InvalidRequest(
                f"conversation[{index}]: send audio_wav_b64 or audio_id, not both",
                turn_index=index,
            )
        if turn.audio_wav_b64:
            clips[index] = decode_turn_audio(turn.audio_wav_b64, index)
        elif turn.audio_id:
            clips[index] = await load_uploaded_audio(ctx, turn.audio_id, index)
    return clips


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
    if has_text:
        require_speakable(str(open_turn.text), ["conversation", str(last), "text"], last)
    if isinstance(model.adapter, CsmModel):
        speed, author, csm = 1.0, None, _csm_params(model, model.adapter, request.params)
    else:
        speed, author = _check_params(
            model, model.adapter, request.params, authoring=not has_text
        )
        csm = None
    clips = await _history_clips(request, ctx)
    text = open_turn.text if has_text else None
    return _Plan(model, open_turn.speaker, text, speed, author, csm, clips)


async def _transcripts(request: ConverseRequest, plan: _Plan, ctx: RequestContext) -> list[str]:
    """Each history turn's text, audio-only turns transcribed by Whisper."""
    history = request.conversation[:-1]
    spoken_only = [i for i, turn in enumerate(history) if not (turn.text and turn.text.strip())]
    transcripts = await asyncio.gather(
        *(
            transcribe(
                ctx.triton,
                resample(plan.clips[i].samples, plan.clips[i].sample_rate, SPEECH_SAMPLE_RATE),
            )
            for i in spoken_only
        )
    )
    heard = {i: text for i, (text, _) in zip(spoken_only, transcripts, strict=True)}
    return [turn.text or heard.get(i, "") for i, turn in enumerate(history)]


async def _author(
    request: ConverseRequest, plan: _Plan, params: AuthorParams, ctx: RequestContext
) -> str:
    """Transcribe audio-only history turns, then have the author LM write the open turn."""
    texts = await _transcripts(request, plan, ctx)
    lines = [(turn.speaker, text) for turn, text in zip(request.conversation, texts, strict=False)]
    return await author_turn(ctx.triton, lines, plan.speaker, params)


async def _voice_in_context(
    request: ConverseRequest, plan: _Plan, adapter: CsmModel, ctx: RequestContext
) -> tuple[np.ndarray, list[str]]:
    """Voice the open turn with CSM, every history turn a prompt segment.

    History audio is resampled to the model's rate; an audio-only turn gets its
    Whisper transcript when ASR is served, else an empty text.

    Returns:
        The audio (float32 mono at ``adapter.sample_rate``) and the reply's warnings.
    """
    if plan.model.transcribes:
        texts = await _transcripts(request, plan, ctx)
    else:
        texts = [turn.text or "" for turn in request.conversation[:-1]]
    segments = []
    for index, (turn, text) in enumerate(zip(request.conversation, texts, strict=False)):
        clip = plan.clips.get(index)
        audio = resample(clip.samples, clip.sample_rate, adapter.sample_rate) if clip else None
        segments.append(Segment(turn.speaker, " ".join(text.split()), audio))
    segments.append(Segment(plan.speaker, " ".join(str(plan.text).split())))
    assert plan.csm is not None
    result = await adapter.generate(ctx.triton, segments, plan.csm)
    warnings = []
    if result.dropped_turns:
        warnings.append(
            f"the conversation is longer than {plan.model.id!r} can attend to "
            f"({adapter.max_seq_len} frames with max_new_tokens {plan.csm.max_new_tokens}): "
            f"the {result.dropped_turns} oldest turn(s) were left out of the prompt"
        )
    return result.audio, warnings


async def converse(request: ConverseRequest, ctx: RequestContext) -> ConverseResponse:
    """Author (speaker-only open turn) and voice the open turn, respond, record usage.

    History is validated and metered. With Kokoro it feeds the author LM's prompt
    (audio-only turns transcribed first) and the open turn is voiced on its own
    with the voice bound to its speaker label; with CSM every history turn
    conditions the voicing (see :func:`_voice_in_context`). Audio over
    ``inline_audio_max_bytes`` comes back as ``audio.url`` + ``expires_in``.

    Raises:
        InvalidRequest: a spec rule or cap is broken (before any synthesis), or the
            open turn does not fit in a CSM model's sequence.
        ServiceUnavailable, InferenceError, DeadlineExceeded: from Triton.
    """
    plan = await _plan(request, ctx)
    adapter = plan.model.adapter
    settings = ctx.settings

    async def write_and_voice() -> tuple[str, np.ndarray, list[str]]:
        if plan.author is None:
            text = str(plan.text)
        else:
            text = await _author(request, plan, plan.author, ctx)
        if isinstance(adapter, CsmModel):
            audio, warnings = await _voice_in_context(request, plan, adapter, ctx)
            return text, audio, warnings
        voice = adapter.speaker_voices[int(plan.speaker)]
        audio = await adapter.synthesize(
            ctx.triton, text, voice, plan.speed, settings.sentence_pause_ms
        )
        return text, audio, []

    text, audio, warnings = await within_deadline(write_and_voice(), settings.triton_timeout_s)
    delivered = await ctx.deliver(
        "reply.wav", encode_wav(audio, adapter.sample_rate), "audio/wav", force_url=False
    )
    usage = Usage(
        input_chars=sum(len(turn.text or "") for turn in request.conversation),
        input_audio_seconds=round(sum(c.duration_s for c in plan.clips.values()), 3),
        output_audio_seconds=round(len(audio) / adapter.sample_rate, 3),
    )
    await ctx.record_usage(usage.input_chars, usage.input_audio_seconds, usage.output_audio_seconds)
    return ConverseResponse(
        request_id=ctx.request_id,
        model=plan.model.id,
        reply=Reply(
            speaker=plan.speaker,
            text=text,
            audio=ReplyAudio(
                sample_rate=adapter.sample_rate,
                num_quantizers=plan.csm.quantizers if plan.csm else plan.model.num_quantizers,
                data_b64=base64.b64encode(delivered.data).decode() if delivered.data else None,
                url=delivered.url,
                expires_in=delivered.expires_in,
            ),
        ),
        usage=usage,
        warnings=warnings,
    )
