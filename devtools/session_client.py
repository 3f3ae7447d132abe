"""A scripted live-session client: speaks audio into a session's socket in real time.

Used by the tests, ``make demo`` and ``benchmarks/sessions.py``. It sends the
microphone side as a real client would (20 ms messages, paced in real time,
silence between utterances, in the socket's encoding) and records every server
event with the amount of input audio sent when it arrived, so VAD decisions can
be compared with an utterance's true bounds in stream time.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import httpx
import numpy as np
import soundfile as sf
import websockets

from handler.audio import resample
from handler.sessions.codecs import Decoder, Encoder
from handler.tasks import stop

MESSAGE_S = 0.02  # 20 ms per microphone message, as browsers and telephony send


@dataclass
class ReceivedEvent:
    """A server event and when it arrived.

    Attributes:
        event: the JSON event.
        input_ms: milliseconds of input audio sent when it arrived (stream time).
        wall_s: monotonic seconds when it arrived.
    """

    event: dict[str, Any]
    input_ms: float
    wall_s: float


@dataclass
class LiveClient:
    """One socket to ``WS /v1/conversations/{id}/stream``.

    ``late_audio`` lists the turn of every audio message that arrived after
    that turn's ``response.done`` (a protocol violation; tests check it is empty).
    With ``instant_playback`` the client reports each reply's audio as played as
    soon as it arrives (``playback.position``), like a client that writes audio to
    a file: the server then ends the reply without waiting for real-time playback.

    Args:
        stream_url: the session's ``stream_url`` (ws:// or wss://).
        api_key: sent in the ``Authorization`` header.
        sample_rate: Hz, input and output.
        encoding: ``pcm16``, ``mulaw`` or ``opus``.
        vad_threshold: 0.0-1.0.
        instant_playback: report reply audio as played on arrival.
    """

    stream_url: str
    api_key: str
    sample_rate: int = 16_000
    encoding: str = "pcm16"
    vad_threshold: float = 0.5
    instant_playback: bool = False
    events: list[ReceivedEvent] = field(default_factory=list)
    reply_audio: dict[str, list[np.ndarray]] = field(default_factory=dict)
    close_code: int | None = None
    sent_ms: float = 0.0
    late_audio: list[str] = field(default_factory=list)

    async def __aenter__(self) -> LiveClient:
        query = urlencode(
            {
                "sample_rate": self.sample_rate,
                "encoding": self.encoding,
                "vad_threshold": self.vad_threshold,
            }
        )
        self._socket = await websockets.connect(
            f"{self.stream_url}?{query}",
            additional_headers={"Authorization": f"Bearer {self.api_key}"},
            max_size=None,
        )
        self._encoder = Encoder(self.encoding, self.sample_rate)
        self._decoder = Decoder(self.encoding, self.sample_rate)
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        try:
            await self._socket.close()
        finally:
            await stop(self._reader)

    async def _read(self) -> None:
        audio_turn: str | None = None
        done_turns: set[str] = set()
        try:
            async for message in self._socket:
                if isinstance(message, bytes):
                    if audio_turn in done_turns:
                        self.late_audio.append(audio_turn)
                    if audio_turn is not None:
                        samples = self._decoder.decode(message)
                        self.reply_audio.setdefault(audio_turn, []).append(samples)
                else:
                    event = json.loads(message)
                    if event.get("type") == "response.audio":
                        audio_turn = event["turn_id"]
                        if self.instant_playback:
                            played = event["offset_ms"] + event["duration_ms"]
                            await self.send_event({"type": "playback.position",
                                                   "turn_id": audio_turn, "played_ms": played})
                    elif event.get("type") == "response.done":
                        done_turns.add(event["turn_id"])
                    self.events.append(ReceivedEvent(event, self.sent_ms, time.monotonic()))
                self._changed.set()
        except websockets.ConnectionClosed:
            pass
        self.close_code = self._socket.close_code
        self._changed.set()

    async def send_audio(self, samples: np.ndarray) -> None:
        """Send float32 [n] mono audio at ``sample_rate`` in real time, 20 ms per message."""
        step = int(self.sample_rate * MESSAGE_S)
        started = time.monotonic()
        for offset in range(0, len(samples), step):
            for message in self._encoder.encode(samples[offset : offset + step]):
                await self._socket.send(message)
            self.sent_ms += len(samples[offset : offset + step]) / self.sample_rate * 1000
            ahead = started + (offset + step) / self.sample_rate - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)

    async def send_event(self, event: dict[str, Any]) -> None:
        """Send one client event (JSON text message)."""
        await self._socket.send(json.dumps(event))

    async def silence_until(
        self, done: Callable[[list[ReceivedEvent]], bool], timeout_s: float
    ) -> None:
        """Keep the microphone open (silence, real time) until ``done(events)`` or a close.

        Raises:
            TimeoutError: not done within ``timeout_s`` seconds.
        """
        chunk = np.zeros(int(self.sample_rate * MESSAGE_S), np.float32)
        deadline = time.monotonic() + timeout_s
        while not done(self.events) and self.close_code is None:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no matching event within {timeout_s} s; received: {self.summary()}"
                )
            await self.send_audio(chunk)

    async def wait_closed(self, timeout_s: float) -> int | None:
        """The close code once the server closed the socket.

        Raises:
            TimeoutError: still open after ``timeout_s`` seconds.
        """
        async with asyncio.timeout(timeout_s):
            await self._reader
        return self.close_code

    def summary(self) -> str:
        """The received events in one line (type, turn and outcome; no audio deltas).

        For failure messages: says how far a session got when an awaited event
        never came.
        """
        shown = ("status", "reason", "code", "message", "text", "name", "played_ms")
        lines = []
        for received in self.events:
            event = received.event
            if event.get("type") in ("response.audio", "response.text.delta"):
                continue
            details = ", ".join(f"{k}={event[k]!r}" for k in shown if k in event)
            lines.append(f"{received.input_ms:.0f} ms {event.get('type')} "
                         f"{event.get('turn_id')} {details}".rstrip())
        return "; ".join(lines) or "nothing"

    def of_type(self, kind: str) -> list[ReceivedEvent]:
        """Received events of one ``type``, in order."""
        return [e for e in self.events if e.event.get("type") == kind]

    def audio_of(self, turn_id: str) -> np.ndarray:
        """The decoded reply audio of a turn, float32 [n] at ``sample_rate``."""
        parts = self.reply_audio.get(turn_id, [])
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)


@dataclass(frozen=True)
class SpokenExchange:
    """Spoken questions and their replies through a new session.

    Attributes:
        client: the socket's recording (events, decoded reply audio).
        session: the session as ``GET /v1/conversations/{id}`` answered afterwards.
        true_ends_ms: per question, the stream time (ms of input sent) at which its
            speech ended (last sample above -40 dBFS).
    """

    client: LiveClient
    session: dict[str, Any]
    true_ends_ms: list[float]


def _replies_done(count: int) -> Callable[[list[ReceivedEvent]], bool]:
    """A ``silence_until`` condition: ``count`` replies have ended."""
    return lambda events: sum(e.event["type"] == "response.done" for e in events) >= count


async def spoken_exchange(
    base_url: str, api_key: str, questions: Sequence[np.ndarray], sample_rate: int,
    voice_id: str, system_prompt: str, timeout_s: float = 120.0,
) -> SpokenExchange:
    """Questions spoken into a new session one after another, each once the reply before ended.

    Creates the session, then for each of ``questions`` (float32 at
    ``sample_rate``) says it after 0.5 s of silence and keeps the microphone
    open until its reply ends; then reads the stored session.

    Raises:
        httpx.HTTPStatusError: the session could not be created or read.
        TimeoutError: a reply did not end within ``timeout_s``.
    """
    headers = {"Authorization": f"Bearer {api_key}"}
    true_ends_ms = []
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as http:
        created = await http.post("/v1/conversations/create",
                                  json={"voice_id": voice_id, "system_prompt": system_prompt})
        created.raise_for_status()
        session_id = created.json()["session_id"]
        async with LiveClient(created.json()["stream_url"], api_key, sample_rate) as client:
            await client.silence_until(lambda events: bool(events), 10)
            for replies, audio in enumerate(questions, 1):
                await client.send_audio(np.zeros(sample_rate // 2, np.float32))
                loud = np.flatnonzero(np.abs(audio) > 0.01)
                true_ends_ms.append(client.sent_ms + (loud[-1] + 1) * 1000 / sample_rate)
                await client.send_audio(audio)
                await client.silence_until(_replies_done(replies), timeout_s)
        stored = await http.get(f"/v1/conversations/{session_id}")
        stored.raise_for_status()
    return SpokenExchange(client, stored.json(), true_ends_ms)


def rendered_speech(
    base_url: str, api_key: str, text: str, sample_rate: int, speaker: str = "0"
) -> np.ndarray:
    """``text`` voiced by the default model's ``speaker`` through ``POST /v1/converse``.

    Returns:
        float32 mono [n] at ``sample_rate`` Hz.

    Raises:
        httpx.HTTPStatusError: the API refused or failed.
    """
    response = httpx.post(f"{base_url}/v1/converse", timeout=120,
                          headers={"Authorization": f"Bearer {api_key}"},
                          json={"conversation": [{"speaker": speaker, "text": text}]})
    response.raise_for_status()
    wav = base64.b64decode(response.json()["reply"]["audio"]["data_b64"])
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return resample(samples, rate, sample_rate).astype(np.float32)
