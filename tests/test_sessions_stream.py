"""``WS /v1/conversations/{id}/stream``: the transport, driven by a scripted conversation.

The conversation here is a test double of the runner (it echoes each audio
message back as a reply turn); what is under test is the transport: auth,
parameters and close codes, sequence numbers across reconnects, codecs,
limits and how DELETE, idle time and a conversation's own end close the socket.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from websockets.client import ClientProtocol
from websockets.uri import parse_uri

from devtools.api_server import ApiServer
from handler.app import create_app
from handler.errors import ServiceUnavailable
from handler.sessions import transport
from handler.sessions.base import AssistantAudio, ConversationFactory, Emit, SessionParams
from handler.sessions.codecs import Decoder, Encoder
from handler.sessions.protocol import (
    ClientEvent,
    CloseCode,
    PlaybackPosition,
    ResponseCancel,
    ResponseDone,
    ResponseStarted,
    SessionEnded,
    SpeechStarted,
    ToolResult,
)
from handler.settings import Settings
from handler.storage.base import SessionRecord, TurnRecord
from handler.storage.sqlite import SQLiteStorage
from tests.helpers import API_KEY, AUTH, make_settings

# An event a conversation may emit (any server event numbered by the transport).
A_SERVER_EVENT = SpeechStarted(turn_id="turn_1", audio_start_ms=0.0)

KEY_ID = hashlib.sha256(API_KEY.encode()).hexdigest()[:16]
PERSONA = {"voice_id": "jf_alpha", "system_prompt": "Echo what you hear."}


class EchoConversation:
    """Plays the audio heard so far back as a reply turn when the client asks.

    Client ``tool.result`` events script it: output ``reply`` answers with the
    audio received since the last reply, ``end`` ends the session (``max_turns``),
    ``end_on_close`` ends it as the socket closes (a last reply that finishes then).
    """

    def __init__(self, record: SessionRecord, params: SessionParams, emit: Emit) -> None:
        self.record, self.params, self.emit = record, params, emit
        self.turns = 0
        self.heard: list[np.ndarray] = []
        self.events: list[ClientEvent] = []
        self.closed = False
        self.end_on_close = False

    async def on_audio(self, samples: np.ndarray) -> None:
        self.heard.append(samples)

    async def on_event(self, event: ClientEvent) -> None:
        self.events.append(event)
        if isinstance(event, ToolResult) and event.output == "reply":
            self.turns += 2
            turn_id = f"turn_{self.turns}"
            await self.emit(ResponseStarted(turn_id=turn_id, reply_to=f"turn_{self.turns - 1}"))
            await self.emit(AssistantAudio(turn_id, np.concatenate(self.heard)))
            await self.emit(ResponseDone(turn_id=turn_id, status="completed", text="echo"))
            self.heard = []
        if isinstance(event, ToolResult) and event.output == "end":
            await self.emit(SessionEnded(turn_id=None, reason="max_turns"))
        if isinstance(event, ToolResult) and event.output == "end_on_close":
            self.end_on_close = True

    async def close(self) -> None:
        self.closed = True
        if self.end_on_close:
            await self.emit(SessionEnded(turn_id=None, reason="max_turns"))


class Factory:
    def __init__(self) -> None:
        self.made: list[EchoConversation] = []
        self.kind = EchoConversation

    async def __call__(self, record: SessionRecord, params: SessionParams,
                       emit: Emit) -> EchoConversation:
        conversation = self.kind(record, params, emit)
        self.made.append(conversation)
        return conversation


@pytest.fixture(scope="module")
def factory() -> Factory:
    return Factory()


def app_client(triton_url: str, factory: ConversationFactory,
               **settings: Any) -> TestClient:
    return TestClient(create_app(make_settings(triton_url=triton_url, **settings), factory))


@pytest.fixture(scope="module")
def api(triton_url: str, factory: Factory) -> Iterator[TestClient]:
    with app_client(triton_url, factory, session_check_s=0.2) as client:
        yield client


def new_session(api: TestClient) -> str:
    response = api.post("/v1/conversations/create", json=PERSONA, headers=AUTH)
    assert response.status_code == 201, response.text
    return str(response.json()["session_id"])


def path(session_id: str, **query: Any) -> str:
    text = "&".join(f"{k}={v}" for k, v in query.items())
    return f"/v1/conversations/{session_id}/stream" + (f"?{text}" if text else "")


def closed_with(api: TestClient, url: str, **kwargs: Any) -> int:
    with pytest.raises(WebSocketDisconnect) as closed, api.websocket_connect(url, **kwargs) as ws:
        while True:
            ws.receive_json()
    return closed.value.code


def speech(sample_rate: int, seconds: float = 0.3) -> np.ndarray:
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    return (0.3 * np.sin(2 * np.pi * 220 * t) * np.hanning(t.size)).astype(np.float32)


REPLY = '{"type": "tool.result", "call_id": "c1", "output": "reply"}'


def read_reply(ws: Any) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Asks for the echo; its events and binary messages up to and including response.done."""
    ws.send_text(REPLY)
    events: list[dict[str, Any]] = []
    audio: list[bytes] = []
    while True:
        event = ws.receive_json()
        events.append(event)
        if event["type"] == "response.audio":
            audio += [ws.receive_bytes() for _ in range(event["messages"])]
        if event["type"] == "response.done":
            return events, audio


