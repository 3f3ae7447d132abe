"""The playground page: static checks, and a spoken exchange in a real browser.

The browser is Debian's Chromium (``CONVERSE_CHROMIUM``, installed by ``make
test``) driven by Playwright; its fake microphone plays a rendered utterance,
and the page talks to the API under uvicorn over the real local Triton.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient
from playwright.sync_api import Page, sync_playwright

from devtools.api_server import ApiServer
from devtools.local_triton import LocalTriton
from devtools.wer import word_error_rate
from handler.app import create_app
from tests.helpers import API_KEY, make_settings, speak

QUESTION = "What is the best way to learn to cook?"
CHROMIUM = os.environ.get("CONVERSE_CHROMIUM", "/usr/bin/chromium")


def test_the_page_is_served_without_external_resources(client: TestClient) -> None:
    response = client.get("/playground")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "<script>" in page and "/v1/conversations/create" in page
    assert re.findall(r"""(?:src|href)=["']?https?://""", page) == []
    assert "@import" not in page


@pytest.fixture(scope="module")
def server(triton: LocalTriton) -> Iterator[ApiServer]:
    settings = make_settings(triton_url=triton.http_url, triton_grpc_url=triton.grpc_url,
                             log_requests=False)
    with ApiServer(create_app(settings)) as api:
        yield api


@contextmanager
def connected_page(server: ApiServer, microphone: Path, *, loop: bool = False,
                   init_script: str = "") -> Iterator[Page]:
    """The playground in Chromium, its fake microphone playing ``microphone``, session connected.

    ``loop``: the file plays again from its start when it ends (else once);
    ``init_script`` runs before the page's own.
    """
    assert Path(CHROMIUM).exists(), f"Chromium not found at {CHROMIUM} (make test installs it)"
    capture = f"{microphone}" if loop else f"{microphone}%noloop"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={capture}",
            "--autoplay-policy=no-user-gesture-required",
        ])
        try:
            page = browser.new_page()
            if init_script:
                page.add_init_script(init_script)
            page.goto(f"{server.base_url}/playground")
            page.fill("#key", API_KEY)
            page.dispatch_event("#key", "change")
            page.wait_for_selector("#voice option", state="attached")
            page.click("#connect")
            page.wait_for_function("document.getElementById('status').textContent === "
                                   "'connected'", timeout=30_000)
            yield page
        finally:
            browser.close()


@pytest.mark.triton
def test_a_spoken_exchange_in_chromium(server: ApiServer, real_client: TestClient,
                                       tmp_path: Path) -> None:
    rate = 48_000
    speech = speak(real_client, "0", QUESTION, rate)
    silence = np.zeros(rate, np.float32)
    microphone = tmp_path / "microphone.wav"
    sf.write(microphone, np.concatenate([silence, speech, silence, silence, silence]), rate,
             subtype="PCM_16")
    with connected_page(server, microphone) as page:
        page.click("#talk")
        page.wait_for_selector("#transcript p.user", timeout=60_000)
        page.wait_for_function("document.getElementById('events').textContent"
                               ".includes('response.done')", timeout=120_000)
        heard = page.text_content("#transcript p.user") or ""
        replied = page.text_content("#transcript p.assistant") or ""
        status = page.text_content("#status")
        # The reply is done once its audio has played (the server follows playback).
        page.wait_for_function("window.playground.playedMs > 0", timeout=10_000)
        played_ms = page.evaluate("window.playground.playedMs")
    assert word_error_rate([QUESTION], [heard]) <= 0.25, heard
    assert replied.strip()
    assert status == "completed"
    assert played_ms > 0


# Counts the bytes of binary messages the page sends on any WebSocket, and records
# where each reply clip is scheduled (AudioContext seconds).
_SPY = """
window.spy = { sentBytes: 0, starts: [] };
const send = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) {
  if (typeof data !== "string") window.spy.sentBytes += data.byteLength;
  return send.call(this, data);
};
const start = AudioBufferSourceNode.prototype.start;
AudioBufferSourceNode.prototype.start = function (when) {
  window.spy.starts.push({ when, duration: this.buffer.duration, at: this.context.currentTime });
  return start.call(this, when);
};
"""

# A reply whose second clip arrives after the first has played out (a stall), then a third.
_STALLED_REPLY = """async () => {
  const clip = (s) => new Int16Array(Math.round(audio.sampleRate * s)).fill(1000).buffer;
  const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
  window.spy.starts = [];
  onEvent({ type: "response.started", turn_id: "turn_90", seq: 1 });
  playAudio(clip(0.2));
  await sleep(600);
  playAudio(clip(0.2));
  playAudio(clip(0.2));
  return window.spy.starts;
}"""


@pytest.mark.triton
def test_the_microphone_streams_once_and_stops_and_stalled_audio_never_overlaps(
    server: ApiServer, tmp_path: Path,
) -> None:
    """Start, stop, start again: one stream at the socket's rate while on, none while off.

    And a reply clip that arrives after the one before has played out starts
    when it arrives, with the next one after it, not at their places in the
    reply (which are past: they would play at once, over each other).
    """
    microphone = tmp_path / "microphone.wav"
    sf.write(microphone, np.zeros(48_000, np.float32), 48_000, subtype="PCM_16")
    rates: list[float] = []
    sent_while_off: list[int] = []
    with connected_page(server, microphone, loop=True, init_script=_SPY) as page:
        for _ in range(2):
            page.click("#talk")
            page.wait_for_function("window.spy.sentBytes > 0", timeout=10_000)
            page.wait_for_timeout(500)
            sent, clock = page.evaluate("[window.spy.sentBytes, audio.currentTime]")
            page.wait_for_timeout(2000)
            sent_after, clock_after = page.evaluate("[window.spy.sentBytes, audio.currentTime]")
            samples = (sent_after - sent) / 2
            rates.append(samples / (clock_after - clock) / page.evaluate("audio.sampleRate"))
            page.click("#talk")
            page.wait_for_timeout(300)
            stopped = page.evaluate("window.spy.sentBytes")
            page.wait_for_timeout(1000)
            sent_while_off.append(page.evaluate("window.spy.sentBytes") - stopped)
        starts = page.evaluate(_STALLED_REPLY)
    # One stream sends at about 1.0 and two at about 2.0; the band leaves room for
    # 20 ms messages pending at either reading and for a page thread slowed by load.
    assert all(0.6 < rate < 1.4 for rate in rates), rates
    assert sent_while_off == [0, 0]
    _, second, third = starts
    assert second["when"] >= second["at"]
    assert third["when"] >= second["when"] + second["duration"] - 1e-6
