"""The live conversation (``handler.sessions.runner``) over model fakes, without Triton.

What is under test is the runner's own logic: the prompt it builds, turn ids
across sockets, a client's cancel, tool timeouts. The fakes: the VAD hears a
window as speech when it is louder than -40 dBFS, the ASR answers scripted
transcripts, the chat LM scripted deltas, the voice 2 s of tone per clause and
the aligner evenly spaced words. The same paths with the real models run in
tests/test_sessions_live.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from handler.engines.chat import ChatDelta, ChatMessage, ToolCall
from handler.errors import DeadlineExceeded
from handler.sessions import protocol as events
from handler.sessions.base import AssistantAudio, SessionParams
from handler.sessions.runner import (
    MAX_VAD_WINDOWS,
    ConversationModels,
    LiveConversation,
    chat_history,
    heard_offset,
)
from handler.sessions.turn_taking import VAD_WINDOW
from handler.storage.base import SessionRecord, TurnRecord
from handler.storage.sqlite import SQLiteStorage
from handler.transcription import TimedWord

RATE = 16_000
VOICE_RATE = 24_000
CLAUSE_S = 2.0
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


class LoudnessVad:
    """Speech probability 1 for a window above -40 dBFS RMS, else 0; ``before`` awaited first.

    ``batches`` holds the number of windows of each call, in order.
    """

    def __init__(self, before: Callable[[], Awaitable[None]]) -> None:
        self.before = before
        self.batches: list[int] = []

    @staticmethod
    def initial_state(sample_rate: int = RATE) -> np.ndarray:
        return np.zeros(1, np.float32)

    async def speech_probabilities(
        self, windows: np.ndarray, state: np.ndarray, sample_rate: int
    ) -> tuple[np.ndarray, np.ndarray]:
        self.batches.append(len(windows))
        await self.before()
        rms = np.sqrt(np.mean(windows.astype(np.float64) ** 2, axis=1))
        return (rms > 0.01).astype(np.float32), state


class ScriptedChat:
    """Streams reply number i from ``replies[i]`` (the last one again after the end)."""

    def __init__(self, replies: list[list[ChatDelta]]) -> None:
        self.replies = replies
        self.requests: list[list[ChatMessage]] = []
        self.seeds: list[int | None] = []

    async def stream(
        self, messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]], *,
        max_new_tokens: int, temperature: float, seed: int | None,
    ) -> AsyncIterator[ChatDelta]:
        self.requests.append(list(messages))
        self.seeds.append(seed)
        for delta in self.replies[min(len(self.requests), len(self.replies)) - 1]:
            await asyncio.sleep(0.01)
            yield delta


class Session:
    """One session in SQLite; ``connect`` builds the conversation of a new socket.

    ``config`` is the session's stored config; ``tool_timeout_s``,
    ``call_timeout_s`` and ``reply_seed`` are the deployment's
    (:class:`ConversationModels`); each reply audio message takes
    ``audio_send_s`` to send (a slow socket); the first call of the model named
    by ``stall`` (``vad``, ``transcribe`` or ``speak``) never answers (a wedged
    Triton call), and ``stalls_cancelled`` counts its cancels. Each forced
    alignment takes ``align_s``; ``alignments`` counts those started, finished
    and cancelled. The first transcription takes ``first_transcribe_s``.
    """

    def __init__(self, tmp_path: Path, chat: ScriptedChat, transcripts: list[str], *,
                 tool_timeout_s: float = 10.0, call_timeout_s: float = 30.0,
                 reply_seed: int | None = None, audio_send_s: float = 0.0,
                 stall: str = "", align_s: float = 0.0, first_transcribe_s: float = 0.0,
                 **config: Any) -> None:
        self.storage = SQLiteStorage(tmp_path / "sessions.db")
        self.chat = chat
        self.transcripts = transcripts
        self.tool_timeout_s = tool_timeout_s
        self.call_timeout_s = call_timeout_s
        self.stall = stall
        self.stalls_cancelled = 0
        self.reply_seed = reply_seed
        self.audio_send_s = audio_send_s  # how long each audio message takes to send
        self.audio_sending: list[AssistantAudio] = []  # messages whose send began
        self.audio_cut: list[AssistantAudio] = []  # ... and was cancelled part-way
        self.align_s = align_s
        self.first_transcribe_s = first_transcribe_s  # the first transcription's time
        self.alignments = {"started": 0, "finished": 0, "cancelled": 0}
        self.storage.put_session(SessionRecord(
            id="conv_1", key_id="key", model="kokoro", voice="jf_alpha*1", created_at=1.0,
            config={"voice_id": "jf_alpha", "system_prompt": "You are Pat.", "language": "en",
                    "tools": [], "context_window": 50, "max_turns": None, **config},
        ))
        self.events: list[Any] = []

    async def connect(self) -> LiveConversation:
        transcripts = iter(self.transcripts)

        def stall_once(model: str) -> Callable[[], Awaitable[None]]:
            async def stall() -> None:
                if self.stall == model:
                    self.stall = ""
                    try:
                        await asyncio.Event().wait()
                    except asyncio.CancelledError:
                        self.stalls_cancelled += 1
                        raise
            return stall

        async def transcribe(audio: np.ndarray, language: str) -> str:
            await stall_once("transcribe")()
            delay_s, self.first_transcribe_s = self.first_transcribe_s, 0.0
            await asyncio.sleep(delay_s)
            return next(transcripts)

        async def speak(text: str) -> np.ndarray:
            await stall_once("speak")()
            t = np.arange(int(CLAUSE_S * VOICE_RATE)) / VOICE_RATE
            return (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)

        async def align(audio: np.ndarray, text: str) -> list[TimedWord]:
            self.alignments["started"] += 1
            try:
                await asyncio.sleep(self.align_s)
            except asyncio.CancelledError:
                self.alignments["cancelled"] += 1
                raise
            self.alignments["finished"] += 1
            words = text.split()
            step = len(audio) / RATE / len(words)
            return [TimedWord(w, i * step, (i + 1) * step) for i, w in enumerate(words)]

        async def emit(item: Any) -> None:
            if isinstance(item, AssistantAudio) and self.audio_send_s:
                self.audio_sending.append(item)
                try:
                    await asyncio.sleep(self.audio_send_s)
                except asyncio.CancelledError:
                    self.audio_cut.append(item)
                    raise
            self.events.append(item)

        models = ConversationModels(
            vad=LoudnessVad(stall_once("vad")),  # type: ignore[arg-type]
            chat=self.chat, transcribe=transcribe, speak=speak, voice_rate=VOICE_RATE,
            align=align, tool_timeout_s=self.tool_timeout_s,
            call_timeout_s=self.call_timeout_s, reply_seed=self.reply_seed,
        )
        record = self.storage.get_session("key", "conv_1")
        assert record is not None
        turns = self.storage.list_turns("key", "conv_1")
        return LiveConversation(record, SessionParams(sample_rate=RATE), models, emit,
                                self.storage, turns)

    def of_type(self, kind: str) -> list[Any]:
        return [e for e in self.events if getattr(e, "type", None) == kind]

    async def until(self, kind: str, count: int = 1, timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.of_type(kind)) < count:
                await asyncio.sleep(0.01)


async def say(conversation: LiveConversation, speech_s: float = 0.6,
              silence_s: float = 0.7) -> None:
    """``speech_s`` of tone, then ``silence_s`` of silence (0.7 s: the turn ends).

    Faster than real time: the turn's timing is the audio's, not the clock's.
    """
    t = np.arange(int(speech_s * RATE)) / RATE
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    audio = np.concatenate([tone, np.zeros(int(silence_s * RATE), np.float32)])
    for chunk in np.array_split(audio, 20):
        await conversation.on_audio(chunk)
        await asyncio.sleep(0.005)


async def second_reply_then_close(session: Session, conversation: LiveConversation) -> None:
    """The user speaks again; once the second reply is done, the socket goes."""
    await say(conversation)
    await session.until("response.done", 2)
    await conversation.close()


def fail_first_store(session: Session, role: str, error: Exception) -> None:
    """The session's first attempt to store a ``role`` turn raises ``error``."""
    put_turn = session.storage.put_turn
    failures = [error]

    def failing_put_turn(key_id: str, session_id: str, turn: TurnRecord) -> None:
        if turn.role == role and failures:
            raise failures.pop()
        put_turn(key_id, session_id, turn)

    session.storage.put_turn = failing_put_turn  # type: ignore[method-assign]