def test_start_echo_and_sequence_numbers(api: TestClient, factory: Factory) -> None:
    session_id = new_session(api)
    signal = speech(16000)
    with api.websocket_connect(path(session_id), headers=AUTH) as ws:
        started = ws.receive_json()
        assert started == {"type": "session.started", "turn_id": None, "seq": started["seq"],
                           "session_id": session_id, "sample_rate": 16000,
                           "encoding": "pcm16", "vad_threshold": 0.5}
        ws.send_bytes(Encoder("pcm16", 16000).encode(signal)[0])
        events, audio = read_reply(ws)
    assert [e["type"] for e in events] == ["response.started", "response.audio", "response.done"]
    assert all(e["turn_id"] == "turn_2" for e in events)
    seqs = [started["seq"]] + [e["seq"] for e in events]
    assert seqs == sorted(set(seqs))
    assert events[1]["samples"] == signal.size and events[1]["duration_ms"] == 300.0
    np.testing.assert_allclose(Decoder("pcm16", 16000).decode(audio[0]), signal, atol=1 / 32768)
    assert factory.made[-1].closed and factory.made[-1].record.id == session_id


@pytest.mark.parametrize(("encoding", "sample_rate"),
                         [("mulaw", 8000), ("opus", 48000), ("opus", 16000), ("pcm16", 24000)])
