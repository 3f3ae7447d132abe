"""The live conversation of one session: listen, transcribe, reply while writing, yield to the user.

Pipeline (docs/sessions.md): inbound audio → 16 kHz → Silero VAD in Triton
(recurrent state carried here) → :class:`SpeechSegmenter` → at end of speech
the turn's audio → Whisper in Triton → user turn stored → chat LM streams the
reply → :class:`ReplyText` → the next clause voiced as soon as the voice is free
and the clause complete (while the LM goes on writing) → resampled to the
session rate → emitted.

Work on a turn starts early, at :class:`SpeechPaused` (96 ms into the 500 ms
end silence): transcription, the reply's first tokens and its first clause
run while the segmenter waits, and nothing is sent or stored until
:class:`SpeechStopped` confirms the end. Speech that resumes first
(:class:`SpeechResumed`) cancels that work.

User speech during a reply is a barge-in: the reply task is cancelled (LM and
voice calls with it, so Triton stops that work), ``response.done`` says
``interrupted`` with ``played_ms``, and the stored assistant turn keeps only the
words heard (:func:`heard_text`). A reply counts as playing until the audio
sent has been played (client reports, else real time), so speech over its
last clause still interrupts it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import soxr
from starlette.concurrency import run_in_threadpool

from handler.engines.chat import ChatDelta, ChatMessage, ChatModel, ToolCall
from handler.engines.vad import SileroVad
from handler.errors import ApiError, DeadlineExceeded
from handler.services.deadline import within_deadline
from handler.sessions import protocol as events
from handler.sessions.base import AssistantAudio, Emit, SessionParams
from handler.sessions.clauses import MAX_FIRST_CLAUSE_CHARS, ReplyText, next_clause_chars
from handler.sessions.playback import PlaybackClock, VoicedClause, heard_text
from handler.sessions.tools import ToolCallError, checked_arguments
from handler.sessions.turn_taking import (
    MAX_SPEECH_MS,
    SPEECH_PAD_MS,
    VAD_SAMPLE_RATE,
    VAD_WINDOW,
    RecentAudio,
    SpeechPaused,
    SpeechResumed,
    SpeechSegmenter,
    SpeechStarted,
    SpeechStopped,
)
from handler.storage.base import SessionRecord, SessionStore, TurnRecord, turn_number
from handler.tasks import stop
from handler.transcription import TimedWord

logger = logging.getLogger(__name__)

# Tool rounds within one reply (call → result → continue) before the turn fails.
MAX_TOOL_ROUNDS = 4
# User audio kept, seconds: the longest turn (MAX_SPEECH_MS) and as much again for
# the VAD to lag behind the socket while Triton is slow.
HEARD_S = 2 * MAX_SPEECH_MS / 1000
# Most windows in one VAD call: 8.192 s of audio, about 18 ms of one core for the
# silero network (0.07 ms a window, one thread, measured on a 2-core x86 CPU). A VAD
# behind the socket (Triton was slow) catches up in calls of this size, so no call
# holds a silero_vad instance, which every session shares, for long; it still
# catches up at hundreds of times real time.
MAX_VAD_WINDOWS = 256
# Reply length cap, tokens: the bundled LM is small; short replies stay on topic.
REPLY_MAX_NEW_TOKENS = 64
# Sampling of replies; the bundled model's repetition penalty is set in Triton.
REPLY_TEMPERATURE = 0.7

T = TypeVar("T")


@dataclass(frozen=True)
class ConversationModels:
    """What a conversation calls, bound to one Triton client and one voice.

    Attributes:
        vad: the Silero VAD adapter.
        chat: the chat LM (bundled in Triton, or an OpenAI-compatible endpoint).
        transcribe: 16 kHz float32 audio and an ISO 639-1 language -> transcript.
        speak: text -> float32 [n] mono at ``voice_rate`` Hz in the session's voice
            (n is 0 for text with nothing to say, e.g. "**" or an emoji alone).
        voice_rate: the voice's sample rate, Hz.
        align: 16 kHz float32 audio and its text -> word intervals (seconds).
        tool_timeout_s: how long a reply waits for the client's tool result, seconds.
        call_timeout_s: the longest one model call may take (a VAD call, a
            transcription, one clause's voicing) and the longest the chat LM may
            go without a piece of its reply, seconds; past it the call is
            cancelled (Triton stops it) and fails with ``timeout``.
        reply_seed: the chat LM's sampling seed for every reply; None: a fresh one each.
    """

    vad: SileroVad
    chat: ChatModel
    transcribe: Callable[[np.ndarray, str], Awaitable[str]]
    speak: Callable[[str], Awaitable[np.ndarray]]
    voice_rate: int
    align: Callable[[np.ndarray, str], Awaitable[list[TimedWord]]]
    tool_timeout_s: float
    call_timeout_s: float
    reply_seed: int | None = None


def chat_history(turns: Sequence[TurnRecord]) -> list[list[ChatMessage]]:
    """Stored turns as chat messages in the order they were written, one group per turn.

    A user turn is one message (an empty transcript none). An assistant turn
    that called tools becomes, per call, an assistant message with the text
    written before the call (up to the call's ``text_offset``, clamped to the
    stored text) and the call, then the message of the ``tool`` turn answering
    it (one stored after the assistant turn and before the next one); then an
    assistant message with the text after the last call (OpenAI's message
    order: the model reads each result before what it wrote from it). Its tool
    turns belong to its group, so a window of groups never parts a call from
    its result; a tool turn with no call before it is left out (an endpoint
    would refuse the prompt).
    """
    groups = []
    for index, turn in enumerate(turns):
        if turn.role == "tool":
            continue
        results: dict[str | None, TurnRecord] = {}
        for later in turns[index + 1:] if turn.tool_calls else ():
            if later.role == "assistant":
                break
            if later.role == "tool":
                results.setdefault(later.tool_call_id, later)
        group, start = [], 0
        for record in turn.tool_calls:
            end = min(max(int(record.get("text_offset", 0)), start), len(turn.text))
            call = ToolCall(str(record["id"]), str(record["name"]), str(record["arguments"]))
            group.append(ChatMessage(turn.role, turn.text[start:end].strip(), tool_calls=(call,)))
            start = end
            result = results.pop(call.id, None)
            if result is not None:
                group.append(ChatMessage("tool", result.text, tool_call_id=call.id))
        rest = turn.text[start:].strip()
        if rest:
            group.append(ChatMessage(turn.role, rest))
        if group:
            groups.append(group)
    return groups


def heard_offset(written: str, offset: int) -> int:
    """``offset`` (characters of ``written``, stripped at its start) in the text as heard.

    An interrupted reply is stored as the words heard, joined by single spaces
    (:func:`handler.sessions.playback.heard_text`); a call's offset into the
    written text becomes the length of the words before it, so joined.
    """
    return len(" ".join(written.lstrip()[:offset].split()))


class _EndOfTurn:
    """The confirmation that a user turn has ended (:class:`SpeechStopped`).

    Work started at :class:`SpeechPaused` waits on it before anything is sent or
    stored; ``at`` is ``time.monotonic()`` of the confirmation.
    """

    def __init__(self) -> None:
        self._confirmed = asyncio.Event()
        self.at = 0.0

    def confirm(self) -> None:
        """Mark the turn as ended now."""
        self.at = time.monotonic()
        self._confirmed.set()

    async def wait(self) -> float:
        """Wait for the confirmation; returns its ``time.monotonic()``."""
        await self._confirmed.wait()
        return self.at


@dataclass(frozen=True)
class _EarlyTurn:
    """Work on a user turn started before its end was confirmed."""

    end: int
    end_of_turn: _EndOfTurn
    task: asyncio.Task[None]


@dataclass
class _Reply:
    """The assistant turn being generated and played.

    It is written and voiced from the early start on, before it is visible: its
    events wait in order in ``outbox`` and its audio waits for ``visible`` (set
    once the user turn's end is confirmed, its transcript sent and the outbox
    emptied). ``latency_ms`` holds the named figures of docs/sessions.md, ms from
    the confirmed end of the user's speech (0 for what was ready by then).
    """

    turn_id: str
    reply_to: str
    started_at: float
    visible: asyncio.Event = field(default_factory=asyncio.Event)
    outbox: list[events.ServerEvent] = field(default_factory=list)
    since: float = 0.0
    task: asyncio.Task[None] | None = None
    playback: PlaybackClock = field(default_factory=PlaybackClock)
    clauses: list[VoicedClause] = field(default_factory=list)
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    tool_turns: list[TurnRecord] = field(default_factory=list)
    interrupted: bool = False
    moments: dict[str, float] = field(default_factory=dict)
    durations_ms: dict[str, float] = field(default_factory=dict)
    alignments: dict[int, asyncio.Task[list[TimedWord]]] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        """Record the moment of ``name`` (once), ``time.monotonic()``."""
        self.moments.setdefault(name, time.monotonic())

    @property
    def latency_ms(self) -> dict[str, float]:
        """Named figures (docs/sessions.md), ms.

        The moments count from the confirmed end of the user's speech (never
        below 0); ``ttfa`` (time to first audio) is ``vad_hangover`` plus
        ``first_audio``: from the arrival of the turn's last sample.
        """
        figures = {
            name: round(max(0.0, moment - self.since) * 1000.0, 1)
            for name, moment in self.moments.items()
        } | self.durations_ms
        if "first_audio" in figures and "vad_hangover" in figures:
            figures["ttfa"] = round(figures["vad_hangover"] + figures["first_audio"], 1)
        return figures


async def _stop_alignments(reply: _Reply) -> None:
    """Cancel ``reply``'s forced-alignment calls (Triton stops them too); wait until they end."""
    aligning = list(reply.alignments.values())
    for task in aligning:
        task.cancel()
    await asyncio.gather(*aligning, return_exceptions=True)