def slow_store(session: Session, role: str, seconds: float) -> None:
    """Storing a ``role`` turn takes ``seconds`` more (a slow storage round trip)."""
    put_turn = session.storage.put_turn

    def slow_put_turn(key_id: str, session_id: str, turn: TurnRecord) -> None:
        time.sleep(seconds if turn.role == role else 0.0)
        put_turn(key_id, session_id, turn)

    session.storage.put_turn = slow_put_turn  # type: ignore[method-assign]


def text(reply: str) -> list[ChatDelta]:
    return [ChatDelta(text=word + " ") for word in reply.split()]


def test_the_prompt_is_the_persona_and_the_last_context_window_turns(tmp_path: Path) -> None:
    chat = ScriptedChat([text("Fine.")])
    session = Session(tmp_path, chat, ["And now?"], context_window=2)
    for n, (role, said) in enumerate([("user", "Hi."), ("assistant", "Hello."),
                                      ("user", "How are you?"), ("assistant", "Well.")], 1):
        session.storage.put_turn("key", "conv_1", TurnRecord(f"turn_{n}", role, said, float(n)))

    async def run() -> None:
        conversation = await session.connect()
        await say(conversation)
        await session.until("response.done")
        await conversation.close()

    asyncio.run(run())
    assert [(m.role, m.content) for m in chat.requests[0]] == [
        ("system", "You are Pat."), ("user", "How are you?"), ("assistant", "Well."),
        ("user", "And now?"),
    ]