def test_reply_audio_comes_back_in_the_sockets_encoding(api: TestClient, encoding: str,
                                                        sample_rate: int) -> None:
    session_id = new_session(api)
    signal = np.concatenate([speech(sample_rate), np.zeros(sample_rate // 10, np.float32)])
    encoder = Encoder(encoding, sample_rate)
    messages = encoder.encode(signal) + encoder.flush()
    url = path(session_id, sample_rate=sample_rate, encoding=encoding, vad_threshold=0.8)
    with api.websocket_connect(url, headers=AUTH) as ws:
        assert ws.receive_json()["encoding"] == encoding
        for message in messages:
            ws.send_bytes(message)
        events, reply = read_reply(ws)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "response.started" and kinds[-1] == "response.done"
    assert set(kinds[1:-1]) == {"response.audio"}  # Opus: the held-back end comes with done
    assert sum(e["messages"] for e in events[1:-1]) == len(reply)
    offsets = [e["offset_ms"] for e in events[1:-1]]
    assert offsets == sorted(offsets) and offsets[0] == 0.0
    decoder = Decoder(encoding, sample_rate)
    heard = np.concatenate([decoder.decode(m) for m in reply])
    reference = speech(sample_rate)
    lag = int(np.argmax(np.correlate(heard, reference, "valid")))
    assert np.corrcoef(reference, heard[lag : lag + reference.size])[0, 1] > 0.95


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ({"sample_rate": 44100}, CloseCode.BAD_SAMPLE_RATE),
        ({"sample_rate": "abc"}, CloseCode.BAD_SAMPLE_RATE),
        ({"sample_rate": "\u00b2"}, CloseCode.BAD_SAMPLE_RATE),  # a digit to isdigit(), not int()
        ({"sample_rate": "9" * 5000}, CloseCode.BAD_SAMPLE_RATE),  # past int()'s digit limit
        ({"encoding": "flac"}, CloseCode.BAD_ENCODING),
        ({"vad_threshold": 1.5}, CloseCode.BAD_VAD_THRESHOLD),
        ({"vad_threshold": "nan"}, CloseCode.BAD_VAD_THRESHOLD),
    ],
)
def test_bad_parameters_close_with_their_codes(api: TestClient, query: dict[str, Any],
                                               code: CloseCode) -> None:
    assert closed_with(api, path(new_session(api), **query), headers=AUTH) == code


def test_auth_by_header_or_subprotocol(api: TestClient, caplog: pytest.LogCaptureFixture,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    session_id = new_session(api)
    assert closed_with(api, path(session_id)) == CloseCode.UNAUTHORIZED
    assert closed_with(api, path(session_id), headers={"Authorization": "Bearer nope"}) == (
        CloseCode.UNAUTHORIZED)
    with api.websocket_connect(path(session_id),
                               subprotocols=["converse.v1", f"key.{API_KEY}"]) as ws:
        assert ws.accepted_subprotocol == "converse.v1"
        assert ws.receive_json()["type"] == "session.started"
    logged = caplog.text + "".join(capsys.readouterr())
    assert API_KEY not in logged


def test_keys_that_cannot_be_checked_close_with_4503(
    api: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API keys secret unreadable (Secrets Manager throttled): retry later, not a 4500."""
    session_id = new_session(api)
    settings = api.app.state.settings  # type: ignore[attr-defined]

    async def unreadable(self: Settings) -> frozenset[str]:
        raise ServiceUnavailable("API keys cannot be checked right now; retry later")

    monkeypatch.setattr(Settings, "load_key_digests", unreadable)
    with pytest.raises(WebSocketDisconnect) as closed, api.websocket_connect(
        path(session_id), headers=AUTH
    ) as ws:
        ws.receive_json()
    assert closed.value.code == CloseCode.SERVICE_BUSY
    assert f"retry in {settings.retry_after_s} s" in closed.value.reason


def test_a_key_out_of_rate_limit_tokens_is_closed_with_4429(triton_url: str,
                                                            factory: Factory) -> None:
    # Two tokens, refilled once a day: the create call takes one, the first socket the other.
    with app_client(triton_url, factory, rate_limit_capacity=2,
                    rate_limit_per_minute=1 / 1440) as api:
        session_id = new_session(api)
        with api.websocket_connect(path(session_id), headers=AUTH) as ws:
            assert ws.receive_json()["type"] == "session.started"
        assert closed_with(api, path(session_id), headers=AUTH) == CloseCode.RATE_LIMITED


def test_unknown_and_ended_sessions(api: TestClient) -> None:
    assert closed_with(api, path("conv_missing"), headers=AUTH) == CloseCode.SESSION_NOT_FOUND
    session_id = new_session(api)
    api.delete(f"/v1/conversations/{session_id}", headers=AUTH)
    assert closed_with(api, path(session_id), headers=AUTH) == CloseCode.SESSION_ENDED


def test_reconnect_resumes_and_replaces_the_older_socket(api: TestClient) -> None:
    session_id = new_session(api)
    storage = api.app.state.storage  # type: ignore[attr-defined]
    with api.websocket_connect(path(session_id), headers=AUTH) as first:
        opened = first.receive_json()
        first.send_bytes(Encoder("pcm16", 16000).encode(speech(16000))[0])
        last_seq = read_reply(first)[0][-1]["seq"]
        storage.put_turn(KEY_ID, session_id, TurnRecord("turn_2", "assistant", "echo", 1.0))
        with api.websocket_connect(path(session_id), headers=AUTH) as second:
            resumed = second.receive_json()
            with pytest.raises(WebSocketDisconnect) as replaced:
                first.receive_json()
            assert replaced.value.code == CloseCode.REPLACED
    assert opened["type"] == "session.started"
    assert resumed["type"] == "session.resumed" and resumed["turn_id"] == "turn_2"
    assert resumed["seq"] > last_seq
    assert api.get(f"/v1/conversations/{session_id}", headers=AUTH).json()["status"] == "active"


def test_delete_closes_the_live_socket(triton_url: str, factory: Factory) -> None:
    # No periodic recheck during the test: only the DELETE itself can close the socket.
    with app_client(triton_url, factory, session_check_s=3600.0) as api:
        session_id = new_session(api)
        with api.websocket_connect(path(session_id), headers=AUTH) as ws:
            ws.receive_json()
            assert api.delete(f"/v1/conversations/{session_id}", headers=AUTH).status_code == 200
            ended = ws.receive_json()
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
        body = api.get(f"/v1/conversations/{session_id}", headers=AUTH).json()
    assert (ended["type"], ended["reason"]) == ("session.ended", "deleted")
    assert closed.value.code == CloseCode.DELETED
    assert (body["status"], body["ended_reason"]) == ("ended", "deleted")


def test_sockets_past_the_live_session_limit_are_refused_and_reconnects_are_not(
    triton_url: str, factory: Factory,
) -> None:
    with app_client(triton_url, factory, session_max_live=2, retry_after_s=7) as api:
        first, second, third = (new_session(api) for _ in range(3))
        with api.websocket_connect(path(first), headers=AUTH) as one, \
                api.websocket_connect(path(second), headers=AUTH) as two:
            assert one.receive_json()["type"] == two.receive_json()["type"] == "session.started"
            with pytest.raises(WebSocketDisconnect) as refused, \
                    api.websocket_connect(path(third), headers=AUTH) as three:
                three.receive_json()
            # A reconnect to a session served here replaces its socket, limit or not.
            with api.websocket_connect(path(second), headers=AUTH) as again:
                assert again.receive_json()["type"] == "session.resumed"
            hub = api.app.state.session_hub  # type: ignore[attr-defined]
            assert set(hub.live) == {first} and hub.reserved == {}
        # With the older sockets gone, the refused session connects; it stayed active.
        assert api.get(f"/v1/conversations/{third}", headers=AUTH).json()["status"] == "active"
        with api.websocket_connect(path(third), headers=AUTH) as three:
            assert three.receive_json()["type"] == "session.started"
    assert refused.value.code == CloseCode.SERVICE_BUSY
    assert "retry in 7 s" in refused.value.reason


def test_the_hub_holds_only_the_sessions_whose_sockets_are_being_attached() -> None:
    """Reserved places are given back whole: no entry is left per session ever served."""
    hub = transport.SessionHub()
    for index in range(1000):
        assert hub.reserve(f"conv_{index}", limit=4)
        hub.release(f"conv_{index}")
    assert hub.reserved == {}
    # Two sockets of one session reserving at once take one place of the limit.
    assert hub.reserve("conv_a", 2) and hub.reserve("conv_a", 2) and hub.reserve("conv_b", 2)
    assert not hub.reserve("conv_c", 2)
    hub.release("conv_a")
    assert hub.reserved == {"conv_a": 1, "conv_b": 1}
    hub.release("conv_a")
    hub.release("conv_b")
    assert hub.reserved == {}


def test_audio_budget_lets_real_time_and_catching_up_through_and_nothing_faster() -> None:
    """The leaky bucket over a clock the test moves: seconds of audio against wall seconds."""
    now = [0.0]
    budget = transport.AudioBudget(rate=2.0, slack_s=10.0, clock=lambda: now[0])
    for _ in range(180_000):  # an hour of 20 ms messages in real time
        now[0] += 0.02
        assert budget.take(0.02)
    for _ in range(500):  # ten seconds at twice real time
        now[0] += 0.01
        assert budget.take(0.02)
    now[0] += 10.0  # a network stall of ten seconds, then its audio at once
    assert budget.take(10.0)
    assert not budget.take(0.02)  # the slack is spent; a refused message is not counted
    now[0] += 1.0  # a second drains two seconds of audio
    assert budget.take(2.0) and not budget.take(0.02)
    now[0] += 3600.0  # an hour of silence gives no credit beyond the slack
    assert budget.take(10.0) and not budget.take(0.02)
    now[0] += 100.0  # 2.1 times real time is refused within 10 / 0.1 = 100 s of audio
    taken = 0.0
    while budget.take(0.021):
        now[0] += 0.01
        taken += 0.021
    assert taken == pytest.approx(10.0 / 0.1 * 2.1, rel=0.01)


def test_audio_sent_faster_than_real_time_closes_the_socket_with_4429(
    triton_url: str, factory: Factory,
) -> None:
    """One 256 KiB pcm16 message is 8.2 s of audio; a second at once is past the slack."""
    message = bytes(262_144)
    with app_client(triton_url, factory) as api:
        session_id = new_session(api)
        started = time.monotonic()
        with api.websocket_connect(path(session_id), headers=AUTH) as ws:
            ws.receive_json()
            for _ in range(4):
                ws.send_bytes(message)
            error = ws.receive_json()
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
        elapsed = time.monotonic() - started
        body = api.get(f"/v1/conversations/{session_id}", headers=AUTH).json()
    heard_s = sum(len(chunk) for chunk in factory.made[-1].heard) / 16_000
    assert (error["type"], error["code"], error["fatal"]) == ("error", "rate_limited", True)
    assert closed.value.code == CloseCode.RATE_LIMITED
    assert heard_s <= transport.AUDIO_SLACK_S + transport.AUDIO_RATE * elapsed
    assert body["status"] == "active"


def test_a_socket_claimed_elsewhere_closes_as_replaced(api: TestClient) -> None:
    """Another process took the session: the older socket sees it on its next check."""
    session_id = new_session(api)
    storage = api.app.state.storage  # type: ignore[attr-defined]
    with api.websocket_connect(path(session_id), headers=AUTH) as ws:
        ws.receive_json()
        assert storage.claim_session(KEY_ID, session_id, "socket-in-another-process")
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == CloseCode.REPLACED


def test_session_ended_elsewhere_closes_the_socket(api: TestClient) -> None:
    """Another process (the Lambda) ended it: the socket sees it on its next check."""
    session_id = new_session(api)
    storage = api.app.state.storage  # type: ignore[attr-defined]
    with api.websocket_connect(path(session_id), headers=AUTH) as ws:
        ws.receive_json()
        storage.end_session(KEY_ID, session_id, "deleted")
        assert ws.receive_json()["reason"] == "deleted"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == CloseCode.DELETED


def test_bad_client_messages_get_error_events_and_the_socket_stays(api: TestClient,
                                                                   factory: Factory) -> None:
    session_id = new_session(api)
    with api.websocket_connect(path(session_id), headers=AUTH) as ws:
        ws.receive_json()
        ws.send_text("not json")
        ws.send_text('{"type": "tool.result", "call_id": "c1"}')
        ws.send_bytes(b"\x01\x02\x03")
        errors = [ws.receive_json() for _ in range(3)]
        ws.send_text('{"type": "playback.position", "turn_id": "turn_2", "played_ms": 120}')
        ws.send_text('{"type": "response.cancel"}')
        ws.send_bytes(Encoder("pcm16", 16000).encode(speech(16000))[0])
        assert read_reply(ws)[0][-1]["status"] == "completed"
    assert [(e["type"], e["code"], e["fatal"]) for e in errors] == [
        ("error", "invalid_event", False), ("error", "invalid_event", False),
        ("error", "invalid_audio", False)]
    assert "output" in errors[1]["message"]
    assert [type(e) for e in factory.made[-1].events] == [
        PlaybackPosition, ResponseCancel, ToolResult]


def test_oversized_message_closes(triton_url: str, factory: Factory) -> None:
    with app_client(triton_url, factory, session_max_message_bytes=1024) as api:
        session_id = new_session(api)
        with api.websocket_connect(path(session_id), headers=AUTH) as ws:
            ws.receive_json()
            ws.send_bytes(bytes(2048))
            error = ws.receive_json()
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
        assert (error["code"], error["fatal"]) == ("message_too_big", True)
        assert closed.value.code == CloseCode.MESSAGE_TOO_BIG
        body = api.get(f"/v1/conversations/{session_id}", headers=AUTH).json()
        assert body["status"] == "active"


def test_idle_socket_ends_the_session(triton_url: str, factory: Factory) -> None:
    with app_client(triton_url, factory, session_idle_timeout_s=0.3) as api:
        session_id = new_session(api)
        with api.websocket_connect(path(session_id), headers=AUTH) as ws:
            ws.receive_json()
            ended = ws.receive_json()
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
        assert ended["reason"] == "idle_timeout" and closed.value.code == CloseCode.IDLE_TIMEOUT
        body = api.get(f"/v1/conversations/{session_id}", headers=AUTH).json()
        assert (body["status"], body["ended_reason"]) == ("ended", "idle_timeout")


def test_maximum_session_length_ends_the_session(triton_url: str, factory: Factory) -> None:
    with app_client(triton_url, factory, session_max_duration_s=2.0) as api:
        session_id = new_session(api)
        with api.websocket_connect(path(session_id), headers=AUTH) as ws:
            assert ws.receive_json()["type"] == "session.started"
            ended = ws.receive_json()
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
    assert ended["reason"] == "max_duration" and closed.value.code == CloseCode.MAX_DURATION


class UnreadingClient:
    """The API (``send_timeout_s``) behind an ASGI wrapper: its socket messages wait, as
    uvicorn's do behind a full send buffer, while the client reads nothing (from
    ``stall()`` for ``for_s`` seconds).

    When the app's socket task ends without a close frame, the client sees the
    connection drop (1006), as uvicorn closes it then. ``waiting`` counts the
    messages the app tried to write while the client was not reading.
    """

    def __init__(self, triton_url: str, factory: ConversationFactory,
                 send_timeout_s: float) -> None:
        self.app = create_app(
            make_settings(triton_url=triton_url, session_send_timeout_s=send_timeout_s), factory)
        self.stalled_until = 0.0
        self.waiting = 0

    def stall(self, for_s: float) -> None:
        self.stalled_until = time.monotonic() + for_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        closed = False

        async def unread_send(message: dict[str, Any]) -> None:
            nonlocal closed
            if scope["type"] == "websocket" and time.monotonic() < self.stalled_until:
                self.waiting += 1
                while time.monotonic() < self.stalled_until:
                    await asyncio.sleep(0.01)
            closed = closed or message["type"] == "websocket.close"
            await send(message)

        await self.app(scope, receive, unread_send)
        if scope["type"] == "websocket" and not closed:
            await send({"type": "websocket.close", "code": 1006})


def ask_then_stop_reading(ws: Any, client: UnreadingClient, for_s: float) -> None:
    """After the socket's first event, speak, then ask for the echo and read nothing."""
    ws.receive_json()
    ws.send_bytes(Encoder("pcm16", 16000).encode(speech(16000))[0])
    client.stall(for_s)
    ws.send_text(REPLY)


def test_a_client_that_stops_reading_is_dropped_and_its_session_stays(
    triton_url: str, factory: Factory
) -> None:
    """The reply's first message waits past the send timeout: the socket is dropped at
    once (before the client would read again), nothing more is tried, and the session
    can be resumed."""
    client = UnreadingClient(triton_url, factory, send_timeout_s=0.3)
    with TestClient(client) as api:
        session_id = new_session(api)
        with api.websocket_connect(path(session_id), headers=AUTH) as ws:
            ask_then_stop_reading(ws, client, for_s=5.0)
            with pytest.raises(WebSocketDisconnect) as dropped:
                ws.receive_json()
        assert dropped.value.code == 1006
        assert time.monotonic() < client.stalled_until  # dropped, not read again
        assert client.waiting == 1  # response.started; no audio or close frame after it
        assert factory.made[-1].closed
        assert api.get(f"/v1/conversations/{session_id}", headers=AUTH).json()["status"] == (
            "active")
        client.stall(for_s=0.0)
        with api.websocket_connect(path(session_id), headers=AUTH) as ws:
            assert ws.receive_json()["type"] == "session.resumed"


class RepliesInItsOwnTask(EchoConversation):
    """Sends its reply from a task of its own; ``close()`` waits for that send to end (as
    the runner waits for the audio message being written, never cutting one)."""

    def __init__(self, record: SessionRecord, params: SessionParams, emit: Emit) -> None:
        super().__init__(record, params, emit)
        self.replying: asyncio.Task[None] | None = None

    async def on_event(self, event: ClientEvent) -> None:
        self.replying = asyncio.create_task(super().on_event(event))

    async def close(self) -> None:
        if self.replying is not None:
            await asyncio.wait({self.replying})
        await super().close()


def test_a_message_waiting_on_a_client_that_is_behind_is_given_up_when_the_socket_stops(
    triton_url: str,
) -> None:
    """DELETE while the reply's first message waits: the conversation stops at once, not
    after the send timeout; the session ends as deleted."""
    factory = Factory()
    factory.kind = RepliesInItsOwnTask
    client = UnreadingClient(triton_url, factory, send_timeout_s=4.0)
    with TestClient(client) as api:
        session_id = new_session(api)
        with api.websocket_connect(path(session_id), headers=AUTH) as ws:
            ask_then_stop_reading(ws, client, for_s=6.0)
            while client.waiting == 0:  # response.started is waiting
                time.sleep(0.01)
            conversation = factory.made[-1]
            assert api.delete(f"/v1/conversations/{session_id}", headers=AUTH).status_code == 200
            deadline = time.monotonic() + 2.0  # the send timeout is 4 s
            while not conversation.closed:
                assert time.monotonic() < deadline, "the conversation waited on the send"
                time.sleep(0.01)
            with pytest.raises(WebSocketDisconnect) as dropped:
                while True:
                    ws.receive_json()
        # Its session.ended also waited past the send timeout: no close frame was tried.
        assert dropped.value.code == 1006 and time.monotonic() < client.stalled_until
        body = api.get(f"/v1/conversations/{session_id}", headers=AUTH).json()
        assert (body["status"], body["ended_reason"]) == ("ended", "deleted")


def test_on_uvicorn_a_client_that_stops_reading_is_dropped(
    triton_url: str, factory: Factory
) -> None:
    """Real backpressure: a raw-socket client (4 KiB receive buffer) asks for the echo of
    two minutes of 48 kHz audio (11 MB, more than loopback's buffers hold) and reads
    nothing; uvicorn's send waits on the full buffer, and the socket is dropped once the
    send timeout passes. The session stays active."""
    app = create_app(make_settings(triton_url=triton_url, session_send_timeout_s=0.5), factory)
    with ApiServer(app) as server:
        http = httpx.Client(base_url=server.base_url, headers=AUTH)
        session_id = http.post("/v1/conversations/create", json=PERSONA).json()["session_id"]
        url = server.base_url.replace("http", "ws") + path(session_id, sample_rate=48000)
        client = ClientProtocol(parse_uri(url), max_size=None)
        made = len(factory.made)
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            request = client.connect()
            request.headers["Authorization"] = AUTH["Authorization"]
            client.send_request(request)
            sock.sendall(b"".join(client.data_to_send()))
            while not client.events_received():  # the handshake's response
                client.receive_data(sock.recv(65536))
            second = Encoder("pcm16", 48000).encode(np.zeros(48000, np.float32))[0]
            for _ in range(120):
                client.send_binary(second)
                sock.sendall(b"".join(client.data_to_send()))
            client.send_text(REPLY.encode())
            sock.sendall(b"".join(client.data_to_send()))
            deadline = time.monotonic() + 30
            while not (len(factory.made) > made and factory.made[made].closed):
                assert time.monotonic() < deadline, "the socket was not dropped"
                time.sleep(0.05)
        assert http.get(f"/v1/conversations/{session_id}").json()["status"] == "active"


def ended_by_the_conversation(api: TestClient, session_id: str) -> tuple[dict[str, Any], int]:
    """Ask the conversation to end the session; its ``session.ended`` and the close code."""
    with api.websocket_connect(path(session_id), headers=AUTH) as ws:
        ws.receive_json()
        ws.send_text('{"type": "tool.result", "call_id": "c1", "output": "end"}')
        ended = ws.receive_json()
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    return ended, closed.value.code


def test_the_conversation_can_end_the_session(api: TestClient) -> None:
    session_id = new_session(api)
    ended, code = ended_by_the_conversation(api, session_id)
    assert ended["reason"] == "max_turns" and code == CloseCode.MAX_TURNS
    assert api.get(f"/v1/conversations/{session_id}", headers=AUTH).json()["ended_reason"] == (
        "max_turns")


def test_a_session_ended_while_its_socket_closes_stays_ended(api: TestClient,
                                                           factory: Factory) -> None:
    session_id = new_session(api)
    with api.websocket_connect(path(session_id), headers=AUTH) as ws:
        ws.receive_json()
        ws.send_text('{"type": "tool.result", "call_id": "c1", "output": "end_on_close"}')
        ws.send_bytes(bytes(640))
        read_reply(ws)  # the messages before it have been taken in
    assert factory.made[-1].closed
    stored = api.get(f"/v1/conversations/{session_id}", headers=AUTH).json()
    assert (stored["status"], stored["ended_reason"]) == ("ended", "max_turns")
    assert closed_with(api, path(session_id), headers=AUTH) == CloseCode.SESSION_ENDED


class BrokenConversation(EchoConversation):
    async def on_audio(self, samples: np.ndarray) -> None:
        raise RuntimeError("the runner failed")


async def broken_factory(record: SessionRecord, params: SessionParams,
                         emit: Emit) -> BrokenConversation:
    return BrokenConversation(record, params, emit)


def test_a_failing_conversation_closes_with_a_fatal_error(triton_url: str) -> None:
    with app_client(triton_url, broken_factory) as api:
        session_id = new_session(api)
        with api.websocket_connect(path(session_id), headers=AUTH) as ws:
            ws.receive_json()
            ws.send_bytes(bytes(640))
            error = ws.receive_json()
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
        assert (error["type"], error["code"], error["fatal"]) == ("error", "internal_error", True)
        assert closed.value.code == CloseCode.INTERNAL_ERROR
        assert api.get(f"/v1/conversations/{session_id}", headers=AUTH).json()["status"] == (
            "active")


class SlowConversation(EchoConversation):
    async def on_audio(self, samples: np.ndarray) -> None:
        await asyncio.sleep(0.2)


async def slow_factory(record: SessionRecord, params: SessionParams,
                       emit: Emit) -> SlowConversation:
    return SlowConversation(record, params, emit)


def test_leaving_while_the_conversation_is_busy_closes_cleanly(triton_url: str) -> None:
    """The test client cancels the app as soon as it leaves: cleanup must absorb that."""
    with app_client(triton_url, slow_factory) as api:
        for _ in range(3):
            with api.websocket_connect(path(new_session(api)), headers=AUTH) as ws:
                ws.receive_json()
                ws.send_bytes(bytes(640))


class StuckConversation(EchoConversation):
    """Its ``close`` returns only when cancelled (work slow to stop)."""

    async def close(self) -> None:
        await asyncio.sleep(3600)


async def stuck_factory(record: SessionRecord, params: SessionParams,
                        emit: Emit) -> StuckConversation:
    return StuckConversation(record, params, emit)


def test_a_conversation_stuck_stopping_still_ends_the_session_and_closes_the_socket(
    triton_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transport, "CLEANUP_S", 2.0)
    with app_client(triton_url, stuck_factory) as api:
        session_id = new_session(api)
        ended, code = ended_by_the_conversation(api, session_id)
        stored = api.get(f"/v1/conversations/{session_id}", headers=AUTH).json()
    assert ended["reason"] == "max_turns" and code == CloseCode.MAX_TURNS
    assert (stored["status"], stored["ended_reason"]) == ("ended", "max_turns")


AUDIO_MESSAGE = {"type": "websocket.receive", "bytes": np.zeros(320, "<i2").tobytes()}


class StreamingClient:
    """A client socket whose next audio message is always ready after ``lag`` (≥ 1) loop passes.

    As a client streaming its microphone looks to a server that is behind: the
    next message is already waiting. It records what was sent and the close code;
    once ``gone`` it has disconnected.
    """

    def __init__(self, lag: int) -> None:
        self.lag = lag
        self.sent: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.gone = False

    async def receive(self) -> dict[str, Any]:
        for _ in range(self.lag):
            await asyncio.sleep(0)
        return {"type": "websocket.disconnect"} if self.gone else AUDIO_MESSAGE

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))

    async def send_bytes(self, data: bytes) -> None:
        pass

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.close_code = code


