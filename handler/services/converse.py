"""``POST /v1/converse``: validate the conversation, author and/or voice the open turn.

Rules (kalpa-converse.md), all checked before any synthesis:
  * every turn but the last carries text and/or audio;
  * the open (last) turn: text -> voice exactly that text; text and audio
    together -> 400 (nothing to generate); audio alone -> 400; speaker only ->
    author the text (needs the ``author`` mode), then voice it;
  * speaker labels must be the model's advertised ones;
  * history audio: at most 25 MiB decoded per turn, decodable WAV;
  * ``params`` must be ones the model supports, inside its ranges.

The service only orchestrates: the model's voice engine
(:class:`handler.engines.base.VoiceEngine`) checks its own ``params`` and voices
the open turn; Kokoro voices it on its own with the voice bound to its speaker
label, a CSM model conditioned on every history turn (text, audio, or audio
with its Whisper transcript when ASR is served).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from handler.audio import DecodedAudio, encode_pcm, encode_wav, resample
from handler.author_lm import AUTHOR_RULES, AuthorParams, author_turn
from handler.engines.base import TurnInContext, VoiceStream, take_params
from handler.engines.catalog import ServedModel
from handler.errors import DeadlineExceeded, InvalidRequest
from handler.schemas.converse import (
    ConverseRequest,
    ConverseResponse,
    Reply,
    ReplyAudio,
    RequestUsage,
    StreamAudio,
    StreamDone,
    StreamMetadata,
)
from handler.services.context import RequestContext
from handler.services.turn_input import decode_turn_audio, load_uploaded_audio, require_speakable
from handler.tasks import gather_or_cancel
from handler.transcription import SPEECH_SAMPLE_RATE, TimedWord, transcribe


@dataclass(frozen=True)
class _Plan:
    """A validated request: what to voice, with which engine parameters.

    ``text`` is None when the open turn is to be authored (``author`` set).
    """

    model: ServedModel
    speaker: str
    text: str | None
    engine_params: object
    author: AuthorParams | None
    clips: dict[int, DecodedAudio]


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
            clips[index] = await run_in_threadpool(decode_turn_audio, turn.audio_wav_b64, index)
        elif turn.audio_id:
            clips[index] = await load_uploaded_audio(ctx, turn.audio_id, index)
    return clips


def _check_turns(request: ConverseRequest, model: ServedModel) -> bool:
    """Apply the spec's turn rules; True when the open turn has text to voice.

    Raises:
        InvalidRequest: a rule is broken (naming the turn).
        UnprocessableRequest: the open turn's text has nothing to speak.
    """
    history, open_turn = request.conversation[:-1], request.conversation[-1]
    last = len(request.conversation) - 1
    for index, turn in enumerate(request.conversation):
        if turn.speaker not in model.engine.speakers:
            raise InvalidRequest(
                f"conversation[{index}].speaker {turn.speaker!r} is not a speaker label of "
                f"{model.id!r}; use one of {model.engine.speakers}",
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
    return has_text


async def _plan(request: ConverseRequest, ctx: RequestContext) -> _Plan:
    """Validate everything (turns, params, history audio) before any inference."""
    model = await ctx.catalog.resolve(request.model, ["model"])
    has_text = _check_turns(request, model)
    engine = model.engine
    voice_rules = list(engine.param_rules())
    rules = voice_rules if has_text else [*voice_rules, *AUTHOR_RULES]
    given = request.params.model_dump(exclude_none=True) if request.params else {}
    values = take_params(rules, given, model.id)
    engine_params = engine.check_params({r.name: values[r.name] for r in voice_rules})
    author = (
        None
        if has_text
        else AuthorParams.from_values({r.name: values[r.name] for r in AUTHOR_RULES})
    )
    clips = await _history_clips(request, ctx)
    open_turn = request.conversation[-1]
    text = open_turn.text if has_text else None
    return _Plan(model, open_turn.speaker, text, engine_params, author, clips)


async def _history(
    request: ConverseRequest, plan: _Plan, ctx: RequestContext
) -> list[TurnInContext]:
    """Each history turn with its audio and its text, audio-only turns transcribed.

    Transcripts come from Whisper when ASR is served and the result is used (an
    authored turn, or an engine that hears the history); otherwise audio-only
    turns keep an empty text.
    """
    history = request.conversation[:-1]
    heard_by = plan.author is not None or plan.model.engine.uses_history
    spoken_only = []
    if heard_by and plan.model.transcribes:
        spoken_only = [i for i, turn in enumerate(history) if not (turn.text and turn.text.strip())]
    async def transcribed(index: int) -> tuple[str, list[TimedWord]]:
        started = time.monotonic()
        clip = plan.clips[index]
        speech = await run_in_threadpool(
            resample, clip.samples, clip.sample_rate, SPEECH_SAMPLE_RATE
        )
        result = await transcribe(ctx.triton, speech)
        ctx.record.turn(index, "transcribe", started, audio_seconds=round(clip.duration_s, 3))
        return result

    transcripts = await gather_or_cancel(*(transcribed(i) for i in spoken_only))
    heard = {i: text for i, (text, _) in zip(spoken_only, transcripts, strict=True)}
    turns = []
    for index, turn in enumerate(history):
        clip = plan.clips.get(index)
        turns.append(
            TurnInContext(
                speaker=turn.speaker,
                text=turn.text if turn.text and turn.text.strip() else heard.get(index, ""),
                audio=clip.samples if clip else None,
                sample_rate=clip.sample_rate if clip else 0,
            )
        )
    return turns


@dataclass(frozen=True)
class ReplyInProgress:
    """A validated (and, for a speaker-only open turn, authored) reply, ready to voice.

    Attributes:
        model: the served model voicing it.
        speaker: the open turn's speaker label.
        text: what is voiced (the open turn's text, or the authored text).
        open_index: the open turn's index in the conversation.
        voice: the engine's stream of the reply's audio (nothing runs until iterated).
        input_chars: characters of every turn's text, for metering.
        input_audio_seconds: seconds of history audio, for metering.
    """

    model: ServedModel
    speaker: str
    text: str
    open_index: int
    voice: VoiceStream
    input_chars: int
    input_audio_seconds: float

    @property
    def sample_rate(self) -> int:
        """Hz of the reply's audio."""
        return self.model.engine.sample_rate

    def log_voicing(self, ctx: RequestContext, started: float, samples: int) -> None:
        """Add the voicing to the request's log record as a child event.

        Args:
            ctx: the request's context.
            started: ``time.monotonic()`` when voicing began, seconds.
            samples: the reply's length in samples at :attr:`sample_rate`.
        """
        audio_s = round(samples / self.sample_rate, 3)
        ctx.record.turn(
            self.open_index, "voice", started, characters=len(self.text), audio_seconds=audio_s
        )

    async def meter(self, ctx: RequestContext, samples: int) -> RequestUsage:
        """Record the request's usage (call once it has succeeded); returns it.

        Args:
            ctx: the request's context.
            samples: the reply's length in samples at :attr:`sample_rate`.
        """
        usage = RequestUsage(
            input_chars=self.input_chars,
            input_audio_seconds=self.input_audio_seconds,
            output_audio_seconds=round(samples / self.sample_rate, 3),
        )
        await ctx.record_usage(
            usage.input_chars, usage.input_audio_seconds, usage.output_audio_seconds
        )
        return usage


async def start_reply(request: ConverseRequest, ctx: RequestContext) -> ReplyInProgress:
    """Validate, transcribe and author as needed; the reply with its voicing not yet started.

    History is validated and metered. Audio-only history turns are transcribed
    when the author LM or the engine uses them; the author LM writes a
    speaker-only open turn from the history's text.

    Raises:
        InvalidRequest: a spec rule or cap is broken (before any synthesis).
        ServiceUnavailable, InferenceError: from Triton.
    """
    plan = await _plan(request, ctx)
    ctx.record.model = plan.model.id
    open_index = len(request.conversation) - 1
    history = await _history(request, plan, ctx)
    if plan.author is None:
        text = str(plan.text)
    else:
        started = time.monotonic()
        lines = [(turn.speaker, turn.text) for turn in history]
        text = await author_turn(ctx.triton, lines, plan.speaker, plan.author)
        ctx.record.turn(open_index, "author", started, characters=len(text))
    voice = plan.model.engine.stream(
        ctx.triton, history, TurnInContext(plan.speaker, text), plan.engine_params
    )
    return ReplyInProgress(
        model=plan.model,
        speaker=plan.speaker,
        text=text,
        open_index=open_index,
        voice=voice,
        input_chars=sum(len(turn.text or "") for turn in request.conversation),
        input_audio_seconds=round(sum(c.duration_s for c in plan.clips.values()), 3),
    )


async def converse(request: ConverseRequest, ctx: RequestContext) -> ConverseResponse:
    """Author (speaker-only open turn) and voice the open turn, respond, record usage.

    The reply's voice stream (:func:`start_reply`) drained into one WAV. Audio
    over ``inline_audio_max_bytes`` comes back as ``audio.url`` + ``expires_in``.

    Raises:
        InvalidRequest: a spec rule or cap is broken (before any synthesis), or the
            open turn does not fit in the engine's context.
        ServiceUnavailable, InferenceError, DeadlineExceeded: from Triton.
    """
    reply = await start_reply(request, ctx)
    started = time.monotonic()
    voiced = await reply.voice.drain()
    reply.log_voicing(ctx, started, len(voiced.audio))
    delivered = await ctx.deliver(
        "reply.wav", encode_wav(voiced.audio, reply.sample_rate), "audio/wav", force_url=False
    )
    usage = await reply.meter(ctx, len(voiced.audio))
    return ConverseResponse(
        request_id=ctx.request_id,
        model=reply.model.id,
        reply=Reply(
            speaker=reply.speaker,
            text=reply.text,
            audio=ReplyAudio(
                sample_rate=reply.sample_rate,
                num_quantizers=voiced.num_codebooks,
                data_b64=base64.b64encode(delivered.data).decode() if delivered.data else None,
                url=delivered.url,
                expires_in=delivered.expires_in,
            ),
        ),
        usage=usage,
        warnings=voiced.warnings,
    )


@dataclass(frozen=True)
class StreamedReply:
    """A reply whose first audio chunk is ready (``stream: true``).

    Attributes:
        reply: the validated reply; its voice stream has yielded ``first``.
        started: ``time.monotonic()`` when voicing began, seconds.
        first: the first float32 chunk, or None when the reply has no audio.
    """

    reply: ReplyInProgress
    started: float
    first: np.ndarray | None

    async def events(self, ctx: RequestContext) -> AsyncIterator[tuple[str, BaseModel]]:
        """``(event name, payload)`` pairs: ``metadata``, ``audio`` per chunk, then ``done``.

        Each chunk is :func:`handler.audio.encode_pcm` of the engine's chunk, so
        the chunks' bytes concatenated are the data of the non-streaming WAV.
        Every later chunk is awaited under the request's deadline. Usage is
        recorded just before ``done``.

        Raises:
            DeadlineExceeded: the deadline passed before the last chunk.
            ServiceUnavailable, InferenceError: from Triton, after the first chunk.
        """
        reply = self.reply
        yield "metadata", StreamMetadata(
            request_id=ctx.request_id,
            model=reply.model.id,
            speaker=reply.speaker,
            sample_rate=reply.sample_rate,
            num_quantizers=reply.voice.num_codebooks,
        )
        samples, index, chunk = 0, 0, self.first
        while chunk is not None:
            data = base64.b64encode(encode_pcm(chunk)).decode()
            yield "audio", StreamAudio(index=index, data_b64=data)
            samples, index = samples + len(chunk), index + 1
            try:
                async with asyncio.timeout_at(ctx.deadline):
                    chunk = await anext(reply.voice.chunks, None)
            except TimeoutError as error:
                raise DeadlineExceeded("the request did not finish before its deadline") from error
        reply.log_voicing(ctx, self.started, samples)
        usage = await reply.meter(ctx, samples)
        yield "done", StreamDone(
            request_id=ctx.request_id, text=reply.text, usage=usage, warnings=reply.voice.warnings
        )

    async def close(self) -> None:
        """Stop the voicing (cancels what still runs in Triton); safe after the end."""
        await self.reply.voice.chunks.aclose()


async def begin_stream(request: ConverseRequest, ctx: RequestContext) -> StreamedReply:
    """Everything up to the first audio chunk, so failures so far are plain HTTP errors.

    Raises:
        InvalidRequest: a spec rule or cap is broken, or the open turn does not fit.
        ServiceUnavailable, InferenceError: from Triton.
    """
    reply = await start_reply(request, ctx)
    started = time.monotonic()
    first = await anext(reply.voice.chunks, None)
    return StreamedReply(reply, started, first)
