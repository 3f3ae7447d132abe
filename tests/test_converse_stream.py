"""Streaming voice: the engine's chunk iterator and ``POST /v1/converse`` with ``stream: true``."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient
from sse_starlette.sse import AppStatus

from handler.app import create_app
from handler.engines.catalog import ModelCatalog
from handler.engines.kokoro import KokoroEngine
from handler.routes import converse as converse_routes
from handler.services.telemetry import RequestRecord
from tests.helpers import (
    AUTH,
    asgi_post,
    make_settings,
    post_then_disconnect,
    sse_events,
    streamed_pcm,
)
from tests.robust_fakes import FakeTriton, constant_voice, failing, fake_client, never

# Four sentences over MAX_PIECE_CHARS together: voiced in more than one piece.
LONG_TEXT = (
    "The harbour was quiet when the ferry finally came in, an hour behind the timetable. "
    "Nobody on the pier seemed to mind; the evening was warm and the gulls were loud. "
    "We carried the bags up the hill to the house with the blue shutters. "
    "Dinner was bread, tomatoes, cheese and a bottle of something local and cold."
)


def engine(pause_ms: int = 0, lookahead: int = 2) -> KokoroEngine:
    return KokoroEngine("kokoro", frozenset({"jf_alpha"}), 24_000, (0.5, 2.0),
                        ("jf_alpha*1",), pause_ms, lookahead)


def by_text(script: dict[str, Any]) -> Any:
    """A Kokoro behaviour that picks another behaviour by the piece's text."""
    async def voice(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        text = bytes(inputs["TEXT"].reshape(-1)[0]).decode()
        for needle, behaviour in script.items():
            if needle in text:
                return dict(await behaviour(inputs))
        return await constant_voice(inputs)
    return voice


async def no_audio(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {}  # Triton answered without the AUDIO output


def app_over(fake: FakeTriton, **overrides: Any) -> Any:
    """An app whose Triton is ``fake``, voicing each sentence in a call of its own."""
    settings = make_settings(sentence_pause_ms=50, **overrides)
    app = create_app(settings)
    app.state.triton = fake
    app.state.catalog = ModelCatalog(settings, fake)  # type: ignore[arg-type]
    return app


async def stream_reply(
    app: Any, text: str, send: Callable[[dict[str, Any]], Awaitable[None]],
    gone: Callable[[], Awaitable[Any]],
) -> RequestRecord:
    """Stream the reply to ``text`` (speaker "0") from ``app`` over ASGI; its log record.

    Every message the app sends is handed to ``send`` (a client that does not take
    it blocks there); after the body, the client disconnects once ``gone`` returns.
    """
    payload = json.dumps({"conversation": [{"speaker": "0", "text": text}],
                          "stream": True}).encode()
    scope = asgi_post("/v1/converse", payload)
    requests = [{"type": "http.request", "body": payload, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if requests:
            return requests.pop()
        await gone()
        return {"type": "http.disconnect"}

    await asyncio.wait_for(app(scope, receive, send), 10)
    record: RequestRecord = scope["state"]["record"]
    return record


async def never_gone() -> None:
    await asyncio.Event().wait()


def stops_reading_after_audio(
    sent: list[dict[str, Any]],
) -> Callable[[dict[str, Any]], Awaitable[None]]:
    """A client's ``send`` that takes messages into ``sent`` up to the first audio event.

    Every later message waits forever (its buffers are full), and the client never closes.
    """
    async def send(message: dict[str, Any]) -> None:
        if any(b"event: audio" in m.get("body", b"") for m in sent):
            await asyncio.Event().wait()
        sent.append(message)
    return send


def test_stream_chunks_concatenate_to_the_json_reply(client: TestClient) -> None:
    body = {"conversation": [{"speaker": "1", "text": LONG_TEXT}], "params": {"speed": 1.1}}
    whole = client.post("/v1/converse", json=body, headers=AUTH)
    assert whole.status_code == 200, whole.text
    streamed = client.post("/v1/converse", json={**body, "stream": True}, headers=AUTH)
    assert streamed.status_code == 200, streamed.text
    assert streamed.headers["content-type"].startswith("text/event-stream")
    stream = sse_events(streamed.text)
    names = [name for name, _ in stream]
    assert names[0] == "metadata" and names[-1] == "done"
    assert set(names[1:-1]) == {"audio"} and len(names) > 3  # more than one chunk
    assert [data["index"] for name, data in stream if name == "audio"] == list(
        range(len(names) - 2)
    )
    reply = whole.json()
    metadata, done = stream[0][1], stream[-1][1]
    assert metadata["format"] == "pcm_s16le"
    assert metadata["sample_rate"] == reply["reply"]["audio"]["sample_rate"]
    assert metadata["model"] == reply["model"] and metadata["speaker"] == "1"
    samples, rate = sf.read(io.BytesIO(base64.b64decode(reply["reply"]["audio"]["data_b64"])),
                            dtype="int16")
    assert rate == metadata["sample_rate"]
    assert streamed_pcm(stream) == samples.astype("<i2").tobytes()
    assert done["text"] == reply["reply"]["text"] == LONG_TEXT
    assert done["usage"] == reply["usage"]
    assert done["warnings"] == reply["warnings"]


def test_invalid_stream_request_is_a_plain_error(client: TestClient) -> None:
    body = {"conversation": [{"speaker": "7", "text": "Hi."}], "stream": True}
    response = client.post("/v1/converse", json=body, headers=AUTH)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request"


def test_failure_after_the_first_chunk_is_an_error_event() -> None:
    fake = FakeTriton()
    fake.behaviours["kokoro"] = by_text({"Second": failing("exploded")})
    text = "First sentence here. Second sentence fails. Third one."
    with fake_client(fake, sentence_pause_ms=50) as client:
        response = client.post("/v1/converse", headers=AUTH, json={
            "conversation": [{"speaker": "0", "text": text}], "stream": True})
        admission = client.app.state.admission  # type: ignore[attr-defined]
        assert (admission.active, admission.waiting) == (0, 0)
    stream = sse_events(response.text)
    assert [name for name, _ in stream] == ["metadata", "audio", "error"]
    error = stream[-1][1]["error"]
    assert error["type"] == "inference_error"
    assert error["request_id"] == response.headers["x-request-id"]
    assert "exploded" not in error["message"]  # Triton's words go to the log only


def test_an_unforeseen_failure_after_the_first_chunk_is_the_internal_error_event() -> None:
    """Not an ApiError (Triton answered without audio): the event the JSON reply's 500 has."""
    fake = FakeTriton()
    fake.behaviours["kokoro"] = by_text({"Second": no_audio})
    body = {"conversation": [{"speaker": "0", "text": "First sentence here. "
                              "Second sentence fails. Third one."}]}
    with fake_client(fake, sentence_pause_ms=50) as client:
        whole = client.post("/v1/converse", headers=AUTH, json=body)
        response = client.post("/v1/converse", headers=AUTH, json={**body, "stream": True})
        admission = client.app.state.admission  # type: ignore[attr-defined]
        assert (admission.active, admission.waiting) == (0, 0)
    assert whole.status_code == 500
    stream = sse_events(response.text)
    assert [name for name, _ in stream] == ["metadata", "audio", "error"]
    error = stream[-1][1]["error"]
    assert error["request_id"] == response.headers["x-request-id"]
    assert (error["type"], error["message"]) == (
        whole.json()["error"]["type"], whole.json()["error"]["message"])


def test_client_disconnect_cancels_the_voicing() -> None:
    """Disconnect after the first audio event: the stalled Triton call is cancelled."""
    fake = FakeTriton()
    fake.behaviours["kokoro"] = by_text({"Stall": never})
    app = app_over(fake)
    body = {"conversation": [{"speaker": "0", "text": "Hello. Stall here. Bye."}], "stream": True}

    async def after_first_audio(sent: list[dict[str, Any]]) -> None:
        while not any(b"event: audio" in message.get("body", b"") for message in sent):
            await asyncio.sleep(0.01)

    sent = asyncio.run(post_then_disconnect(app, "/v1/converse", body, after_first_audio, 30))
    assert sent[0]["status"] == 200
    streamed = b"".join(message.get("body", b"") for message in sent).decode()
    assert [name for name, _ in sse_events(streamed)] == ["metadata", "audio"]
    assert "kokoro" in fake.cancelled
    assert (app.state.admission.active, app.state.admission.waiting) == (0, 0)


def test_a_client_gone_as_the_headers_go_out_releases_the_slot_and_cancels_the_voicing() -> None:
    """The response is cancelled before its first event, so the events' cleanup never runs."""
    fake = FakeTriton()
    fake.behaviours["kokoro"] = by_text({"Stall": never})
    app = app_over(fake)
    starting = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            starting.set()
            await asyncio.Event().wait()  # the client has gone: the headers never leave

    async def run() -> tuple[str, bool, int, int]:
        record = await stream_reply(app, "Hello. Stall here. Bye.", send, starting.wait)
        admission = app.state.admission
        return record.error_code, "kokoro" in fake.cancelled, admission.active, admission.waiting

    # Checked before the loop closes: its shutdown would close the voicing anyway.
    assert asyncio.run(run()) == ("client_closed_request", True, 0, 0)


def test_a_stream_read_to_its_end_feeds_the_admission_estimate() -> None:
    app = app_over(FakeTriton())
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def run() -> RequestRecord:
        return await stream_reply(app, "Hello. Then more. Bye.", send, never_gone)

    record = asyncio.run(run())
    assert b"event: done" in b"".join(m.get("body", b"") for m in sent)
    assert record.error_code == ""
    assert app.state.admission.run_s is not None


def test_a_client_gone_while_an_event_is_sent_is_logged_as_client_closed_request() -> None:
    app = app_over(FakeTriton())
    sending_audio = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        if b"event: audio" in message.get("body", b""):
            sending_audio.set()
            await asyncio.Event().wait()  # the client has gone: the event never leaves

    async def run() -> tuple[str, int, int]:
        record = await stream_reply(app, "Hello. Then more. Bye.", send, sending_audio.wait)
        return record.error_code, app.state.admission.active, app.state.admission.waiting

    assert asyncio.run(run()) == ("client_closed_request", 0, 0)


def test_engine_streams_text_pieces_as_they_arrive_in_order() -> None:
    fake = FakeTriton()
    running, most = 0, 0

    async def voice(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.01)
        running -= 1
        n = len(bytes(inputs["TEXT"].reshape(-1)[0]))
        return {"AUDIO": np.full(n * 100, 0.5, np.float32)}

    fake.behaviours["kokoro"] = voice
    pieces = ["One.", "Two two.", "Three three three.", "Four four four four."]

    async def writer() -> AsyncIterator[str]:
        for piece in pieces:
            await asyncio.sleep(0)
            yield piece

    async def scenario() -> list[np.ndarray]:
        voiced = engine(lookahead=2).stream_texts(fake, writer(), "jf_alpha*1", 1.0)  # type: ignore[arg-type]
        return [chunk async for chunk in voiced]

    chunks = asyncio.run(scenario())
    assert [len(chunk) for chunk in chunks] == [len(p) * 100 for p in pieces]
    assert most == 2  # pieces overlap, never more than the lookahead


def test_engine_leaves_out_pieces_with_nothing_to_say() -> None:
    """Kokoro fails on "**", "-" or an emoji alone: such pieces get no call and no chunk."""
    fake = FakeTriton()
    voiced_texts: list[str] = []

    async def voice(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        voiced_texts.append(bytes(inputs["TEXT"].reshape(-1)[0]).decode())
        return await constant_voice(inputs)

    fake.behaviours["kokoro"] = voice
    pieces = ["Sure! **", "-", "Here it is. \N{SLIGHTLY SMILING FACE}", "**"]

    async def scenario() -> list[np.ndarray]:
        voiced = engine(pause_ms=50).stream_texts(fake, pieces, "jf_alpha*1", 1.0)  # type: ignore[arg-type]
        return [chunk async for chunk in voiced]

    chunks = asyncio.run(scenario())
    assert voiced_texts == ["Sure!", "Here it is."]
    assert len(chunks) == 2 and all(len(chunk) > 0 for chunk in chunks)


def test_closing_the_engine_stream_cancels_running_calls() -> None:
    fake = FakeTriton()
    fake.behaviours["kokoro"] = by_text({"Stall": never})

    async def scenario() -> None:
        voiced = engine(pause_ms=50).stream_texts(
            fake, ["Fine. Stall now. Stall again."], "jf_alpha*1", 1.0  # type: ignore[arg-type]
        )
        first = await anext(voiced)
        assert len(first) > 0
        waiting = asyncio.ensure_future(anext(voiced))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await voiced.aclose()

    asyncio.run(scenario())
    assert fake.cancelled == ["kokoro", "kokoro"]


def test_a_client_that_stops_reading_is_let_go_and_its_slot_released(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client takes the first audio event, then nothing more, and never closes."""
    monkeypatch.setattr(converse_routes, "STALLED_CLIENT_S", 0.3)
    app = app_over(FakeTriton())
    sent: list[dict[str, Any]] = []

    async def run() -> tuple[RequestRecord, int, int]:
        record = await stream_reply(
            app, "Hello. Then more. Bye.", stops_reading_after_audio(sent), never_gone
        )
        return record, app.state.admission.active, app.state.admission.waiting

    record, active, waiting = asyncio.run(run())
    assert (active, waiting) == (0, 0)
    # The time spent waiting on the client is not the service's: no estimate from it.
    assert app.state.admission.run_s is None
    assert sent[0]["status"] == 200
    assert record.error_code == "client_closed_request"
    assert "0.3 s" in record.error_detail  # a stall, told apart from a disconnect


@pytest.mark.parametrize("ping_s", [None, 0.2], ids=["event", "event-and-ping"])
def test_a_client_that_stops_reading_is_let_go_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch, ping_s: float | None,
) -> None:
    """The deadline comes before STALLED_CLIENT_S: the sends waiting on the client end there.

    Triton is still voicing a later piece when the client stops reading: it is cancelled.
    With frequent pings, a ping waits on the client too, and both sends end at once.
    """
    if ping_s is not None:
        monkeypatch.setattr(converse_routes, "PING_S", ping_s)
    fake = FakeTriton()
    fake.behaviours["kokoro"] = by_text({"Stall": never})
    app = app_over(fake, triton_timeout_s=2.0)
    sent: list[dict[str, Any]] = []

    async def run() -> tuple[RequestRecord, bool, int, int]:
        record = await stream_reply(
            app, "Hello. Then more. Stall here.", stops_reading_after_audio(sent), never_gone
        )
        admission = app.state.admission
        return record, "kokoro" in fake.cancelled, admission.active, admission.waiting

    # Checked before the loop closes: its shutdown would close the voicing anyway.
    record, cancelled, active, waiting = asyncio.run(run())
    assert (cancelled, active, waiting) == (True, 0, 0)
    assert app.state.admission.run_s is None
    assert record.error_code == "client_closed_request"
    assert "deadline" in record.error_detail


@pytest.mark.parametrize("headers_stuck", [False, True], ids=["after-audio", "headers-pending"])
def test_a_stream_cut_by_server_shutdown_ends_with_a_service_unavailable_event(
    monkeypatch: pytest.MonkeyPatch, headers_stuck: bool,
) -> None:
    """The server shuts down while the reply waits on Triton: the client is told to retry.

    With ``headers_stuck`` the shutdown comes while the headers wait on a slow client:
    the cut cancels that send, so the headers go out with the error event.
    """
    fake = FakeTriton()
    fake.behaviours["kokoro"] = by_text({"Stall": never})
    app = app_over(fake, retry_after_s=7)
    monkeypatch.setattr(AppStatus, "should_exit", False)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        if headers_stuck and not sent and not AppStatus.should_exit:
            monkeypatch.setattr(AppStatus, "should_exit", True)  # what uvicorn's SIGTERM sets
            await asyncio.Event().wait()  # the first try at the headers never completes
        sent.append(message)
        if b"event: audio" in message.get("body", b""):
            monkeypatch.setattr(AppStatus, "should_exit", True)

    async def run() -> tuple[RequestRecord, bool, int, int]:
        record = await stream_reply(app, "Hello. Stall here. Bye.", send, never_gone)
        admission = app.state.admission
        return record, "kokoro" in fake.cancelled, admission.active, admission.waiting

    record, cancelled, active, waiting = asyncio.run(run())
    assert (cancelled, active, waiting) == (True, 0, 0)
    assert app.state.admission.run_s is None
    assert (sent[0]["type"], sent[0]["status"]) == ("http.response.start", 200)
    streamed = b"".join(message.get("body", b"") for message in sent).decode()
    stream = sse_events(streamed)
    before = [] if headers_stuck else ["metadata", "audio"]
    assert [name for name, _ in stream] == [*before, "error"]
    error = stream[-1][1]["error"]
    assert error["type"] == "service_unavailable"
    assert "retry in 7 s" in error["message"]
    assert "retry: 7000" in streamed  # the SSE reconnection time, milliseconds
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert record.error_code == "service_unavailable"