class QuietClient(StreamingClient):
    """A client socket that sends nothing."""

    async def receive(self) -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


class EndsAfterThreeMessages:
    """Ends the session (``max_turns``) on its third audio message; counts what it gets."""

    def __init__(self, emit: Emit) -> None:
        self.emit = emit
        self.messages = 0

    async def on_audio(self, samples: np.ndarray) -> None:
        self.messages += 1
        if self.messages == 3:
            await self.emit(SessionEnded(turn_id=None, reason="max_turns"))

    async def on_event(self, event: ClientEvent) -> None:
        pass

    async def close(self) -> None:
        pass


def live_socket(client: StreamingClient, storage: SQLiteStorage, session_id: str,
                **settings: Any) -> transport.LiveSocket:
    record = SessionRecord(id=session_id, key_id=KEY_ID, model="kokoro", voice="jf_alpha*1",
                           created_at=storage.clock(), config=dict(PERSONA))
    storage.put_session(record)
    return transport.LiveSocket(client, record, SessionParams(),  # type: ignore[arg-type]
                                storage, make_settings(**settings))


@pytest.mark.parametrize("lag", [1, 2, 5])
def test_a_session_that_ends_while_the_client_streams_closes_its_socket(
    tmp_path: Path, lag: int,
) -> None:
    """The socket's reader must not lose its cancel to a message that is already there.

    On Python 3.11 ``asyncio.wait_for`` returns such a message and drops the
    cancel: with audio always waiting the reader never stopped, and the socket
    stayed open with the session's end unsent.
    """
    storage = SQLiteStorage(tmp_path / "sessions.db")
    client = StreamingClient(lag)
    socket = live_socket(client, storage, "conv_streaming", session_check_s=3600)
    conversations: list[EndsAfterThreeMessages] = []

    async def factory(record: SessionRecord, params: SessionParams,
                      emit: Emit) -> EndsAfterThreeMessages:
        conversations.append(EndsAfterThreeMessages(emit))
        return conversations[0]

    async def run() -> bool:
        serving = asyncio.create_task(socket.run(factory, transport.SessionHub()))
        finished, _ = await asyncio.wait({serving}, timeout=5)
        client.gone = True  # what ended such a socket: the client leaving
        await asyncio.wait({serving})
        return bool(finished)

    assert asyncio.run(run())
    assert conversations[0].messages == 3  # nothing was read after the end
    assert client.close_code == CloseCode.MAX_TURNS
    assert client.sent[-1]["type"] == "session.ended"
    stored = storage.get_session(KEY_ID, "conv_streaming")
    assert stored is not None and stored.ended_reason == "max_turns"