def test_the_reply_is_written_during_the_end_silence_and_sent_only_once_it_is_confirmed(
    tmp_path: Path,
) -> None:
    chat = ScriptedChat([text("Yes, it is."), text("Good.")])
    session = Session(tmp_path, chat, ["Is it on", "Is it on now?"])

    async def run() -> tuple[int, list[str], int]:
        conversation = await session.connect()
        await say(conversation, silence_s=0.3)  # past the early start, short of the end
        await asyncio.sleep(0.5)
        written_early = len(chat.requests)
        sent_early = [e.type for e in session.events]
        await say(conversation, speech_s=0.4)  # the user goes on: that work is dropped
        await session.until("response.done")
        await conversation.close()
        return written_early, sent_early, len(chat.requests)

    written_early, sent_early, requests = asyncio.run(run())
    assert written_early == 1  # the LM was writing before the end was confirmed
    assert sent_early == ["input.speech_started"]  # and nothing of it was sent
    assert requests == 2
    kinds = [getattr(e, "type", "audio") for e in session.events]
    assert kinds.index("input.transcript") < kinds.index("response.started") < kinds.index(
        "response.text.delta") < kinds.index("audio")
    assert [e.text for e in session.of_type("input.transcript")] == ["Is it on now?"]
    assert session.of_type("response.done")[0].text == "Good."
    # The dropped reply gave its id back: the turn's reply takes the next one.
    assert [e.turn_id for e in session.of_type("response.done")] == ["turn_2"]


@pytest.mark.parametrize("reply_seed", [None, 7])
def test_every_reply_is_sampled_with_the_deployments_seed(
    tmp_path: Path, reply_seed: int | None
) -> None:
    chat = ScriptedChat([text("One."), text("Two.")])
    session = Session(tmp_path, chat, ["First?", "Second?"], reply_seed=reply_seed)

    async def run() -> None:
        conversation = await session.connect()
        for count in (1, 2):
            await say(conversation)
            await session.until("response.done", count)
        await conversation.close()

    asyncio.run(run())
    assert chat.seeds == [reply_seed, reply_seed]  # None: the chat model draws a fresh one


def test_a_turn_id_a_client_saw_is_not_reused_by_the_next_socket(tmp_path: Path) -> None:
    session = Session(tmp_path, ScriptedChat([text("Yes.")]), ["Is it on?"])

    async def run() -> None:
        first = await session.connect()
        await say(first, speech_s=0.1)  # a click: speech too short to be a turn, not stored
        await session.until("input.speech_stopped")
        await first.close()
        second = await session.connect()
        await say(second)
        await session.until("response.done")
        await second.close()

    asyncio.run(run())
    started = [e.turn_id for e in session.of_type("input.speech_started")]
    assert started == ["turn_1", "turn_2"]
    stored = session.storage.list_turns("key", "conv_1")
    assert [(t.turn_id, t.role) for t in stored] == [("turn_2", "user"), ("turn_3", "assistant")]


def test_a_client_cancel_interrupts_the_reply_and_the_next_prompt_has_what_was_heard(
    tmp_path: Path,
) -> None:
    long_reply = "One two three. Four five six. Seven eight nine. Ten eleven twelve."
    chat = ScriptedChat([text(long_reply), text("Sure.")])
    session = Session(tmp_path, chat, ["Count.", "Stop."])

    async def run() -> None:
        conversation = await session.connect()
        await say(conversation)
        await session.until("response.started")
        reply_id = session.of_type("response.started")[0].turn_id
        async with asyncio.timeout(10):
            while not any(isinstance(e, AssistantAudio) for e in session.events):
                await asyncio.sleep(0.01)
        await asyncio.sleep(1.0)  # half of the first clause plays: "One", maybe "two"
        await conversation.on_event(events.ResponseCancel(turn_id=reply_id))
        await session.until("response.done")
        await second_reply_then_close(session, conversation)

    asyncio.run(run())
    interrupted = session.of_type("response.done")[0]
    assert interrupted.status == "interrupted" and 0 < interrupted.played_ms < 1000 * CLAUSE_S
    heard = interrupted.text
    assert heard and long_reply.startswith(heard) and len(heard) < len("One two three.")
    stored = [t for t in session.storage.list_turns("key", "conv_1") if t.role == "assistant"]
    assert stored[0].interrupted and stored[0].text == heard
    assert ("assistant", heard) in [(m.role, m.content) for m in chat.requests[1]]
    assert long_reply not in [m.content for m in chat.requests[1]]


