"""The live socket of a session: limits, sequence numbers, codecs and close codes.

One :class:`LiveSocket` per accepted WebSocket. It sends ``session.started``
(first socket of the session) or ``session.resumed`` (later ones, with the last
turn's id), builds the session's :class:`~handler.sessions.base.Conversation`,
feeds it decoded audio and validated client events, and turns what it emits
into numbered events and encoded audio. It closes with a
:class:`~handler.sessions.protocol.CloseCode` when the session ends (deleted,
idle, too long, the conversation's own end such as ``max_turns``), when a
newer socket takes the session, on an oversized message, on audio sent
faster than real time allows (:class:`AudioBudget`), or on an internal
error; a client that takes no message for ``session_send_timeout_s`` is
dropped without one (the session stays active). A session is held by one
socket: the newest one. Within a process the :class:`SessionHub` closes the
older socket at once; across processes each socket rereads its session every
``session_check_s`` and closes when the session ended or another socket
claimed it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocket, WebSocketDisconnect

from handler.sessions.base import AssistantAudio, Conversation, ConversationFactory, SessionParams
from handler.sessions.codecs import OPUS_FRAME, OPUS_RATE, CodecError, Decoder, Encoder
from handler.sessions.protocol import (
    CLIENT_EVENTS,
    END_REASON_CODES,
    CloseCode,
    ErrorEvent,
    ResponseAudio,
    ResponseDone,
    ServerEvent,
    SessionEnded,
    SessionResumed,
    SessionStarted,
)
from handler.sessions.service import current
from handler.settings import Settings
from handler.storage.base import SessionRecord, SessionStore

logger = logging.getLogger("converse.sessions")
SEQ_BLOCK = 64  # sequence numbers reserved per storage write
CLEANUP_S = 10.0  # longest a closing socket waits for the conversation to stop, seconds
# Input audio a socket may send against the wall clock (docs/sessions.md, "Limits"):
# sustained, AUDIO_RATE seconds of audio per second, twice real time, so a client
# catching up after a network stall gets back to real time at one extra second of
# audio per second; and AUDIO_SLACK_S seconds of audio ahead of that at any moment,
# which a stall of up to that long delivers at once when the network comes back.
# Beyond that the audio is not a microphone: the VAD's work, the audio held and the
# turns queued for Whisper would grow with it, without limit.
AUDIO_RATE = 2.0
AUDIO_SLACK_S = 10.0
# Closes that a fatal ``error`` event announces (the others have a session.ended or no reader).
_FATAL_ERRORS = {
    CloseCode.INTERNAL_ERROR: "internal_error",
    CloseCode.MESSAGE_TOO_BIG: "message_too_big",
    CloseCode.RATE_LIMITED: "rate_limited",  # a socket's audio ran ahead (at connect: no event)
}


class AudioBudget:
    """How far a socket's input audio may run ahead of the wall clock: a leaky bucket.

    Each second of audio received adds one second to the bucket; it drains at
    ``rate`` seconds per wall-clock second and never below empty. Audio that
    would fill it past ``slack_s`` is refused. So a client streaming in real
    time (or up to ``rate`` times faster) never fills it, one that was silent
    for a while gains no credit from that, and a burst of at most ``slack_s``
    seconds (a network stall catching up) passes.

    Args:
        rate: seconds of audio per wall-clock second sustained (2.0: twice real time).
        slack_s: seconds of audio the bucket holds.
        clock: seconds, monotonic (``time.monotonic``).
    """

    def __init__(self, rate: float, slack_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.slack_s, self.clock = rate, slack_s, clock
        self.level_s = 0.0  # seconds of audio received and not yet drained
        self._since = clock()

    def take(self, seconds: float) -> bool:
        """Count ``seconds`` of audio just received; False (nothing counted) when over budget."""
        now = self.clock()
        self.level_s = max(0.0, self.level_s - self.rate * (now - self._since))
        self._since = now
        if self.level_s + seconds > self.slack_s:
            return False
        self.level_s += seconds
        return True


class SequenceNumbers:
    """A session's event numbers, reserved from storage ``SEQ_BLOCK`` at a time.

    Numbers increase strictly across sockets and processes; a socket that
    closes leaves the rest of its block unused (a gap, never a repeat).
    """

    def __init__(self, storage: SessionStore, key_id: str, session_id: str) -> None:
        self.storage, self.key_id, self.session_id = storage, key_id, session_id
        self._next, self._last = 1, 0

    async def next(self) -> int:
        """The next number (one storage write per ``SEQ_BLOCK`` calls)."""
        if self._next > self._last:
            first = await run_in_threadpool(
                self.storage.reserve_seq, self.key_id, self.session_id, SEQ_BLOCK
            )
            self._next, self._last = first, first + SEQ_BLOCK - 1
        number = self._next
        self._next += 1
        return number


@dataclass
class SessionHub:
    """This process's live sockets by session id, and the sessions about to get one.

    ``reserved`` counts, per session, the sockets that passed :meth:`reserve` but
    are not attached yet (their claim on the session is being stored), so sockets
    that connect at the same moment cannot together pass the live-session limit.
    A session leaves it when its count falls to 0.
    """

    live: dict[str, LiveSocket] = field(default_factory=dict)
    reserved: collections.Counter[str] = field(default_factory=collections.Counter)

    def reserve(self, session_id: str, limit: int) -> bool:
        """Hold a place for ``session_id``'s socket; False when ``limit`` sessions have one.

        A session that already has a socket here (a reconnect) always gets one:
        the newer socket replaces the older. Every True must be followed by
        :meth:`release`, once the socket is attached or given up.
        """
        if session_id not in self.live and session_id not in self.reserved:
            # Only sockets still being attached are reserved: a short walk.
            waiting = sum(1 for reserved in self.reserved if reserved not in self.live)
            if len(self.live) + waiting >= limit:
                return False
        self.reserved[session_id] += 1
        return True

    def release(self, session_id: str) -> None:
        """Give back one place :meth:`reserve` held for ``session_id``."""
        self.reserved[session_id] -= 1
        if self.reserved[session_id] <= 0:
            del self.reserved[session_id]

    def attach(self, socket: LiveSocket) -> LiveSocket | None:
        """Make ``socket`` its session's live socket; an older one closes (``REPLACED``).

        Returns:
            The older socket, if there was one (it is stopping now).
        """
        previous = self.live.get(socket.record.id)
        self.live[socket.record.id] = socket
        if previous is not None:
            previous.stop(CloseCode.REPLACED, "replaced by a newer connection")
        return previous

    def detach(self, socket: LiveSocket) -> None:
        """Forget ``socket`` (if it is still its session's live socket)."""
        if self.live.get(socket.record.id) is socket:
            del self.live[socket.record.id]

    def end(self, session_id: str, reason: str) -> None:
        """The session ended elsewhere (e.g. DELETE): close its socket here at once."""
        socket = self.live.get(session_id)
        if socket is not None:
            socket.stop(END_REASON_CODES[reason], reason, end_reason=reason)


class LiveSocket:
    """One accepted WebSocket of one active session.

    Args:
        websocket: the accepted socket.
        record: the session (active, owned by the socket's key).
        params: the validated query parameters.
        storage: where the session, its turns and its sequence numbers live.
        settings: limits (``session_*``).
    """

    def __init__(
        self,
        websocket: WebSocket,
        record: SessionRecord,
        params: SessionParams,
        storage: SessionStore,
        settings: Settings,
    ) -> None:
        self.websocket, self.record, self.params = websocket, record, params
        self.storage, self.settings = storage, settings
        self.connection_id = uuid.uuid4().hex
        self.seq = SequenceNumbers(storage, record.key_id, record.id)
        self.decoder = Decoder(params.encoding, params.sample_rate)
        self.encoder = Encoder(params.encoding, params.sample_rate)
        self.audio_budget = AudioBudget(AUDIO_RATE, AUDIO_SLACK_S)
        self.last_turn_id: str | None = None
        self._audio_ms: dict[str, float] = {}
        self._send_lock = asyncio.Lock()
        self._stopped = asyncio.Event()
        self._close: tuple[CloseCode | None, str, str | None] = (None, "", None)
        self._emitting = True
        self._client_stalled = False  # the client took no message for the send timeout
        self._conversation_stopped = asyncio.Event()  # its turns are all stored by then
        self._send_deadline: asyncio.Timeout | None = None  # of the message being written
        self._send_cut = False  # stop() ended the wait of the message being written

    def stop(self, code: CloseCode | None, message: str, end_reason: str | None = None) -> None:
        """Close the socket with ``code`` (None: the client left); the first call wins.

        With ``end_reason`` the session ends for that reason (stored, then
        ``session.ended`` is sent) before the socket closes.
        """
        if not self._stopped.is_set():
            self._close = (code, message, end_reason)
            self._stopped.set()
            self._emitting = False  # the conversation's later events are not sent
            if self._send_deadline is not None:  # a send waiting on a client that is behind
                self._send_cut = True
                with contextlib.suppress(RuntimeError):  # its own time ran out meanwhile
                    self._send_deadline.reschedule(asyncio.get_running_loop().time())

    async def run(self, factory: ConversationFactory, hub: SessionHub) -> None:
        """Serve the socket until it closes (never raises)."""
        resumed = bool(self.record.connection_id)
        if not hub.reserve(self.record.id, self.settings.session_max_live):
            retry_s = self.settings.retry_after_s
            await self._close_socket(
                CloseCode.SERVICE_BUSY,
                f"the service is at its live-session limit; retry in {retry_s} s",
            )
            return
        previous = None
        try:
            claimed = await run_in_threadpool(
                self.storage.claim_session, self.record.key_id, self.record.id, self.connection_id
            )
            if claimed:
                previous = hub.attach(self)
        except Exception:
            logger.exception("session %s: the socket could not claim it", self.record.id)
            await self._close_socket(CloseCode.INTERNAL_ERROR, "internal error")
            return
        finally:
            hub.release(self.record.id)
        if not claimed:
            await self._close_socket(CloseCode.SESSION_ENDED, "session has ended")
            return
        conversation: Conversation | None = None
        try:
            if previous is not None:  # what it is storing (the reply it cut off) counts
                await previous.conversation_stopped(CLEANUP_S)
                if self._stopped.is_set():  # replaced or ended meanwhile
                    return
            turns = await run_in_threadpool(
                self.storage.list_turns, self.record.key_id, self.record.id
            )
            self.last_turn_id = turns[-1].turn_id if turns else None
            opening = SessionResumed if resumed else SessionStarted
            await self._send(
                opening(
                    turn_id=self.last_turn_id,
                    session_id=self.record.id,
                    sample_rate=self.params.sample_rate,
                    encoding=self.params.encoding,
                    vad_threshold=self.params.vad_threshold,
                )
            )
            conversation = await factory(self.record, self.params, self.emit)
            await self._serve(conversation)
        except (WebSocketDisconnect, OSError):
            self.stop(None, "client left")
        except Exception:
            logger.exception("session %s: socket failed", self.record.id)
            self.stop(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            self._emitting = False
            # Shielded: the conversation must stop its work (Triton calls) and the
            # session's end be stored even when the socket's task is being cancelled.
            # Each step has its own limit, so a conversation slow to stop cannot keep
            # the session's end from being stored and sent and the socket from closing.
            if conversation is not None:
                with anyio.move_on_after(CLEANUP_S, shield=True) as stopping:
                    with contextlib.suppress(Exception):
                        await conversation.close()
                if stopping.cancelled_caught:
                    logger.warning("session %s: the conversation took over %s s to stop",
                                   self.record.id, CLEANUP_S)
            # Detached only now: a reconnect meanwhile finds this socket and waits
            # for it, and a socket still stopping counts towards the live limit.
            self._conversation_stopped.set()
            hub.detach(self)
            with anyio.move_on_after(CLEANUP_S, shield=True):
                await self._finish()

    async def conversation_stopped(self, timeout_s: float) -> None:
        """Wait until this socket's conversation has stopped (its turns stored), or ``timeout_s``.

        A newer socket of the session in this process waits for it before it
        reads the session's turns, so its prompts and turn count include the
        reply this socket was cutting off. Across processes nothing waits: the
        newer socket reads what was stored by then.
        """
        with anyio.move_on_after(timeout_s):
            await self._conversation_stopped.wait()

    async def emit(self, item: ServerEvent | AssistantAudio) -> None:
        """What the conversation sends: events get their ``seq``, audio is encoded.

        ``response.done`` first flushes the codec's held-back audio (completed)
        or drops it (interrupted, failed); ``session.ended`` ends the session
        with its reason, even while the socket is closing (the conversation's
        last reply can finish then). Anything else is ignored once it is closing.
        """
        if isinstance(item, SessionEnded):
            if not self._stopped.is_set():
                self.stop(END_REASON_CODES[item.reason], f"session ended: {item.reason}",
                          item.reason)
            elif self._close[2] is None:  # closing already: the session still ends
                self._close = (*self._close[:2], item.reason)
            return
        if not self._emitting:
            return
        try:
            if isinstance(item, AssistantAudio):
                await self._send_audio(item.turn_id, self.encoder.encode(item.samples))
                return
            if isinstance(item, ResponseDone) and item.turn_id is not None:
                if item.status == "completed":
                    await self._send_audio(item.turn_id, self.encoder.flush())
                else:
                    self.encoder.reset()
            await self._send(item)
        except (WebSocketDisconnect, RuntimeError, OSError):
            self.stop(None, "client left")
        except Exception:  # storage failing to number the event: this socket cannot go on
            logger.exception("session %s: an event could not be sent", self.record.id)
            self.stop(CloseCode.INTERNAL_ERROR, "internal error")

    async def _serve(self, conversation: Conversation) -> None:
        receiver = asyncio.create_task(self._receive(conversation))
        watchers = [
            asyncio.create_task(self._stopped.wait()),
            asyncio.create_task(self._watch_session()),
            asyncio.create_task(self._watch_duration()),
        ]
        try:
            done, _ = await asyncio.wait([receiver, *watchers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (receiver, *watchers):
                task.cancel()
            # asyncio.wait, not gather: gather would re-raise a child's CancelledError
            # in place of the one cancelling this task (anyio only absorbs its own).
            _, pending = await asyncio.wait([receiver, *watchers], timeout=CLEANUP_S)
            if pending:
                logger.warning("session %s: %d socket task(s) still running %s s after "
                               "their cancel", self.record.id, len(pending), CLEANUP_S)
        for task in done:  # the receiver's or a watcher's failure (a storage error)
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _receive(self, conversation: Conversation) -> None:
        limit = self.settings.session_max_message_bytes
        while True:
            try:
                # asyncio.timeout, not wait_for: on Python 3.11, wait_for returns a
                # message that arrived in the same loop pass as the task's cancel and
                # drops the cancel, so a client streaming audio kept a stopped socket
                # reading (ended sessions went on, and the socket never closed).
                async with asyncio.timeout(self.settings.session_idle_timeout_s):
                    message = await self.websocket.receive()
            except TimeoutError:
                self.stop(CloseCode.IDLE_TIMEOUT, "idle timeout", end_reason="idle_timeout")
                return
            if message["type"] == "websocket.disconnect":
                self.stop(None, "client left")
                return
            if self._stopped.is_set():  # closing: nothing more reaches the conversation
                return
            data: bytes | None = message.get("bytes")
            text: str | None = message.get("text")
            size = len(data) if data is not None else len((text or "").encode())
            if size > limit:
                self.stop(CloseCode.MESSAGE_TOO_BIG, f"message of {size} bytes exceeds {limit}")
                return
            if data is not None:
                try:
                    samples = self.decoder.decode(data)
                except CodecError as error:
                    await self._error("invalid_audio", str(error))
                    continue
                budget = self.audio_budget
                if not budget.take(samples.size / self.params.sample_rate):
                    self.stop(CloseCode.RATE_LIMITED,
                              f"audio ran over {budget.slack_s:g} s ahead of "
                              f"{budget.rate:g}x real time")
                    return
                if samples.size:
                    await conversation.on_audio(samples)
            elif text is not None:
                try:
                    event = CLIENT_EVENTS.validate_json(text)
                except ValidationError as error:
                    await self._error("invalid_event", _summary(error))
                    continue
                await conversation.on_event(event)

    async def _watch_session(self) -> None:
        """Reread the session every ``session_check_s``: ended, gone or claimed elsewhere."""
        while True:
            await asyncio.sleep(self.settings.session_check_s)
            record = await current(
                self.storage, self.record.key_id, self.record.id,
                self.settings.session_max_duration_s,
            )
            if record is None:
                self.stop(CloseCode.SESSION_NOT_FOUND, "session not found")
            elif record.status == "ended":
                reason = record.ended_reason or ""
                code = END_REASON_CODES.get(reason, CloseCode.SESSION_ENDED)
                self.stop(code, f"session ended: {reason}", end_reason=reason or None)
            elif record.connection_id != self.connection_id:
                self.stop(CloseCode.REPLACED, "replaced by a newer connection")
            else:
                continue
            return

    async def _watch_duration(self) -> None:
        """End the session ``session_max_duration_s`` after its creation."""
        end = self.record.created_at + self.settings.session_max_duration_s
        await asyncio.sleep(max(0.0, end - self.storage.clock()))
        self.stop(CloseCode.MAX_DURATION, "maximum session length", end_reason="max_duration")

    async def _finish(self) -> None:
        """Store the session's end (if it ends), tell the client, close the socket.

        ``session.ended`` carries the stored reason (an end stored elsewhere
        first wins) and the close code is that reason's. An end that cannot be
        stored closes with ``INTERNAL_ERROR`` (the session stays active).
        """
        code, message, end_reason = self._close
        reason = None
        if end_reason is not None:
            try:
                ended = await run_in_threadpool(
                    self.storage.end_session, self.record.key_id, self.record.id, end_reason
                )
            except Exception:
                logger.exception("session %s: its end (%s) could not be stored",
                                 self.record.id, end_reason)
                if code is not None:
                    code, message = CloseCode.INTERNAL_ERROR, "the session's end was not stored"
            else:
                stored = ended.ended_reason if ended is not None else None
                reason = stored or end_reason
                if code is not None:
                    code = END_REASON_CODES.get(reason, code)
        if code in _FATAL_ERRORS:
            with contextlib.suppress(Exception):
                await self._send(
                    ErrorEvent(
                        turn_id=self.last_turn_id, code=_FATAL_ERRORS[code], message=message,
                        fatal=True,
                    )
                )
        if reason is not None:
            with contextlib.suppress(Exception):
                await self._send(SessionEnded(turn_id=self.last_turn_id, reason=reason))
        if code is not None:
            await self._close_socket(code, message)

    async def _close_socket(self, code: CloseCode, message: str) -> None:
        if self._client_stalled:  # a close frame would wait behind what it has not read
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.settings.session_send_timeout_s):
                await self.websocket.close(int(code), message[:120])

    async def _error(self, code: str, message: str) -> None:
        await self._send(ErrorEvent(turn_id=self.last_turn_id, code=code, message=message))

    async def _send(self, event: ServerEvent) -> None:
        async with self._send_lock:
            numbered = event.model_copy(update={"seq": await self.seq.next()})
            if event.turn_id is not None:
                self.last_turn_id = event.turn_id
            await self._transmit(numbered.model_dump_json())

    async def _send_audio(self, turn_id: str, messages: list[bytes]) -> None:
        """``response.audio`` then its binary messages, with nothing in between."""
        if not messages:
            return
        rate = self.params.sample_rate
        if self.params.encoding == "opus":
            samples = len(messages) * OPUS_FRAME * rate // OPUS_RATE
        else:
            width = 2 if self.params.encoding == "pcm16" else 1
            samples = sum(len(m) for m in messages) // width
        duration_ms = 1000.0 * samples / rate
        offset_ms = self._audio_ms.get(turn_id, 0.0)
        self._audio_ms[turn_id] = offset_ms + duration_ms
        event = ResponseAudio(
            turn_id=turn_id,
            messages=len(messages),
            samples=samples,
            offset_ms=offset_ms,
            duration_ms=duration_ms,
        )
        async with self._send_lock:
            numbered = event.model_copy(update={"seq": await self.seq.next()})
            self.last_turn_id = turn_id
            await self._transmit(numbered.model_dump_json())
            for message in messages:
                await self._transmit(message)

    async def _transmit(self, message: str | bytes) -> None:
        """Write one text or binary message, waiting at most ``session_send_timeout_s``.

        uvicorn's writer waits while the connection's send buffer is full, which
        it stays while the client reads nothing (a frozen client, a network that
        vanished). A client that takes no message for that long is not listening:
        the socket stops as if the client had left (the session stays active),
        and nothing more is written to it, a close frame included (it would wait
        behind the unread data; uvicorn drops the connection when the socket's
        task ends).

        A message still waiting when the socket stops (``stop()``) is given up
        at once: the socket is closing, and its conversation must not wait on
        a client that is behind.

        Raises:
            WebSocketDisconnect: code 1006, the client is not reading (now or earlier),
                or the socket stopped while the message waited; also whatever the
                socket's own send raises.
        """
        if self._client_stalled:
            raise WebSocketDisconnect(1006)
        timeout_s = self.settings.session_send_timeout_s
        try:
            async with asyncio.timeout(timeout_s) as deadline:
                self._send_deadline, self._send_cut = deadline, False
                if isinstance(message, str):
                    await self.websocket.send_text(message)
                else:
                    await self.websocket.send_bytes(message)
            return
        except TimeoutError:
            pass
        finally:
            self._send_deadline = None
        if not self._send_cut:  # its own time ran out, not stop()'s
            self._client_stalled = True
            logger.warning("session %s: the client took no message for %g s; dropped",
                           self.record.id, timeout_s)
            self.stop(None, "client stopped reading")
        raise WebSocketDisconnect(1006)


def _summary(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "event"
    return f"{where}: {first['msg']}"