def test_a_failing_session_check_closes_with_an_internal_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def unreadable(*args: Any) -> None:
        raise RuntimeError("the table is unreachable")

    monkeypatch.setattr(transport, "current", unreadable)
    storage = SQLiteStorage(tmp_path / "sessions.db")
    client = QuietClient(lag=1)
    socket = live_socket(client, storage, "conv_check", session_check_s=0.05)

    async def factory(record: SessionRecord, params: SessionParams,
                      emit: Emit) -> EndsAfterThreeMessages:
        return EndsAfterThreeMessages(emit)

    async def run() -> None:
        async with asyncio.timeout(10):
            await socket.run(factory, transport.SessionHub())

    asyncio.run(run())
    assert client.close_code == CloseCode.INTERNAL_ERROR
    assert client.sent[-1]["type"] == "error" and client.sent[-1]["fatal"] is True


def failing(storage: SQLiteStorage, method: str) -> None:
    """Make ``storage.<method>`` raise, as a storage outage does."""
    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"{method}: the table is unreachable")

    setattr(storage, method, unreachable)


async def three_messages(record: SessionRecord, params: SessionParams,
                         emit: Emit) -> EndsAfterThreeMessages:
    return EndsAfterThreeMessages(emit)


def run_socket(socket: transport.LiveSocket, hub: transport.SessionHub | None = None) -> None:
    async def run() -> None:
        async with asyncio.timeout(10):
            await socket.run(three_messages, hub or transport.SessionHub())

    asyncio.run(run())