def _retrieve(task: asyncio.Task[list[TimedWord]]) -> None:
    """Mark a background alignment's failure as seen (it is only needed on a barge-in)."""
    if not task.cancelled():
        task.exception()


class _ReplyFailed(Exception):
    """The turn ends with ``response.done`` ``failed`` (an error event was sent)."""


class LiveConversation:
    """One socket's conversation (implements :class:`handler.sessions.base.Conversation`).

    Args:
        record: the session (its ``config``: system prompt, tools, context window,
            max turns, language).
        params: the socket's sample rate (Hz, input and output) and VAD threshold.
        models: what it calls.
        emit: the transport's emitter (events; reply audio as float32 at the session rate).
        storage: where turns are stored.
        turns: the session's stored turns so far (a resumed session goes on from them).
    """

    def __init__(
        self,
        record: SessionRecord,
        params: SessionParams,
        models: ConversationModels,
        emit: Emit,
        storage: SessionStore,
        turns: Sequence[TurnRecord],
    ) -> None:
        self.record = record
        self.config = record.config
        self.sample_rate = params.sample_rate
        self.models = models
        self._send = emit
        self._storage = storage
        self._segmenter = SpeechSegmenter(params.vad_threshold)
        self._to_vad = (
            None
            if self.sample_rate == VAD_SAMPLE_RATE
            else soxr.ResampleStream(self.sample_rate, VAD_SAMPLE_RATE, 1, dtype="float32")
        )
        self._vad_state = models.vad.initial_state(VAD_SAMPLE_RATE)
        self._pending: list[np.ndarray] = []
        self._audio_arrived = asyncio.Event()
        self._vad_worker: asyncio.Task[None] | None = None
        self._heard = RecentAudio(int(HEARD_S * VAD_SAMPLE_RATE))
        # Above every turn stored or sent before: an id sent to a client is never reused.
        self._last_turn_number = max([record.last_turn, *(t.index for t in turns)])
        self._noted_turn = self._last_turn_number
        self._user_turn_id: str | None = None
        self._last_user_turn_id: str | None = None  # the newest turn that gets a reply
        self._user_turn_started = 0.0
        self._reply: _Reply | None = None
        self._respond_tasks: set[asyncio.Task[None]] = set()
        self._early_turn: _EarlyTurn | None = None
        self._turn_lock = asyncio.Lock()  # user turns are taken one at a time, in order
        self._tool_results: dict[str, asyncio.Future[str]] = {}
        self._sending: asyncio.Future[None] | None = None
        self._finishing: set[asyncio.Task[None]] = set()
        self._history = chat_history(turns)
        self._exchanges = sum(1 for t in turns if t.role == "assistant")

    @property
    def exchanges(self) -> int:
        """Replies finished in the session so far, by this socket and earlier ones."""
        return self._exchanges

    # ---- inbound ---------------------------------------------------------------

    async def on_audio(self, samples: np.ndarray) -> None:
        """Take user audio (float32 [n] mono at the session rate); returns at once.

        VAD runs in a task of its own on the audio pending when it gets to it
        (at most :data:`MAX_VAD_WINDOWS` windows per call), so a socket keeps
        being read (pings answered, audio buffered) while Triton is slow, and a
        lagging VAD catches up in fewer, larger calls. How fast audio may come
        is the transport's limit (``transport.AudioBudget``).

        Raises:
            ServiceUnavailable, InferenceError, DeadlineExceeded: an earlier VAD
                call failed or took over ``models.call_timeout_s`` (the transport
                closes the socket with an internal error).
        """
        if self._vad_worker is None:
            self._vad_worker = asyncio.create_task(self._run_vad())
        elif self._vad_worker.done():
            self._vad_worker.result()
        at_16k = samples if self._to_vad is None else self._to_vad.resample_chunk(samples)
        at_16k = np.array(at_16k, dtype=np.float32)  # held: the caller's buffer may be reused
        self._heard.append(at_16k, time.monotonic())
        self._pending.append(at_16k)
        self._audio_arrived.set()

    async def _run_vad(self) -> None:
        """Speech probabilities of the pending windows, in order; act on speech start/stop.

        Each call takes the whole windows pending, at most :data:`MAX_VAD_WINDOWS`;
        a backlog goes in calls of that size one after another.
        """
        backlog = np.zeros(0, dtype=np.float32)  # 16 kHz samples not yet sent to the VAD
        while True:
            if len(backlog) < VAD_WINDOW:
                await self._audio_arrived.wait()
            if len(backlog) < MAX_VAD_WINDOWS * VAD_WINDOW:  # else the backlog fills a call
                self._audio_arrived.clear()
                backlog = np.concatenate([backlog, *self._pending])
                self._pending.clear()
            count = min(len(backlog) // VAD_WINDOW, MAX_VAD_WINDOWS)
            if count == 0:
                continue
            windows = backlog[: count * VAD_WINDOW].reshape(count, VAD_WINDOW)
            backlog = backlog[count * VAD_WINDOW :]
            probabilities, self._vad_state = await self._model_call(
                self.models.vad.speech_probabilities(windows, self._vad_state, VAD_SAMPLE_RATE),
                "voice activity detection",
            )
            for probability in probabilities:
                decision = self._segmenter.push(float(probability))
                if isinstance(decision, SpeechStarted):
                    await self._speech_started(decision)
                elif isinstance(decision, SpeechPaused):
                    self._speech_paused(decision)
                elif isinstance(decision, SpeechResumed):
                    await self._drop_early_turn()
                elif isinstance(decision, SpeechStopped):
                    await self._speech_stopped(decision)

    async def on_event(self, event: events.ClientEvent) -> None:
        """Act on a client event: tool result, response cancel, playback position."""
        if isinstance(event, events.ToolResult):
            waiter = self._tool_results.pop(event.call_id, None)
            if waiter is None or waiter.done():
                await self._error(
                    self._current_turn_id(),
                    "unknown_tool_call",
                    f"no tool call {event.call_id!r} is waiting for a result",
                )
                return
            waiter.set_result(event.output)
        elif isinstance(event, events.ResponseCancel):
            if event.turn_id in (None, self._reply and self._reply.turn_id):
                await self._interrupt()
        elif (
            isinstance(event, events.PlaybackPosition)
            and self._reply is not None
            and self._reply.turn_id == event.turn_id
        ):
            self._reply.playback.report(event.played_ms)

    async def close(self) -> None:
        """Stop everything this conversation started (socket gone or session ended).

        The reply in progress ends as ``interrupted`` and is stored; turns not
        yet answered are dropped. Cancelled meanwhile (the transport's time
        limit), it still cancels every task it started before it returns.
        """
        try:
            if self._vad_worker is not None:
                await stop(self._vad_worker)
            await self._interrupt()
        finally:
            for task in list(self._respond_tasks):
                task.cancel()
            await asyncio.gather(*self._respond_tasks, *self._finishing, return_exceptions=True)

    # ---- turn-taking -----------------------------------------------------------

    async def _emit(self, event: events.ServerEvent | AssistantAudio) -> None:
        """Send ``event``; a turn number sent for the first time is noted in storage first.

        So a later socket of the session numbers its turns above every id a
        client has seen, stored or not (speech too short to be a turn, a failed
        transcription, a turn cut off by a disconnect).
        """
        number = turn_number(event.turn_id) if event.turn_id is not None else 0
        if number > self._noted_turn:
            try:
                await run_in_threadpool(
                    self._storage.note_turn, self.record.key_id, self.record.id, number
                )
            except Exception:  # the event still goes out; a later one notes it again
                logger.exception("session %s: could not note turn %d", self.record.id, number)
            else:
                self._noted_turn = number
        await self._send(event)

    def _next_turn_id(self) -> str:
        self._last_turn_number += 1
        return f"turn_{self._last_turn_number}"

    def _release_turn_id(self, turn_id: str) -> None:
        """Give back an unused id if it is still the newest, so ids stay consecutive."""
        if turn_id == f"turn_{self._last_turn_number}":
            self._last_turn_number -= 1

    def _current_turn_id(self) -> str | None:
        return self._reply.turn_id if self._reply is not None else self._user_turn_id

    async def _speech_started(self, started: SpeechStarted) -> None:
        await self._interrupt()
        self._user_turn_id = self._next_turn_id()
        self._user_turn_started = self._storage.clock()
        await self._emit(
            events.SpeechStarted(
                turn_id=self._user_turn_id, audio_start_ms=started.sample * 1000 / VAD_SAMPLE_RATE
            )
        )

    def _speech_paused(self, paused: SpeechPaused) -> None:
        """Start work on the turn as if it ended at ``paused.end``; nothing is sent yet."""
        if self._user_turn_id is not None:
            end_of_turn = _EndOfTurn()
            task = self._start_respond(self._user_turn_id, paused, end_of_turn)
            self._early_turn = _EarlyTurn(paused.end, end_of_turn, task)

    async def _drop_early_turn(self) -> None:
        """The user speaks on: cancel the work started early (Triton stops it too)."""
        early, self._early_turn = self._early_turn, None
        if early is not None:
            await stop(early.task)

    async def _speech_stopped(self, stopped: SpeechStopped) -> None:
        turn_id = self._user_turn_id or self._next_turn_id()
        await self._emit(
            events.SpeechStopped(turn_id=turn_id, audio_end_ms=stopped.end * 1000 / VAD_SAMPLE_RATE)
        )
        early = self._early_turn
        if early is not None and early.end == stopped.end:
            self._early_turn = None
            self._last_user_turn_id = turn_id
            early.end_of_turn.confirm()
            return
        await self._drop_early_turn()
        if stopped.is_turn:
            self._last_user_turn_id = turn_id
            end_of_turn = _EndOfTurn()
            end_of_turn.confirm()
            self._start_respond(turn_id, stopped, end_of_turn)

    def _start_respond(
        self, turn_id: str, bounds: SpeechPaused | SpeechStopped, end_of_turn: _EndOfTurn
    ) -> asyncio.Task[None]:
        audio = self._heard.between(bounds.start, bounds.end)
        # The end of the last window heard as speech: the end less its padding.
        speech_end = max(bounds.start + 1, bounds.end - SPEECH_PAD_MS * VAD_SAMPLE_RATE // 1000)
        end_arrived_at = self._heard.arrived_at(speech_end)
        task = asyncio.create_task(
            self._respond(turn_id, self._user_turn_started, audio, end_arrived_at, end_of_turn)
        )
        self._respond_tasks.add(task)
        task.add_done_callback(self._respond_tasks.discard)
        return task

    # ---- replies ---------------------------------------------------------------

    async def _respond(
        self, user_turn_id: str, started_at: float, audio_16k: np.ndarray,
        end_arrived_at: float, end_of_turn: _EndOfTurn,
    ) -> None:
        """Transcribe one user turn and start the reply; once its end is confirmed, send both.

        ``end_arrived_at``: ``time.monotonic()`` when the turn's last sample of
        speech (``input.speech_stopped``'s ``audio_end_ms`` less the speech
        padding) reached the server. Until ``end_of_turn`` is confirmed nothing
        is sent or stored, and cancelling this task leaves no trace (the
        reply's work is cancelled too).
        """
        taken = await self._take_turn(user_turn_id, started_at, audio_16k, end_of_turn)
        if taken is None:
            return
        reply, ended = taken
        # A newer turn (or one being spoken) gets the reply; its prompt holds this one.
        newer_turn = user_turn_id != self._last_user_turn_id or self._segmenter.in_speech
        if newer_turn or self._reply is not None:
            await self._drop(reply)
            return
        assert reply.task is not None
        reply.durations_ms["vad_hangover"] = round(max(0.0, ended - end_arrived_at) * 1000.0, 1)
        self._reply = reply
        await self._show(reply, ended)
        status = "completed"
        try:
            await asyncio.shield(reply.task)
        except _ReplyFailed:
            status = "failed"
        except Exception:
            logger.exception("session %s: reply %s failed", self.record.id, reply.turn_id)
            await self._error(reply.turn_id, "internal_error", "the reply failed")
            status = "failed"
        if not reply.interrupted:
            await self._finish_apart(reply, status)

    async def _take_turn(
        self, user_turn_id: str, started_at: float, audio_16k: np.ndarray,
        end_of_turn: _EndOfTurn,
    ) -> tuple[_Reply, float] | None:
        """Transcribe, confirm and store one user turn; start its reply meanwhile.

        User turns are taken one at a time, in order (``_turn_lock``), up to
        their place in the history: a turn that ends while the one before is
        still being transcribed gets a prompt that holds that one.

        Returns:
            The reply started (hidden) and the ``time.monotonic()`` its turn's end
            was confirmed; None when there is nothing to answer (an empty or
            failed transcription, a turn that could not be stored).
        """
        async with self._turn_lock:
            try:
                # No audio is left of a turn the VAD reached more than HEARD_S late.
                transcript = (
                    await self._model_call(
                        self.models.transcribe(audio_16k, self.config["language"]),
                        "transcription",
                    )
                    if len(audio_16k)
                    else ""
                )
            except ApiError as error:
                await end_of_turn.wait()
                await self._error(user_turn_id, error.code, error.message)
                return None
            transcribed = time.monotonic()
            reply = None
            if transcript.strip():
                reply = _Reply(
                    turn_id=self._next_turn_id(),
                    reply_to=user_turn_id,
                    started_at=self._storage.clock(),
                )
                reply.mark("asr")
                reply.task = asyncio.create_task(
                    self._generate(reply, [*self._prompt(), ChatMessage("user", transcript)])
                )
            # Until the reply is handed to self._reply, stopping it is this task's job.
            try:
                ended = await end_of_turn.wait()
                await self._emit(events.InputTranscript(turn_id=user_turn_id, text=transcript))
                await self._put_turn(
                    TurnRecord(
                        turn_id=user_turn_id,
                        role="user",
                        text=transcript,
                        started_at=started_at,
                        ended_at=self._storage.clock(),
                        audio_ms=round(len(audio_16k) / VAD_SAMPLE_RATE * 1000.0, 1),
                        latency_ms={"asr": round(max(0.0, transcribed - ended) * 1000.0, 1)},
                    )
                )
            except asyncio.CancelledError:
                if reply is not None:
                    await self._drop(reply)
                raise
            except Exception:
                logger.exception("session %s: user turn %s was not stored", self.record.id,
                                 user_turn_id)
                if reply is not None:
                    await self._drop(reply)
                await self._error(user_turn_id, "internal_error", "the turn could not be stored")
                return None
            if reply is None:
                return None
            self._history.append([ChatMessage(role="user", content=transcript)])
            return reply, ended

    async def _drop(self, reply: _Reply) -> None:
        """Cancel a reply that was never shown, its alignments too; give its turn id back."""
        assert reply.task is not None
        await stop(reply.task)
        await _stop_alignments(reply)
        self._release_turn_id(reply.turn_id)

    async def _generate(self, reply: _Reply, messages: list[ChatMessage]) -> None:
        """Write the reply to ``messages`` with the chat LM; voice it clause by clause meanwhile."""
        await self._reply_emit(
            reply, events.ResponseStarted(turn_id=reply.turn_id, reply_to=reply.reply_to)
        )
        text = ReplyText()
        # Both clauses run when writing and voicing fail in the same loop pass; the
        # turn still ends with one error event (raising inside both would make a group).
        reported = False
        failures: list[ApiError] = []
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._write(reply, messages, text))
                group.create_task(self._voice(reply, text))
        except* _ReplyFailed:
            reported = True
        except* ApiError as failed:
            failures = [e for e in failed.exceptions if isinstance(e, ApiError)]
        if reported:
            raise _ReplyFailed
        if failures:
            await self._fail(reply, failures[0].code, failures[0].message)
        while (remaining := reply.playback.remaining_s()) > 0:
            await asyncio.sleep(min(remaining, 0.05))

    async def _write(
        self, reply: _Reply, messages: list[ChatMessage], text: ReplyText
    ) -> None:
        """Stream the LM's reply into ``text``; run the tool calls it makes."""
        try:
            for _ in range(MAX_TOOL_ROUNDS + 1):
                call = None
                after_call = bool(reply.tool_calls)
                async with aclosing(self._chat_deltas(messages)) as deltas:
                    async for delta in deltas:
                        if delta.text:
                            piece = delta.text
                            if after_call and reply.text[-1:].strip() and piece[0].strip():
                                piece = " " + piece  # the text before the call and after apart
                            after_call = False
                            reply.mark("first_token")
                            reply.text += piece
                            await self._reply_emit(
                                reply, events.ResponseTextDelta(turn_id=reply.turn_id, delta=piece)
                            )
                            text.write(piece)
                        if delta.tool_call is not None:
                            call = delta.tool_call
                            break
                if call is None:
                    return
                messages = [*messages, *await self._run_tool(reply, call)]
            await self._fail(reply, "tool_rounds", f"more than {MAX_TOOL_ROUNDS} tool calls")
        finally:
            text.end()

    async def _chat_deltas(
        self, messages: list[ChatMessage]
    ) -> AsyncGenerator[ChatDelta, None]:
        """The chat LM's reply to ``messages``, each piece within ``models.call_timeout_s``.

        Raises (while iterating):
            DeadlineExceeded: the LM gave no piece for that long (its stream is
                closed, so Triton stops the generation).
            ServiceUnavailable, InferenceError: as :meth:`ChatModel.stream`.
        """
        stream = self.models.chat.stream(
            messages,
            self.config["tools"],
            max_new_tokens=REPLY_MAX_NEW_TOKENS,
            temperature=REPLY_TEMPERATURE,
            seed=self.models.reply_seed,
        )
        async with aclosing(stream):
            while (delta := await self._model_call(anext(stream, None), "the chat LM's next "
                                                   "piece of text")) is not None:
                yield delta

    async def _model_call(self, call: Awaitable[T], what: str) -> T:
        """Await ``call`` (one model call, not yet started) for at most ``models.call_timeout_s``.

        The request deadline's mechanism (:func:`within_deadline`): Triton calls
        made meanwhile carry the limit as their deadline; past it ``call`` is
        cancelled.

        Raises:
            DeadlineExceeded: ``call`` took longer (``what`` names it in the message).
        """
        limit = self.models.call_timeout_s
        try:
            return await within_deadline(call, asyncio.get_running_loop().time() + limit)
        except DeadlineExceeded:
            raise DeadlineExceeded(f"{what} took over {limit:g} s") from None

    async def _run_tool(self, reply: _Reply, call: ToolCall) -> list[ChatMessage]:
        """Send the model's tool call to the client and wait for its result.

        Returns:
            the assistant message with the text written since the reply's
            previous call (or its start) and the call, and the tool message
            with the result.

        Raises:
            _ReplyFailed: arguments rejected by the tool's schema, or no result within
                ``models.tool_timeout_s``.
        """
        try:
            arguments = checked_arguments(call.name, call.arguments, self.config["tools"])
        except ToolCallError as error:
            await self._fail(reply, "invalid_tool_call", str(error))
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._tool_results[call.id] = waiter
        await self._reply_emit(
            reply,
            events.ToolCall(
                turn_id=reply.turn_id, call_id=call.id, name=call.name, arguments=arguments
            ),
        )
        try:
            await reply.visible.wait()  # the client's time to answer runs from the call it sees
            async with asyncio.timeout(self.models.tool_timeout_s):  # keeps a barge-in's cancel
                output = await waiter
        except TimeoutError:
            await self._fail(
                reply,
                "tool_timeout",
                f"no result for tool call {call.id!r} within {self.models.tool_timeout_s:g} s",
            )
        finally:
            self._tool_results.pop(call.id, None)
        written = reply.text.lstrip()
        previous = reply.tool_calls[-1]["text_offset"] if reply.tool_calls else 0
        now = self._storage.clock()
        tool_turn = TurnRecord(
            turn_id=self._next_turn_id(),
            role="tool",
            text=output,
            started_at=now,
            ended_at=now,
            tool_call_id=call.id,
        )
        await self._put_turn(tool_turn)
        # Both once stored: a barge-in during the write leaves neither, never a call
        # without its result (a prompt an OpenAI-compatible endpoint refuses).
        reply.tool_calls.append({"id": call.id, "name": call.name, "arguments": call.arguments,
                                 "text_offset": len(written)})
        reply.tool_turns.append(tool_turn)
        return [
            ChatMessage(role="assistant", content=written[previous:].strip(), tool_calls=(call,)),
            ChatMessage(role="tool", content=output, tool_call_id=call.id),
        ]

    async def _fail(self, reply: _Reply, code: str, message: str) -> None:
        await self._reply_emit(
            reply, events.ErrorEvent(turn_id=reply.turn_id, code=code, message=message)
        )
        raise _ReplyFailed(code)

    async def _reply_emit(self, reply: _Reply, event: events.ServerEvent) -> None:
        """Emit an event of ``reply``; until the reply is visible it waits, in order, in its outbox.

        So writing and voicing go on from the early start while nothing is sent.
        """
        if reply.visible.is_set():
            await self._emit(event)
        else:
            reply.outbox.append(event)

    async def _show(self, reply: _Reply, since: float) -> None:
        """Send what ``reply`` queued while hidden, in order, then make it visible.

        Its figures count from ``since`` (``time.monotonic()``, the confirmed end
        of the user's speech). Events it queues meanwhile are sent in turn.
        """
        reply.since = since
        while reply.outbox:
            await self._emit(reply.outbox.pop(0))
        reply.visible.set()

    async def _error(self, turn_id: str | None, code: str, message: str) -> None:
        await self._emit(events.ErrorEvent(turn_id=turn_id, code=code, message=message))

    async def _voice(self, reply: _Reply, text: ReplyText) -> None:
        """Voice the reply's clauses one at a time; send each as soon as it is voiced.

        One at a time, so each clause has all the cores: two at once (one per
        Kokoro network instance) made the clause due next share them with the
        one after it, and stalls inside replies grew (docs/PERFORMANCE.md,
        "Voice lookahead"). Each clause is cut when the voice is free for it,
        as long as the voice can voice while the audio already sent plays
        (:func:`next_clause_chars`, from how long the clause before took). A
        clause the voice gives no audio for (nothing to say in it) is skipped.
        Cancelling this task cancels the voice call in flight.
        """
        resample = (
            None
            if self.models.voice_rate == self.sample_rate
            else soxr.ResampleStream(self.models.voice_rate, self.sample_rate, 1, dtype="float32")
        )
        voice_s_per_char: float | None = None  # of the clause voiced last

        def limit() -> int:
            if voice_s_per_char is None:
                return MAX_FIRST_CLAUSE_CHARS
            return next_clause_chars(reply.playback.remaining_s(), voice_s_per_char)

        while (clause := await text.next_clause(limit)) is not None:
            started = time.monotonic()
            audio = await self._model_call(self.models.speak(clause), "voicing a clause")
            voiced_s = time.monotonic() - started
            if len(audio) == 0:  # nothing to say in it ("**", an emoji): nothing to play
                continue
            reply.durations_ms.setdefault("first_clause_voice", round(voiced_s * 1000.0, 1))
            await self._play(reply, clause, audio, resample)
            voice_s_per_char = voiced_s / len(clause)
        if resample is not None:
            await self._send_audio(reply, resample.resample_chunk(np.zeros(0, np.float32), True))

    async def _play(
        self, reply: _Reply, clause: str, audio: np.ndarray, resample: soxr.ResampleStream | None
    ) -> None:
        """Send one voiced clause (resampled to the session rate) and start aligning it."""
        start_s = reply.clauses[-1].end_s if reply.clauses else 0.0
        voiced = VoicedClause(clause, start_s, audio, self.models.voice_rate)
        reply.clauses.append(voiced)
        # Aligned now, while it plays, so a barge-in finds its word timings ready.
        aligning = asyncio.create_task(self._align(voiced))
        aligning.add_done_callback(_retrieve)
        reply.alignments[id(voiced)] = aligning
        out = audio if resample is None else resample.resample_chunk(audio)
        await self._send_audio(reply, out.astype(np.float32))

    async def _send_audio(self, reply: _Reply, audio: np.ndarray) -> None:
        """Emit reply audio; a cancelled reply finishes the message in flight, never half of one."""
        if len(audio) == 0:
            return
        await reply.visible.wait()
        reply.mark("first_audio")
        sending = asyncio.ensure_future(self._emit(AssistantAudio(reply.turn_id, audio)))
        self._sending = sending
        reply.playback.sent(len(audio) / self.sample_rate * 1000.0)
        await asyncio.shield(sending)

    def _prompt(self) -> list[ChatMessage]:
        """System prompt (the persona) and the last ``context_window`` turns' messages."""
        window = int(self.config["context_window"])
        recent = [message for group in self._history[-window:] for message in group]
        return [ChatMessage(role="system", content=self.config["system_prompt"]), *recent]

    # ---- ending a reply ----------------------------------------------------------

    async def _interrupt(self) -> None:
        """Barge-in or client cancel: stop the reply now; store what was heard.

        A caller cancelled meanwhile (the VAD task or the socket's reader, by
        ``close()``) leaves the reply to the next call (``close()`` makes one):
        the audio message being written is finished, never cut (the wait for it
        does not pass the cancel on), and once the reply is being finished that
        runs to its end (``response.done``, the stored turn) in a task of its
        own that ``close()`` waits for.

        Returns once every reply being finished (this one, one a concurrent
        call or its own completion is finishing) has sent ``response.done``
        and reached the history, so what the caller sends next (the next
        turn's ``input.speech_started``) follows it and the next prompt has it.
        """
        reply = self._reply
        if reply is not None and reply.task is not None:
            reply.interrupted = True  # _respond leaves the finishing to this method
            await stop(reply.task)
            if self._sending is not None:
                await asyncio.wait([self._sending])
            if self._reply is reply:  # not finished by a call made meanwhile
                await self._finish_apart(reply, "interrupted")
        if self._finishing:  # asyncio.wait: a cancel of the caller does not reach them
            await asyncio.wait(self._finishing)

    async def _finish_apart(self, reply: _Reply, status: str) -> None:
        """:meth:`_finish` in a task of its own, which ``close()`` waits for.

        A cancel of the caller (``close()`` cancelling the reply's task) does
        not cut it short: ``close()`` waits for it, so a finished reply is
        announced, stored and counted towards ``max_turns`` unless closing runs
        past the transport's cleanup limit (which cancels everything). The reply
        stops being the current one at once (before the task runs), so a
        barge-in meanwhile cannot finish it a second time.
        """
        if self._reply is reply:
            self._reply = None
        finishing = asyncio.create_task(self._finish(reply, status))
        self._finishing.add(finishing)
        finishing.add_done_callback(self._finishing.discard)
        await asyncio.shield(finishing)

    async def _finish(self, reply: _Reply, status: str) -> None:
        """Send ``response.done``, store the assistant turn, end the session at ``max_turns``."""
        played_ms = round(reply.playback.played_ms(), 1)

        async def reply_alignment(clause: VoicedClause) -> list[TimedWord]:
            return await reply.alignments[id(clause)]

        text = reply.text.strip()
        tool_calls = reply.tool_calls
        if status == "interrupted":
            text = await heard_text(reply.clauses, played_ms / 1000.0, reply_alignment)
            tool_calls = [
                {**call, "text_offset": min(len(text), heard_offset(reply.text,
                                                                    call["text_offset"]))}
                for call in tool_calls
            ]
        await _stop_alignments(reply)
        assistant_turn = TurnRecord(
            turn_id=reply.turn_id,
            role="assistant",
            text=text,
            started_at=reply.started_at,
            ended_at=self._storage.clock(),
            audio_ms=round(reply.playback.sent_ms, 1),
            interrupted=status == "interrupted",
            played_ms=played_ms,
            tool_calls=tool_calls,
            latency_ms=reply.latency_ms,
        )
        # Stored first: a client that reads the session on response.done finds the turn.
        try:
            await self._put_turn(assistant_turn)
        except Exception:  # the reply still ends and counts; this socket's prompts keep it
            logger.exception("session %s: reply %s was not stored", self.record.id,
                             reply.turn_id)
            await self._reply_emit(reply, events.ErrorEvent(
                turn_id=reply.turn_id, code="internal_error",
                message="the reply could not be stored"))
        done = events.ResponseDone(
            turn_id=reply.turn_id, status=status, played_ms=played_ms, text=text
        )
        await self._reply_emit(reply, done)  # after what a flush still sends
        # The next prompt sees the reply as a reconnect would read it from storage.
        self._history.extend(chat_history([assistant_turn, *reply.tool_turns]))
        self._exchanges += 1
        limit = self.config.get("max_turns")
        if limit is not None and self._exchanges >= limit:
            await self._emit(events.SessionEnded(turn_id=reply.turn_id, reason="max_turns"))

    async def _put_turn(self, turn: TurnRecord) -> None:
        await run_in_threadpool(self._storage.put_turn, self.record.key_id, self.record.id, turn)

    async def _align(self, clause: VoicedClause) -> list[TimedWord]:
        audio = soxr.resample(clause.audio, clause.sample_rate, VAD_SAMPLE_RATE)
        return await self.models.align(audio.astype(np.float32), clause.text)