def test_after_a_tool_timeout_the_session_goes_on(tmp_path: Path) -> None:
    call = ChatDelta(tool_call=ToolCall("call_1", "lookup", "{}"))
    chat = ScriptedChat([[call], text("Here I am.")])
    session = Session(tmp_path, chat, ["Look it up.", "Hello?"], tools=[TOOL],
                      tool_timeout_s=0.3)

    async def run() -> None:
        conversation = await session.connect()
        await say(conversation)
        await session.until("tool.call")
        await session.until("response.done")  # nobody answers: tool_timeout_s is 0.3 s
        await second_reply_then_close(session, conversation)

    asyncio.run(run())
    assert [e.code for e in session.of_type("error")] == ["tool_timeout"]
    assert [e.status for e in session.of_type("response.done")] == ["failed", "completed"]
    assert session.of_type("response.done")[1].text == "Here I am."


@pytest.mark.parametrize("context_window", [50, 1])
def test_a_replys_text_and_tool_results_reach_the_model_in_the_order_written(
    tmp_path: Path, context_window: int,
) -> None:
    first = ChatDelta(tool_call=ToolCall("call_1", "lookup", '{"q": 1}'))
    second = ChatDelta(tool_call=ToolCall("call_2", "lookup", '{"q": 2}'))
    chat = ScriptedChat([[*text("Let me check."), first], [*text("It is sunny."), second],
                         text("Bye now."), text("Fine.")])
    session = Session(tmp_path, chat, ["Weather?", "Thanks."], tools=[TOOL],
                      context_window=context_window)

    async def run() -> None:
        conversation = await session.connect()
        await say(conversation)
        for n, call_id in enumerate(("call_1", "call_2"), 1):
            await session.until("tool.call", n)
            await conversation.on_event(events.ToolResult(call_id=call_id, output=f"r{n}"))
        await session.until("response.done")
        await second_reply_then_close(session, conversation)

    asyncio.run(run())
    assert session.of_type("response.done")[0].text == "Let me check. It is sunny. Bye now."

    def shape(messages: list[ChatMessage]) -> list[tuple[str, str, tuple[str, ...], str | None]]:
        return [(m.role, m.content, tuple(c.id for c in m.tool_calls), m.tool_call_id)
                for m in messages]

    round_one = [("assistant", "Let me check.", ("call_1",), None), ("tool", "r1", (), "call_1")]
    round_two = [("assistant", "It is sunny.", ("call_2",), None), ("tool", "r2", (), "call_2")]
    # Within the reply: each round adds only what was written since the last call.
    assert shape(chat.requests[1])[-2:] == round_one
    assert shape(chat.requests[2])[-4:] == round_one + round_two
    # The next reply's prompt, rebuilt from the stored turns, keeps that order; a reply
    # with its calls and results is one turn of the context window.
    reply_turn = [*round_one, *round_two, ("assistant", "Bye now.", (), None)]
    earlier = [("user", "Weather?", (), None)] if context_window > 1 else []
    assert shape(chat.requests[3])[1:] == [*earlier, *reply_turn, ("user", "Thanks.", (), None)]
    stored = [t for t in session.storage.list_turns("key", "conv_1") if t.role == "assistant"]
    assert [c["text_offset"] for c in stored[0].tool_calls] == [len("Let me check. "),
                                                                len("Let me check. It is sunny. ")]


def turn(n: int, role: str, text: str, calls: tuple[dict[str, Any], ...] = (),
         answers: str | None = None) -> TurnRecord:
    return TurnRecord(turn_id=f"turn_{n}", role=role, text=text, started_at=float(n),
                      tool_calls=list(calls), tool_call_id=answers)


def call(call_id: str, offset: int | None = None) -> dict[str, Any]:
    record = {"id": call_id, "name": "lookup", "arguments": "{}"}
    return record if offset is None else {**record, "text_offset": offset}


def test_stored_tool_turns_pair_with_the_reply_that_called_them() -> None:
    groups = chat_history([
        turn(1, "tool", "orphan", answers="call_0"),  # its call is not stored: left out
        turn(2, "user", "Weather?"),
        turn(3, "assistant", "Checking. Sunny.", (call("call_0", 10),)),
        turn(4, "tool", "r1", answers="call_0"),
        turn(5, "user", "And tomorrow?"),
        # An endpoint that numbers calls per response uses the id again.
        turn(6, "assistant", "Rain.", (call("call_0", 99),)),  # offset past the stored text
        turn(7, "tool", "r2", answers="call_0"),
        turn(8, "assistant", "Old record.", (call("call_9"),)),  # stored without text_offset
    ])
    shapes = [[(m.role, m.content, m.tool_call_id) for m in group] for group in groups]
    assert shapes == [
        [("user", "Weather?", None)],
        [("assistant", "Checking.", None), ("tool", "r1", "call_0"), ("assistant", "Sunny.", None)],
        [("user", "And tomorrow?", None)],
        [("assistant", "Rain.", None), ("tool", "r2", "call_0")],
        [("assistant", "", None), ("assistant", "Old record.", None)],
    ]


