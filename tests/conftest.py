"""Shared fixtures: the real local Triton (session-scoped) and API clients over it."""

from __future__ import annotations

import base64
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from export.kokoro import KokoroExportOptions, export_kokoro
from export.local_triton import LocalTriton
from handler.app import create_app
from handler.settings import Settings

REPOSITORY = Path(__file__).resolve().parent.parent / "build" / "model_repository"
API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def triton() -> Iterator[LocalTriton]:
    """tritonserver serving the exported Kokoro repository (export is a no-op when current)."""
    export_kokoro(KokoroExportOptions(out=REPOSITORY))
    with LocalTriton(REPOSITORY) as server:
        yield server


STATE_DIR = Path(tempfile.mkdtemp(prefix="converse-tests-"))


def make_settings(**overrides: Any) -> Settings:
    """Settings with storage in a fresh temp dir and a rate limit tests never reach."""
    state = Path(tempfile.mkdtemp(dir=STATE_DIR))
    values: dict[str, Any] = {
        "api_keys": API_KEY,
        "sqlite_path": state / "converse.db",
        "blob_dir": state / "blobs",
        "rate_limit_capacity": 1_000_000,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture(scope="session")
def settings(triton: LocalTriton) -> Settings:
    return make_settings(triton_url=triton.http_url)


@pytest.fixture(scope="session")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


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
