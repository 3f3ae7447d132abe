"""Real Kokoro through the real local Triton: every speaker label speaks, voices differ."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from tests.helpers import AUTH

pytestmark = pytest.mark.triton

SENTENCE = "The weather was lovely, so we walked along the river for an hour."


def reply_audio(client: TestClient, speaker: str, text: str) -> np.ndarray:
    response = client.post(
        "/v1/converse", json={"conversation": [{"speaker": speaker, "text": text}]}, headers=AUTH
    )
    assert response.status_code == 200, response.text
    wav = base64.b64decode(response.json()["reply"]["audio"]["data_b64"])
    samples, rate = sf.read(io.BytesIO(wav))
    assert rate == 24_000
    return np.asarray(samples)


def spectrum(samples: np.ndarray) -> np.ndarray:
    frames = samples[: len(samples) // 512 * 512].reshape(-1, 512)
    power = np.abs(np.fft.rfft(frames * np.hanning(512), axis=1)).mean(axis=0)
    return np.asarray(power / power.sum())


def test_each_speaker_label_gives_plausible_speech(real_client: TestClient) -> None:
    for speaker in ("0", "1"):
        samples = reply_audio(real_client, speaker, SENTENCE)
        seconds = len(samples) / 24_000
        # 13 words of English read aloud: 2.5-8 s (about 100-300 words per minute).
        assert 2.5 < seconds < 8.0
        rms = np.sqrt(np.mean(samples**2))
        assert rms > 0.01
        # Speech has pauses: its frame energies vary far more than a tone's.
        frame_rms = np.sqrt(np.mean(samples[: len(samples) // 480 * 480].reshape(-1, 480) ** 2, 1))
        assert np.std(frame_rms) / np.mean(frame_rms) > 0.5


def test_default_voices_differ(real_client: TestClient) -> None:
    first, second = (spectrum(reply_audio(real_client, s, SENTENCE)) for s in ("0", "1"))
    assert np.abs(first - second).sum() > 0.1


def test_long_text_is_split_and_fully_voiced(real_client: TestClient) -> None:
    text = " ".join(["This sentence is part of a long turn that must be split."] * 12)
    samples = reply_audio(real_client, "0", text)
    # 132 words: well over 20 s of speech, and not truncated to the first piece.
    assert len(samples) / 24_000 > 20