def test_a_calls_offset_in_the_words_heard() -> None:
    written = " Let me check that for you.\n\nIt's  sunny today."
    offset = len("Let me check that for you.\n\n")
    assert heard_offset(written, offset) == len("Let me check that for you.")
    heard = "Let me check that for you. It's sunny today."
    assert heard_offset(written, len(written)) == len(heard)
    assert heard_offset(written, 0) == 0


def test_the_text_after_a_tool_result_does_not_glue_onto_the_text_before(
    tmp_path: Path,
) -> None:
    chat = ScriptedChat([[ChatDelta(text="Let me check."),
                          ChatDelta(tool_call=ToolCall("call_1", "lookup", "{}"))],
                         [ChatDelta(text="It is sunny.")]])
    session = Session(tmp_path, chat, ["Weather?"], tools=[TOOL])

    async def run() -> None:
        conversation = await session.connect()
        await say(conversation)
        await session.until("tool.call")
        await conversation.on_event(events.ToolResult(call_id="call_1", output="sunny"))
        await session.until("response.done")
        await conversation.close()

    asyncio.run(run())
    [done] = session.of_type("response.done")
    assert done.text == "Let me check. It is sunny."
    assert "".join(e.delta for e in session.of_type("response.text.delta")) == done.text


def test_nothing_the_runner_starts_outlives_close(tmp_path: Path) -> None:
    session = Session(tmp_path, ScriptedChat([text("One. Two. Three. Four.")]), ["Go."])

    async def run() -> set[asyncio.Task[Any]]:
        conversation = await session.connect()
        await say(conversation)
        await session.until("response.started")
        await conversation.close()
        await asyncio.sleep(0.05)
        return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}

    assert asyncio.run(run()) == set()


class SlowToStopChat(ScriptedChat):
    """Writes one word, then waits; once cancelled it takes ``stop_s`` to end (a gRPC cancel)."""

    def __init__(self, stop_s: float) -> None:
        super().__init__([text("Hmm")])
        self.stop_s = stop_s
        self.stopped = 0

    async def stream(
        self, messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]], *,
        max_new_tokens: int, temperature: float, seed: int | None,
    ) -> AsyncIterator[ChatDelta]:
        self.requests.append(list(messages))
        yield ChatDelta(text="Hmm ")
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(self.stop_s)
            self.stopped += 1


class ChatWedgedOnce(SlowToStopChat):
    """Its first reply is SlowToStopChat's (one word, then nothing); the rest as scripted."""

    def __init__(self, replies: list[list[ChatDelta]]) -> None:
        super().__init__(stop_s=0.0)
        self.replies = replies

    async def stream(
        self, messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]], *,
        max_new_tokens: int, temperature: float, seed: int | None,
    ) -> AsyncIterator[ChatDelta]:
        reply = ScriptedChat.stream if self.requests else SlowToStopChat.stream
        async for delta in reply(self, messages, tools, max_new_tokens=max_new_tokens,
                                 temperature=temperature, seed=seed):
            yield delta


@pytest.mark.parametrize(("stall", "statuses"), [
    ("transcribe", ["completed"]),  # the first turn gets no reply
    ("speak", ["failed", "completed"]),
    ("chat", ["failed", "completed"]),
])
def test_a_model_call_past_its_limit_is_stopped_and_the_session_goes_on(
    tmp_path: Path, stall: str, statuses: list[str]
) -> None:
    chat = (ChatWedgedOnce if stall == "chat" else ScriptedChat)([text("Here I am.")])
    session = Session(tmp_path, chat, ["Hi.", "Hello?"], call_timeout_s=0.3,
                      stall="" if stall == "chat" else stall)

    async def run() -> None:
        conversation = await session.connect()
        await say(conversation)
        await session.until("error")
        await say(conversation)
        await session.until("response.done", len(statuses))
        await conversation.close()

    asyncio.run(run())
    errors = session.of_type("error")
    assert [e.code for e in errors] == ["timeout"]
    assert "took over 0.3 s" in errors[0].message
    assert [e.status for e in session.of_type("response.done")] == statuses
    assert session.of_type("response.done")[-1].text == "Here I am."
    # The wedged call was cancelled, not left running.
    assert (chat.stopped if isinstance(chat, ChatWedgedOnce)
            else session.stalls_cancelled) == 1


