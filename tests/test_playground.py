"""The playground page: static checks, and a spoken exchange in a real browser.

The browser is Debian's Chromium (``CONVERSE_CHROMIUM``, installed by ``make
test``) driven by Playwright; its fake microphone plays a rendered utterance,
and the page talks to the API under uvicorn over the real local Triton.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient
from playwright.sync_api import sync_playwright

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


@pytest.mark.triton
def test_a_spoken_exchange_in_chromium(server: ApiServer, real_client: TestClient,
                                       tmp_path: Path) -> None:
    assert Path(CHROMIUM).exists(), f"Chromium not found at {CHROMIUM} (make test installs it)"
    rate = 48_000
    speech = speak(real_client, "0", QUESTION, rate)
    silence = np.zeros(rate, np.float32)
    microphone = tmp_path / "microphone.wav"
    sf.write(microphone, np.concatenate([silence, speech, silence, silence, silence]), rate,
             subtype="PCM_16")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={microphone}%noloop",
            "--autoplay-policy=no-user-gesture-required",
        ])
        try:
            page = browser.new_page()
            page.goto(f"{server.base_url}/playground")
            page.fill("#key", API_KEY)
            page.dispatch_event("#key", "change")
            page.wait_for_selector("#voice option", state="attached")
            page.click("#connect")
            page.wait_for_function("document.getElementById('status').textContent === "
                                   "'connected'", timeout=30_000)
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
        finally:
            browser.close()
    assert word_error_rate([QUESTION], [heard]) <= 0.25, heard
    assert replied.strip()
    assert status == "completed"
    assert played_ms > 0