def test_a_claim_that_cannot_be_stored_closes_with_an_internal_error(tmp_path: Path) -> None:
    storage = SQLiteStorage(tmp_path / "sessions.db")
    client = QuietClient(lag=1)
    socket = live_socket(client, storage, "conv_claim", session_check_s=3600)
    failing(storage, "claim_session")
    hub = transport.SessionHub()
    run_socket(socket, hub)  # returns: it does not raise
    assert client.close_code == CloseCode.INTERNAL_ERROR
    assert hub.live == {} and hub.reserved == {}


def test_an_end_that_cannot_be_stored_closes_with_an_internal_error(tmp_path: Path) -> None:
    storage = SQLiteStorage(tmp_path / "sessions.db")
    client = StreamingClient(lag=1)
    socket = live_socket(client, storage, "conv_end", session_check_s=3600)
    failing(storage, "end_session")
    run_socket(socket)
    assert client.close_code == CloseCode.INTERNAL_ERROR
    assert [m["type"] for m in client.sent] == ["session.started", "error"]
    assert client.sent[-1]["fatal"] is True


def test_the_close_code_is_the_stored_end_reasons(tmp_path: Path) -> None:
    """Deleted by another process (the Lambda) before this socket's idle timeout fired."""
    storage = SQLiteStorage(tmp_path / "sessions.db")
    client = QuietClient(lag=1)
    socket = live_socket(client, storage, "conv_deleted", session_check_s=3600,
                         session_idle_timeout_s=0.3)

    async def run() -> None:
        async with asyncio.timeout(10):
            serving = asyncio.create_task(socket.run(three_messages, transport.SessionHub()))
            while not client.sent:
                await asyncio.sleep(0.01)
            storage.end_session(KEY_ID, "conv_deleted", "deleted")
            await serving

    asyncio.run(run())
    assert client.sent[-1]["type"] == "session.ended" and client.sent[-1]["reason"] == "deleted"
    assert client.close_code == CloseCode.DELETED