def test_a_vad_call_past_its_limit_fails_the_socket(tmp_path: Path) -> None:
    session = Session(tmp_path, ScriptedChat([text("Hello.")]), ["Hi."], call_timeout_s=0.2,
                      stall="vad")

    async def run() -> None:
        conversation = await session.connect()
        window = np.zeros(VAD_WINDOW, np.float32)
        await conversation.on_audio(window)
        await asyncio.sleep(0.4)
        with pytest.raises(DeadlineExceeded, match="voice activity detection took over"):
            await conversation.on_audio(window)
        await conversation.close()

    asyncio.run(run())
    assert session.stalls_cancelled == 1


def test_a_vad_behind_the_socket_catches_up_in_calls_of_at_most_max_vad_windows(
    tmp_path: Path,
) -> None:
    """Ten turns arrive while the first VAD call hangs (a slow Triton): the backlog,
    about 400 windows, goes in calls of at most MAX_VAD_WINDOWS, every window once."""
    session = Session(tmp_path, ScriptedChat([text("Ok.")]), [""] * 10)  # no replies
    released = asyncio.Event()

    async def run() -> LoudnessVad:
        conversation = await session.connect()
        vad = conversation.models.vad
        assert isinstance(vad, LoudnessVad)
        vad.before = released.wait
        for _ in range(10):
            await say(conversation)
        released.set()
        await session.until("input.speech_stopped", 10)
        await conversation.close()
        return vad

    vad = asyncio.run(run())
    sent = 10 * (int(0.6 * RATE) + int(0.7 * RATE))
    assert sum(vad.batches) == sent // VAD_WINDOW
    assert sum(vad.batches[1:]) > MAX_VAD_WINDOWS  # the backlog needed more than one call
    assert max(vad.batches) <= MAX_VAD_WINDOWS
    assert len(session.of_type("input.speech_started")) == 10


def test_close_while_the_user_speaks_on_over_an_early_start_still_stops_everything(
    tmp_path: Path,
) -> None:
    """close() lands while the VAD task waits for the early start's work to stop.

    That wait must not swallow the VAD task's own cancellation: the task would
    go on waiting for audio that never comes, and close() would never return.
    """
    chat = SlowToStopChat(stop_s=0.3)
    session = Session(tmp_path, chat, ["Is it", "Is it on?"])

    async def run() -> tuple[bool, set[asyncio.Task[Any]]]:
        conversation = await session.connect()
        await say(conversation, silence_s=0.3)  # past the early start, short of the end
        async with asyncio.timeout(5):
            while not chat.requests:
                await asyncio.sleep(0.01)
        await say(conversation, speech_s=0.2, silence_s=0.0)  # speaks on: the work is dropped
        await asyncio.sleep(0.1)  # the VAD task now waits for the LM call to stop
        # Not asyncio.timeout: close() swallowing its own cancellation would hide the hang.
        closing = asyncio.create_task(conversation.close())
        finished, _ = await asyncio.wait({closing}, timeout=5)
        closing.cancel()
        await asyncio.wait({closing})
        await asyncio.sleep(0.05)
        left = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
        return bool(finished), left

    closed, left = asyncio.run(run())
    assert closed and left == set()
    assert chat.stopped == 1
    assert session.of_type("response.started") == []


def test_a_replys_figures_count_from_when_the_turns_last_speech_arrived(tmp_path: Path) -> None:
    """The stream stalls 0.4 s between the speech and its end silence: that is hangover too.

    The speech is 20 whole VAD windows, so its last window arrives before the stall.
    """
    session = Session(tmp_path, ScriptedChat([text("Yes.")]), ["Is it on?"])

    async def run() -> None:
        conversation = await session.connect()
        await say(conversation, speech_s=20 * VAD_WINDOW / RATE, silence_s=0.0)
        await asyncio.sleep(0.4)
        await say(conversation, speech_s=0.0)
        await session.until("response.done")
        await conversation.close()

    asyncio.run(run())
    [reply] = [t for t in session.storage.list_turns("key", "conv_1") if t.role == "assistant"]
    figures = reply.latency_ms
    assert figures["vad_hangover"] >= 400.0
    assert figures["ttfa"] == pytest.approx(figures["vad_hangover"] + figures["first_audio"],
                                            abs=0.1)


def test_a_reply_whose_user_turn_is_being_stored_at_close_does_not_outlive_it(
    tmp_path: Path,
) -> None:
    session = Session(tmp_path, ScriptedChat([text("One. Two. Three.")]), ["Go."])
    slow_store(session, "user", 0.5)

    async def run() -> set[asyncio.Task[Any]]:
        conversation = await session.connect()
        await say(conversation)
        await session.until("input.transcript")  # sent; the user turn is being stored
        await conversation.close()
        await asyncio.sleep(0.05)
        return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}

    assert asyncio.run(run()) == set()
    assert session.of_type("response.started") == []


