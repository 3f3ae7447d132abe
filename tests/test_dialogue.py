"""``POST /v1/audio/conversation`` (+ ``/with-timestamps``) over the Triton test double.

Audio work (normalising, resampling, encoding) leaves the event loop free, a
saved voice is checked against the voices its model serves now, and words are
aligned on each turn's audio before it is levelled to ``volumeDbfs`` (also
checked on the real local Triton).
"""

from __future__ import annotations

import asyncio
import time
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from devtools.fake_triton import FakeTriton
from handler.app import create_app
from handler.services import dialogue, timestamps
from handler.transcription import TimedWord
from handler.triton import TritonClient
from tests.helpers import AUTH, make_settings, post_then_disconnect, unserved_saved_voice

STITCHED, TIMED = "/v1/audio/conversation", "/v1/audio/conversation/with-timestamps"
TURNS = [{"voice": "jf_alpha", "text": "Hello there."}, {"voice": "jm_kumo", "text": "Hi."}]
# How long each stalled step holds its thread, and the ticker's period, seconds.
STALL_S = 0.3
TICK_S = 0.01


@pytest.mark.parametrize(
    ("path", "options", "module", "step"),
    [
        (STITCHED, {"output": "mp3"}, dialogue, "encode"),
        (STITCHED, {"split": True}, dialogue, "encode"),
        (STITCHED, {}, dialogue, "peak_normalize"),
        (TIMED, {}, timestamps, "resample"),
    ],
    ids=["stitched-encode", "split-encode", "normalise", "timestamps-resample"],
)
def test_the_event_loop_keeps_running_while_audio_is_processed(
    fake_triton: FakeTriton,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    options: dict[str, Any],
    module: ModuleType,
    step: str,
) -> None:
    """A coroutine beside the request ticks while ``step`` holds its thread.

    ``step`` is made slow with ``time.sleep``, which blocks its thread as CPU
    work would: run on the event loop, no tick falls inside it.
    """
    real = getattr(module, step)
    spans: list[tuple[float, float]] = []

    def stalled(*args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        time.sleep(STALL_S)
        result = real(*args, **kwargs)
        spans.append((started, time.monotonic()))
        return result

    monkeypatch.setattr(module, step, stalled)
    app = create_app(make_settings(triton_url=fake_triton.http_url))
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(TICK_S)

    async def never_gone(sent: list[dict[str, Any]]) -> None:
        await asyncio.Event().wait()

    async def scenario() -> list[dict[str, Any]]:
        ticking = asyncio.create_task(ticker())
        try:
            return await post_then_disconnect(app, path, {"turns": TURNS, **options}, never_gone)
        finally:
            ticking.cancel()
            await app.state.triton.close()

    sent = asyncio.run(scenario())
    assert sent[0]["status"] == 200, sent
    assert spans, f"{step} was not called"
    for started, ended in spans:
        assert any(started < tick < ended for tick in ticks), f"the loop stalled in {step}"


@pytest.mark.parametrize("path", [STITCHED, TIMED])
def test_a_saved_voice_the_model_no_longer_serves_is_400_before_any_synthesis(path: str) -> None:
    """Answered like an inline turn naming that voice, at the turn's ``voiceId``; no Triton call."""
    with unserved_saved_voice("jf_nezumi") as (double, client, voice_id):

        def refused(turn: dict[str, str]) -> dict[str, Any]:
            response = client.post(path, json={"turns": [TURNS[0], turn]}, headers=AUTH)
            assert response.status_code == 400, response.text
            return dict(response.json())

        inline = refused({"voice": "jf_nezumi", "text": "Hello."})
        by_id = refused({"voiceId": voice_id, "text": "Hello."})
        assert by_id["code"] == inline["code"] == "unknown_voice"
        assert by_id["turn_index"] == inline["turn_index"] == 1
        assert by_id["detail"].endswith(inline["detail"])
        assert [item["path"] for item in by_id["validation"]] == [["turns", "1", "voiceId"]]
        assert double.inferences == []


def test_words_are_aligned_on_each_turns_audio_before_it_is_levelled(
    fake_triton: FakeTriton, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The aligner hears a turn at the model's own level, whatever ``volumeDbfs`` asks.

    Levelled to -60 dBFS a turn peaks at 32 of the 16-bit steps pocketsphinx
    reads; the double's kokoro tone peaks at 0.5 (its docstring).
    """
    real_align = timestamps.align
    heard: dict[str, np.ndarray] = {}

    async def recorded(triton: TritonClient, audio_16k: np.ndarray, text: str) -> list[TimedWord]:
        heard[text] = audio_16k
        return await real_align(triton, audio_16k, text)

    monkeypatch.setattr(timestamps, "align", recorded)
    app = create_app(make_settings(triton_url=fake_triton.http_url))
    by_volume = {}
    with TestClient(app) as client:
        for volume in (-16.0, -60.0):
            body = {"turns": TURNS, "volumeDbfs": volume}
            response = client.post(TIMED, json=body, headers=AUTH)
            assert response.status_code == 200, response.text
            by_volume[volume] = dict(heard)
            heard.clear()
    loud, quiet = by_volume[-16.0], by_volume[-60.0]
    assert sorted(loud) == sorted(quiet) == sorted(turn["text"] for turn in TURNS)
    for text, audio in quiet.items():
        assert np.array_equal(audio, loud[text])
        assert 0.45 < np.max(np.abs(audio)) < 0.55


# Turns whose alignment failed at -60 dBFS when words were aligned on the
# levelled audio (each fell back to Whisper's timestamps, with a warning).
QUIET_TURNS = [
    {"voice": "jf_alpha", "text": "Same here. Did you keep the flame low like she said?"},
    {"voice": "jm_kumo",
     "text": "The weather was lovely, so we walked along the river for an hour."},
    {"voice": "jm_kumo", "text": "Good — I finally caught up on sleep, Zorblax."},
]


@pytest.mark.triton
def test_a_quiet_volume_times_words_as_a_loud_one(real_client: TestClient) -> None:
    """At -60 dBFS every turn is still force-aligned, to the times it gets at -16 dBFS."""

    def timed(volume: float) -> dict[str, Any]:
        body = {"model": "kokoro", "turns": QUIET_TURNS, "volumeDbfs": volume, "split": True}
        response = real_client.post(TIMED, json=body, headers=AUTH)
        assert response.status_code == 200, response.text
        return dict(response.json())

    loud, quiet = timed(-16.0), timed(-60.0)
    assert loud["warnings"] == quiet["warnings"] == []
    pairs = [
        (a, b)
        for at_16, at_60 in zip(loud["audioSegments"], quiet["audioSegments"], strict=True)
        for a, b in zip(at_16["timestamps"], at_60["timestamps"], strict=True)
    ]
    assert all(a["text"] == b["text"] for a, b in pairs)
    # Within two of pocketsphinx's 10 ms frames: one request in a few has seen a
    # word edge move by a frame even at the same volume.
    assert all(
        abs(a["start"] - b["start"]) <= 0.02 and abs(a["end"] - b["end"]) <= 0.02
        for a, b in pairs
    )