class StoresOnClose(EndsAfterThreeMessages):
    """Stores a turn as it closes, after ``store_s`` (an interrupted reply being stored)."""

    def __init__(self, emit: Emit, storage: SQLiteStorage, store_s: float) -> None:
        super().__init__(emit)
        self.storage, self.store_s = storage, store_s

    async def close(self) -> None:
        await asyncio.sleep(self.store_s)
        self.storage.put_turn(KEY_ID, "conv_resumed", TurnRecord(
            turn_id="turn_2", role="assistant", text="One two", started_at=0.0, ended_at=1.0,
            interrupted=True, played_ms=800.0))


class LeavingClient(QuietClient):
    """A client socket that sends nothing, then disconnects when ``leave()`` is called."""

    def __init__(self) -> None:
        super().__init__(lag=1)
        self.left = asyncio.Event()

    def leave(self) -> None:
        self.left.set()

    async def receive(self) -> dict[str, Any]:
        await self.left.wait()
        return {"type": "websocket.disconnect"}


@pytest.mark.parametrize("older", ["replaced", "left"])
def test_a_newer_socket_reads_the_turns_once_the_older_one_stored_its_last(
    tmp_path: Path, older: str,
) -> None:
    """The older socket stops (a reconnect replaces it, or its client left just before)
    and stores the reply it cut off as its conversation closes."""
    storage = SQLiteStorage(tmp_path / "sessions.db")
    old_client, new_client = LeavingClient(), QuietClient(lag=1)
    old = live_socket(old_client, storage, "conv_resumed", session_check_s=3600)
    turns_seen: list[list[str]] = []
    closing: list[StoresOnClose] = []

    async def factory(record: SessionRecord, params: SessionParams, emit: Emit) -> StoresOnClose:
        turns_seen.append([t.turn_id for t in storage.list_turns(KEY_ID, "conv_resumed")])
        closing.append(StoresOnClose(emit, storage, store_s=0.3))
        return closing[-1]

    async def run() -> None:
        hub = transport.SessionHub()
        serving_old = asyncio.create_task(old.run(factory, hub))
        async with asyncio.timeout(10):
            while not turns_seen:
                await asyncio.sleep(0.01)
            if older == "left":
                old_client.leave()
                await asyncio.sleep(0.1)  # its conversation is storing the reply
            record = storage.get_session(KEY_ID, "conv_resumed")  # as the route reads it
            assert record is not None
            new = transport.LiveSocket(new_client, record, SessionParams(),  # type: ignore[arg-type]
                                       storage, make_settings(session_check_s=3600))
            serving_new = asyncio.create_task(new.run(factory, hub))
            await asyncio.wait({serving_old})
            while len(turns_seen) < 2:
                await asyncio.sleep(0.01)
        serving_new.cancel()
        await asyncio.wait({serving_new})

    asyncio.run(run())
    assert old_client.close_code == (CloseCode.REPLACED if older == "replaced" else None)
    assert turns_seen == [[], ["turn_2"]]
    assert new_client.sent[0]["type"] == "session.resumed"
    assert new_client.sent[0]["turn_id"] == "turn_2"