def test_a_user_turn_that_cannot_be_stored_gets_an_error_and_no_reply(tmp_path: Path) -> None:
    session = Session(tmp_path, ScriptedChat([text("One."), text("Two.")]), ["Go.", "Again."])
    fail_first_store(session, "user", RuntimeError("disk full"))

    async def run() -> set[asyncio.Task[Any]]:
        conversation = await session.connect()
        await say(conversation)
        await session.until("error")
        await asyncio.sleep(0.2)
        left = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
        await say(conversation)  # the session goes on
        await session.until("response.done")
        await conversation.close()
        return left

    left = asyncio.run(run())
    assert all("_run_vad" in repr(t.get_coro()) for t in left)  # no reply left waiting
    [error] = session.of_type("error")
    assert (error.turn_id, error.code) == ("turn_1", "internal_error")
    [done] = session.of_type("response.done")
    assert done.text == "Two." and done.turn_id == "turn_3"  # the dropped reply gave turn_2 back


def test_a_barge_in_while_a_tool_result_is_stored_leaves_no_call_without_its_result(
    tmp_path: Path,
) -> None:
    call = ChatDelta(tool_call=ToolCall("call_1", "lookup", "{}"))
    chat = ScriptedChat([[*text("Let me check."), call], text("It is sunny."), text("Fine.")])
    session = Session(tmp_path, chat, ["Weather?", "Never mind."], tools=[TOOL])
    slow_store(session, "tool", 0.5)

    async def run() -> None:
        conversation = await session.connect()
        await say(conversation)
        await session.until("tool.call")
        await conversation.on_event(events.ToolResult(call_id="call_1", output="sunny"))
        await asyncio.sleep(0.1)  # the tool turn is being stored
        await conversation.on_event(events.ResponseCancel())
        await session.until("response.done")
        await second_reply_then_close(session, conversation)

    asyncio.run(run())
    assert session.of_type("response.done")[0].status == "interrupted"
    prompt = chat.requests[-1]
    answered = {m.tool_call_id for m in prompt if m.role == "tool"}
    assert all(c.id in answered for m in prompt for c in m.tool_calls)


def test_a_cancel_whose_handling_is_cut_short_still_ends_and_stores_the_reply(
    tmp_path: Path,
) -> None:
    """The socket's reader is cancelled while it stops the reply for ``response.cancel``.

    The reply must still end once, as interrupted, and be stored: ``close()`` finishes it.
    """
    chat = SlowToStopChat(stop_s=0.3)
    session = Session(tmp_path, chat, ["Hello?"])

    async def run() -> set[asyncio.Task[Any]]:
        conversation = await session.connect()
        await say(conversation)
        await session.until("response.started")
        handling = asyncio.create_task(conversation.on_event(events.ResponseCancel()))
        await asyncio.sleep(0.05)  # the reply's LM call is stopping
        handling.cancel()
        await asyncio.wait({handling})
        await conversation.close()
        await asyncio.sleep(0.05)
        return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}

    assert asyncio.run(run()) == set()
    assert [e.status for e in session.of_type("response.done")] == ["interrupted"]
    stored = session.storage.list_turns("key", "conv_1")
    assert [(t.role, t.interrupted) for t in stored] == [("user", False), ("assistant", True)]


def test_an_audio_message_being_sent_is_finished_when_the_cancel_is_cut_short(
    tmp_path: Path,
) -> None:
    """No half audio message: the wait for the send in flight does not pass a cancel on."""
    session = Session(tmp_path, ScriptedChat([text("One two three. Four five six.")]),
                      ["Count."], audio_send_s=0.5)

    async def run() -> None:
        conversation = await session.connect()
        await say(conversation)
        async with asyncio.timeout(10):
            while not session.audio_sending:
                await asyncio.sleep(0.01)
        handling = asyncio.create_task(conversation.on_event(events.ResponseCancel()))
        await asyncio.sleep(0.05)
        handling.cancel()
        await asyncio.wait({handling})
        await conversation.close()

    asyncio.run(run())
    assert session.audio_cut == []
    assert [e.status for e in session.of_type("response.done")] == ["interrupted"]


@pytest.mark.parametrize("ending", ["close", "the user speaks on"])
def test_the_alignments_of_a_reply_never_shown_stop_with_it(tmp_path: Path, ending: str) -> None:
    """The early start voices (and aligns) a clause before the turn's end is confirmed."""
    session = Session(tmp_path, ScriptedChat([text("Yes it is on. Sure."), text("Good.")]),
                      ["Is it on", "Is it on now?"], align_s=3.0)

    async def run() -> set[asyncio.Task[Any]]:
        conversation = await session.connect()
        await say(conversation, silence_s=0.3)  # the early start; the end is not confirmed
        async with asyncio.timeout(10):
            while not session.alignments["started"]:
                await asyncio.sleep(0.01)
        if ending == "the user speaks on":
            await say(conversation, speech_s=0.4)
            await session.until("response.done")
        await conversation.close()
        await asyncio.sleep(0.05)
        return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}

    assert asyncio.run(run()) == set()
    assert session.alignments["finished"] == 0
    assert session.alignments["cancelled"] == session.alignments["started"]


