"""Test utilities shared by the test modules: the API key, app settings and test audio."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from fastapi.testclient import TestClient

from devtools.fake_triton import FakeTriton
from devtools.local_triton import LocalTriton
from handler.app import create_app
from handler.audio import resample
from handler.settings import Settings

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# Name of the tiny CSM checkpoint in the test repository (conftest.tiny_triton).
TINY_CSM = "csm-tiny"
STATE_DIR = Path(tempfile.mkdtemp(prefix="converse-tests-"))


@dataclass(frozen=True)
class TinyRepository:
    """The tiny random checkpoints and the repository exported from them."""

    gemma: Path
    csm: Path
    llama: Path
    repository: Path


@dataclass(frozen=True)
class TinyTriton:
    """The tiny random checkpoints, their exported repository and the server on it."""

    gemma: Path
    csm: Path
    llama: Path
    repository: Path
    server: LocalTriton


# Deadlines of the API under test, seconds. Tests check what the service answers,
# not how fast: a 2-core machine running other suites voices a long turn in more
# than the production 20 s. Deadline behaviour has its own tests with short ones.
TEST_DEADLINES = {"triton_timeout_s": 90.0, "lambda_timeout_s": 95.0, "gateway_timeout_s": 100.0}


def make_settings(**overrides: Any) -> Settings:
    """Settings with storage in a fresh temp dir, a rate limit tests never reach, long deadlines."""
    state = Path(tempfile.mkdtemp(dir=STATE_DIR))
    values: dict[str, Any] = {
        "api_keys": API_KEY,
        "sqlite_path": state / "converse.db",
        "blob_dir": state / "blobs",
        "rate_limit_capacity": 1_000_000,
        **TEST_DEADLINES,
        **overrides,
    }
    return Settings(**values)


async def post_then_disconnect(
    app: Any, path: str, body: dict[str, Any],
    gone: Callable[[list[dict[str, Any]]], Awaitable[None]], timeout_s: float = 60.0,
) -> list[dict[str, Any]]:
    """POST ``body`` (JSON) to the ASGI ``app``; the client disconnects once ``gone`` returns.

    ``gone`` gets the list of ASGI messages the app has sent so far (it grows
    while ``gone`` waits). Returns every message the app sent.

    Raises:
        TimeoutError: the app did not finish within ``timeout_s`` seconds.
    """
    payload = json.dumps(body).encode()
    sent: list[dict[str, Any]] = []
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await gone(sent)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app(asgi_post(path, payload), receive, send), timeout=timeout_s)
    return sent


def asgi_post(path: str, payload: bytes) -> dict[str, Any]:
    """The ASGI scope of an authorised JSON ``POST path`` whose body is ``payload``."""
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
        "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"authorization", AUTH["Authorization"].encode()),
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode())],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {},
    }


def wav_b64(samples: np.ndarray, sample_rate: int, data_uri: bool = False) -> str:
    """Base64 16-bit WAV of ``samples`` ([n] or [n, channels])."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, format="WAV", subtype="PCM_16")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return f"data:audio/wav;base64,{encoded}" if data_uri else encoded


def tone(seconds: float, sample_rate: int = 24_000, hz: float = 440.0,
         amplitude: float = 0.5) -> np.ndarray:
    """A float32 sine tone."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def speak(client: TestClient, speaker: str, text: str, sample_rate: int = 16_000) -> np.ndarray:
    """``text`` voiced by ``speaker``'s bundled voice through the API.

    Returns:
        float32 mono samples [n] at ``sample_rate`` Hz.
    """
    response = client.post("/v1/converse", headers=AUTH,
                           json={"conversation": [{"speaker": speaker, "text": text}]})
    assert response.status_code == 200, response.text
    wav = base64.b64decode(response.json()["reply"]["audio"]["data_b64"])
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return resample(samples, rate, sample_rate)


def sse_events(body: str) -> list[tuple[str, Any]]:
    """``(event, data)`` of every Server-Sent Event in ``body`` (comments skipped)."""
    parsed = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":")
        )
        if fields:
            parsed.append((fields.get("event", "message"), json.loads(fields["data"])))
    return parsed


def streamed_pcm(stream: list[tuple[str, Any]]) -> bytes:
    """The PCM bytes of the ``audio`` events of a ``/v1/converse`` stream, in order."""
    return b"".join(base64.b64decode(data["data_b64"]) for name, data in stream if name == "audio")


@contextmanager
def unserved_saved_voice(voice: str) -> Iterator[tuple[FakeTriton, TestClient, str]]:
    """An app over a Triton double, a key's saved ``voice``, then the model stops serving it.

    Yields the double, a client of the app (its model list is never cached) and
    the saved voice's id.
    """
    with FakeTriton() as double, TestClient(
        create_app(make_settings(triton_url=double.http_url, models_cache_s=0))
    ) as client:
        saved = client.post("/v1/voices", json={"name": "n", "voice": voice}, headers=AUTH)
        assert saved.status_code == 201, saved.text
        voices = double.configs["kokoro"]["parameters"]["voices"]
        voices["string_value"] = ",".join(
            name for name in voices["string_value"].split(",") if name != voice
        )
        yield double, client, saved.json()["id"]


# Digits and amounts expand to several phonemes a character: 174 characters, over 510 tokens.
AMOUNTS = ("Sales rose to $1,234,567 in 2021. Costs fell to $987,654 in 2022. "
           "Profit hit $246,913 in 2023. We expect $1,500,000 in 2024. "
           "Staff grew to 1,250 in 2025. Offices: 37 in 2026.")