class EmitsSeventyOnAudio(EndsAfterThreeMessages):
    """On each audio message, emits 70 events (more than one block of sequence numbers)."""

    def __init__(self, emit: Emit) -> None:
        super().__init__(emit)
        self.raised: list[BaseException] = []

    async def on_audio(self, samples: np.ndarray) -> None:
        for _ in range(70):
            try:
                await self.emit(A_SERVER_EVENT)
            except Exception as error:  # the transport's emit must not raise
                self.raised.append(error)


def test_events_that_cannot_be_numbered_close_with_an_internal_error(tmp_path: Path) -> None:
    storage = SQLiteStorage(tmp_path / "sessions.db")
    client = StreamingClient(lag=1)
    socket = live_socket(client, storage, "conv_seq", session_check_s=3600)
    made: list[EmitsSeventyOnAudio] = []
    reserve = storage.reserve_seq

    def first_block_only(key_id: str, session_id: str, count: int) -> int:
        if any(m["type"] == "session.started" for m in client.sent):
            raise sqlite3.OperationalError("database is locked")
        return reserve(key_id, session_id, count)

    storage.reserve_seq = first_block_only  # type: ignore[method-assign]

    async def factory(record: SessionRecord, params: SessionParams,
                      emit: Emit) -> EmitsSeventyOnAudio:
        made.append(EmitsSeventyOnAudio(emit))
        return made[-1]

    async def run() -> None:
        async with asyncio.timeout(10):
            await socket.run(factory, transport.SessionHub())

    asyncio.run(run())
    assert made[0].raised == []
    assert client.close_code == CloseCode.INTERNAL_ERROR


def test_a_storage_failure_before_the_stream_starts_closes_with_an_internal_error(
    triton_url: str, factory: Factory
) -> None:
    with app_client(triton_url, factory) as api:
        session_id = new_session(api)
        storage = api.app.state.storage  # type: ignore[attr-defined]
        failing(storage, "get_session")
        assert closed_with(api, path(session_id), headers=AUTH) == CloseCode.INTERNAL_ERROR


def test_a_session_whose_last_reply_reached_max_turns_ends_when_it_reconnects(
    client: TestClient,
) -> None:
    """The service's own conversation factory: a reply stored without the session's end
    (the process stopped between) still ends the session at ``max_turns``."""
    created = client.post("/v1/conversations/create", json={**PERSONA, "max_turns": 1},
                          headers=AUTH)
    session_id = created.json()["session_id"]
    storage = client.app.state.storage  # type: ignore[attr-defined]
    assert storage.claim_session(KEY_ID, session_id, "the socket of the stopped process")
    storage.put_turn(KEY_ID, session_id, TurnRecord("turn_1", "user", "Hello?", 1.0))
    storage.put_turn(KEY_ID, session_id, TurnRecord("turn_2", "assistant", "Hi.", 2.0))
    with client.websocket_connect(path(session_id), headers=AUTH) as ws:
        assert ws.receive_json()["type"] == "session.resumed"
        ended = ws.receive_json()
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert (ended["type"], ended["reason"]) == ("session.ended", "max_turns")
    assert closed.value.code == CloseCode.MAX_TURNS
    body = client.get(f"/v1/conversations/{session_id}", headers=AUTH).json()
    assert (body["status"], body["ended_reason"]) == ("ended", "max_turns")
