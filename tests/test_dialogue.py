"""``POST /v1/audio/conversation`` (+ ``/with-timestamps``) over the Triton test double.

Audio work (normalising, resampling, encoding) leaves the event loop free, and
a saved voice is checked against the voices its model serves now.
"""

from __future__ import annotations

import asyncio
import time
from types import ModuleType
from typing import Any

import pytest

from devtools.fake_triton import FakeTriton
from handler.app import create_app
from handler.services import dialogue, timestamps
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
