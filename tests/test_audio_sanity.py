"""Audio the API answers: a model's invalid audio is an error, every MP3 bitrate decodes in step.

Triton is the scriptable double of ``tests.robust_fakes``; MP3 answers are
decoded by libsndfile (mpg123) and compared with the WAV answer to the same
request.
"""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from handler.engines.csm import CsmEngine, CsmParams, Segment
from handler.errors import InferenceError
from tests.helpers import AUTH, tone
from tests.robust_fakes import FakeTriton, fake_client

# The bitrates docs/api.md lists for 24 kHz MP3 (MPEG-2 Layer III, ISO/IEC 13818-3).
MP3_BITRATES_KBPS = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)
TURNS = [
    {"voice": "jf_alpha", "text": "How was your weekend?"},
    {"voice": "jm_kumo", "text": "Good, I finally caught up on sleep."},
]


async def speech_like(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """0.45 s of a 220 Hz tone between 50 ms silences: edge trimming leaves an odd length."""
    silence = np.zeros(1_200, np.float32)
    return {"AUDIO": np.concatenate([silence, tone(0.45, hz=220.0), silence])}


def answering(bad: float) -> Any:
    """A Kokoro behaviour whose audio has one ``bad`` sample in the middle of speech."""

    async def voice(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        audio = (await speech_like(inputs))["AUDIO"]
        audio[len(audio) // 2] = bad
        return {"AUDIO": audio}

    return voice


def decoded_length(data: bytes) -> int:
    samples, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == 24_000
    return len(samples)


# MP3 is left out on purpose: were the NaN to get past the engine, LAME would
# abort this test process; tests/test_audio.py covers the MP3 encoder in a child.
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/audio/conversation", {"turns": TURNS, "output": "wav"}),
        ("/v1/audio/conversation", {"turns": TURNS, "output": "pcm"}),
        ("/v1/audio/conversation", {"turns": TURNS, "split": True}),
        ("/v1/converse", {"conversation": [{"speaker": "0", "text": "Hello there."}]}),
    ],
    ids=["wav", "pcm", "split", "converse"],
)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_model_audio_with_non_finite_samples_is_an_inference_error(
    path: str, body: dict[str, Any], bad: float
) -> None:
    fake = FakeTriton()
    fake.behaviours["kokoro"] = answering(bad)
    with fake_client(fake) as client:
        response = client.post(path, json=body, headers=AUTH)
    assert response.status_code == 502, response.text[:200]
    answer = response.json()
    if path.startswith("/v1/audio/"):
        assert answer["code"] == "inference_error"
        message = answer["detail"]
    else:
        assert answer["error"]["type"] == "inference_error"
        message = answer["error"]["message"]
    assert message == "model 'kokoro' returned invalid audio (NaN or infinite samples)"


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_csm_audio_with_non_finite_samples_is_an_inference_error(bad: float) -> None:
    async def generate(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        audio = tone(0.16)
        audio[100] = bad
        return {
            "AUDIO": audio,
            "AUDIO_CODES": np.zeros((1, 32, 2), np.int64),
            "DROPPED_SEGMENTS": np.zeros(1, np.int64),
        }

    fake = FakeTriton()
    fake.behaviours["csm"] = generate
    engine = CsmEngine("csm", 24_000, 32, ["0", "1"], 2048)
    params = CsmParams(0.7, None, 50, 3.0, 20, 64, 32, 1)
    with pytest.raises(InferenceError, match="returned invalid audio"):
        asyncio.run(engine.generate(fake, [Segment("0", "Hello.")], params))  # type: ignore[arg-type]


@pytest.mark.parametrize("kbps", MP3_BITRATES_KBPS)
def test_every_mp3_bitrate_answers_audio_that_decodes_in_step_with_wav(kbps: int) -> None:
    fake = FakeTriton()
    fake.behaviours["kokoro"] = speech_like
    mp3 = {"format": "mp3", "bitrate": kbps}
    with fake_client(fake) as client:

        def post(body: dict[str, Any]) -> Any:
            request = {"turns": TURNS, **body}
            return client.post("/v1/audio/conversation", json=request, headers=AUTH)

        stitched_wav, stitched_mp3 = post({}), post({"output": mp3})
        split_wav, split_mp3 = post({"split": True}), post({"split": True, "output": mp3})
    for response in (stitched_wav, stitched_mp3, split_wav, split_mp3):
        assert response.status_code == 200, response.text[:200]
    assert stitched_mp3.headers["content-type"] == "audio/mpeg"
    # Decoders skip the encoder delay, so the audio starts where the WAV's does;
    # the end may carry up to 46 samples of encoder padding (handler.audio.encode_mp3).
    extra = decoded_length(stitched_mp3.content) - decoded_length(stitched_wav.content)
    assert 0 <= extra <= 46
    segments = zip(
        split_wav.json()["audioSegments"], split_mp3.json()["audioSegments"], strict=True
    )
    for wav_segment, mp3_segment in segments:
        assert mp3_segment["mediaType"] == "audio/mpeg"
        assert mp3_segment["durationMs"] == wav_segment["durationMs"]
        wav_length = decoded_length(base64.b64decode(wav_segment["audio"]))
        mp3_length = decoded_length(base64.b64decode(mp3_segment["audio"]))
        assert 0 <= mp3_length - wav_length <= 46