def test_a_reply_being_stored_as_the_socket_closes_still_ends_the_session_at_max_turns(
    tmp_path: Path,
) -> None:
    session = Session(tmp_path, ScriptedChat([text("Hi.")]), ["Hello?"], max_turns=1)
    put_turn = session.storage.put_turn
    storing = threading.Event()

    def slow_put_turn(key_id: str, session_id: str, turn: TurnRecord) -> None:
        if turn.role == "assistant":
            storing.set()
            time.sleep(0.3)  # a storage round trip
        put_turn(key_id, session_id, turn)

    session.storage.put_turn = slow_put_turn  # type: ignore[method-assign]

    async def run() -> None:
        conversation = await session.connect()
        await say(conversation)
        async with asyncio.timeout(10):
            while not storing.is_set():
                await asyncio.sleep(0.01)
        await conversation.close()  # the client leaves as the completed reply is stored

    asyncio.run(run())
    kinds = [e.type for e in session.events if hasattr(e, "type")]
    assert kinds[-2:] == ["response.done", "session.ended"]
    assert session.of_type("session.ended")[0].reason == "max_turns"


def test_a_reply_that_cannot_be_stored_still_ends_with_an_error_and_counts(
    tmp_path: Path,
) -> None:
    session = Session(tmp_path, ScriptedChat([text("Hi."), text("Two.")]), ["Hello?", "Again?"],
                      max_turns=2)
    fail_first_store(session, "assistant", RuntimeError("table throttled"))

    async def run() -> None:
        conversation = await session.connect()
        await say(conversation)
        await session.until("response.done")
        await say(conversation)
        await session.until("session.ended")
        await conversation.close()

    asyncio.run(run())
    [error] = session.of_type("error")
    assert (error.turn_id, error.code) == ("turn_2", "internal_error")
    done = session.of_type("response.done")
    assert [(d.turn_id, d.status) for d in done] == [
        ("turn_2", "completed"), ("turn_4", "completed")]
    assert session.events.index(error) < session.events.index(done[0])
    assert session.chat.requests[1][-2].content == "Hi."  # the next prompt has the reply


def test_a_turn_that_ends_while_the_one_before_is_transcribed_gets_the_reply(
    tmp_path: Path,
) -> None:
    """The user says more before the first turn's reply could start: one reply, to both."""
    session = Session(tmp_path, ScriptedChat([text("Sunny all day.")]),
                      ["Hey.", "What is the weather like?"], first_transcribe_s=1.5)

    async def run() -> None:
        conversation = await session.connect()
        await say(conversation)
        await session.until("input.speech_stopped")
        await say(conversation)
        await session.until("response.done")
        await asyncio.sleep(0.3)
        await conversation.close()

    asyncio.run(run())
    [started] = session.of_type("response.started")
    [_, second] = session.of_type("input.transcript")
    assert started.reply_to == second.turn_id
    prompt = session.chat.requests[-1]  # the first turn's reply was started, then dropped
    assert [m.content for m in prompt if m.role == "user"] == ["Hey.", "What is the weather like?"]


@pytest.mark.parametrize("ending", ["cancel", "completed"])
def test_speech_after_a_reply_ends_waits_for_its_response_done(
    tmp_path: Path, ending: str
) -> None:
    """The user speaks while the ended reply is still being stored.

    ``input.speech_started`` of the new turn comes after the reply's
    ``response.done``, and the next prompt has the reply before the new turn.
    """
    chat = ScriptedChat([text("One two three."), text("Fine.")])
    session = Session(tmp_path, chat, ["Count.", "Again."])
    slow_store(session, "assistant", 0.5)

    async def run() -> None:
        conversation = await session.connect()
        await say(conversation)
        async with asyncio.timeout(10):
            while not any(isinstance(e, AssistantAudio) for e in session.events):
                await asyncio.sleep(0.01)
        if ending == "cancel":  # once "One" has played
            await asyncio.sleep(1.0)
            cancelling = asyncio.create_task(conversation.on_event(events.ResponseCancel()))
        else:  # once its one clause has played
            await asyncio.sleep(CLAUSE_S)
        await asyncio.sleep(0.15)  # its turn is being stored
        await say(conversation)
        if ending == "cancel":
            await cancelling
        await session.until("response.done", 2)
        await conversation.close()

    asyncio.run(run())
    kinds = [kind for e in session.events
             if (kind := getattr(e, "type", None)) in ("input.speech_started", "response.done")]
    assert kinds == ["input.speech_started", "response.done"] * 2
    prompt = chat.requests[-1]
    assert [m.role for m in prompt] == ["system", "user", "assistant", "user"]
