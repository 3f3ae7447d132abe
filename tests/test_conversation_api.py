"""``/v1/audio/conversation``: validation matrix (problem+json) and stitching behaviour."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from tests.helpers import AUTH

WEEKEND = [
    {"voice": "jf_alpha", "text": "How was your weekend?"},
    {"voice": "jm_kumo", "text": "Good — I finally caught up on sleep."},
    {"voice": "jf_alpha", "text": "Lucky you."},
]


def post(client: TestClient, body: Any) -> Any:
    return client.post("/v1/audio/conversation", json=body, headers=AUTH)


def pcm16(data: bytes) -> np.ndarray:
    return np.frombuffer(data, "<i2")


@pytest.fixture(scope="module")
def stitched_and_split(client: TestClient) -> tuple[np.ndarray, list[np.ndarray], dict[str, Any]]:
    body = {"model": "kokoro", "turns": WEEKEND, "gapMs": 500, "output": "pcm"}
    whole = post(client, body)
    assert whole.status_code == 200 and whole.headers["content-type"] == "audio/pcm"
    split = post(client, {**body, "split": True})
    assert split.status_code == 200, split.text
    envelope = split.json()
    segments = [pcm16(base64.b64decode(s["audio"])) for s in envelope["audioSegments"]]
    return pcm16(whole.content), segments, envelope


def test_split_segments_with_gaps_equal_stitched(stitched_and_split: Any) -> None:
    whole, segments, envelope = stitched_and_split
    gap = np.zeros(12_000, np.int16)  # 500 ms at 24 kHz
    rebuilt = np.concatenate([segments[0], gap, segments[1], gap, segments[2]])
    assert np.array_equal(whole, rebuilt)
    assert envelope["warnings"] == []
    for index, (segment, meta) in enumerate(zip(segments, envelope["audioSegments"], strict=True)):
        assert meta["turnIndex"] == index and meta["mediaType"] == "audio/pcm"
        assert meta["durationMs"] == round(len(segment) / 24)


def test_each_turn_peak_is_at_target(stitched_and_split: Any) -> None:
    _, segments, _ = stitched_and_split
    for segment in segments:
        peak = np.max(np.abs(segment.astype(np.float64))) / 32767
        assert abs(20 * np.log10(peak) - (-16.0)) < 0.1


def test_custom_volume_and_wav_output(client: TestClient) -> None:
    response = post(client, {"model": "kokoro", "turns": WEEKEND[:1], "volumeDbfs": -23})
    assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
    samples, rate = sf.read(io.BytesIO(response.content))
    assert rate == 24_000
    assert abs(20 * np.log10(np.max(np.abs(samples))) + 23) < 0.1


def test_mp3_output_decodes_with_right_rate_and_duration(client: TestClient) -> None:
    body = {"model": "kokoro", "turns": WEEKEND, "gapMs": 300}
    wav = post(client, body)
    mp3 = post(client, {**body, "output": {"format": "mp3", "bitrate": 64}})
    assert mp3.status_code == 200 and mp3.headers["content-type"] == "audio/mpeg"
    reference, _ = sf.read(io.BytesIO(wav.content))
    decoded, rate = sf.read(io.BytesIO(mp3.content))
    assert rate == 24_000
    assert abs(len(decoded) - len(reference)) / 24_000 < 0.06


def test_per_turn_models_and_default_model(client: TestClient) -> None:
    turns = [{"model": "kokoro", "voice": "jf_alpha*0.5+jm_kumo*0.5", "text": "Hi there."}]
    assert post(client, {"turns": turns}).status_code == 200
    assert post(client, {"turns": [{"voice": "jm_kumo", "text": "Hi."}]}).status_code == 200


def problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = dict(response.json())
    assert body["status"] == status and body["code"] == code and body["detail"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


GOOD = {"voice": "jf_alpha", "text": "Fine."}


@pytest.mark.parametrize(
    ("body", "code", "path", "turn_index"),
    [
        ({"turns": []}, "validation_error", ["turns"], None),
        ({"turns": [GOOD] * 65}, "validation_error", ["turns"], None),
        ({"turns": [GOOD, {"voice": "jf_alpha", "text": ""}]}, "validation_error",
         ["turns", "1", "text"], 1),
        ({"turns": [GOOD, {"voice": "jf_alpha", "text": "x" * 8001}]}, "validation_error",
         ["turns", "1", "text"], 1),
        ({"model": "kokoro", "turns": [GOOD, {**GOOD, "model": "kokoro"}]}, "validation_error",
         ["turns", "1", "model"], 1),
        ({"turns": [GOOD, {"text": "No voice."}]}, "validation_error", ["turns", "1", "voice"], 1),
        ({"turns": [GOOD, {"voiceId": "01940f8a-2dc1-7000-9b6c-fc6dd8a0a4d2", "text": "Hi."}]},
         "voice_not_found", ["turns", "1", "voiceId"], 1),
        ({"turns": [GOOD, {"voiceId": "x", "voice": "jf_alpha", "text": "Hi."}]},
         "validation_error", ["turns", "1", "voiceId"], 1),
        ({"turns": [GOOD, {"voice": "alloy", "text": "Hi."}]}, "unknown_voice",
         ["turns", "1", "voice"], 1),
        ({"turns": [GOOD, {"voice": "jf_alpha*0", "text": "Hi."}]}, "unknown_voice",
         ["turns", "1", "voice"], 1),
        ({"model": "openai/gpt-4o-mini-tts", "turns": [GOOD]}, "unknown_model", ["model"], 0),
        ({"turns": [GOOD, {**GOOD, "model": "nope"}]}, "unknown_model",
         ["turns", "1", "model"], 1),
        ({"turns": [GOOD], "gapMs": -1}, "validation_error", ["gapMs"], None),
        ({"turns": [GOOD], "volumeDbfs": 3}, "validation_error", ["volumeDbfs"], None),
        ({"turns": [GOOD], "output": "ogg"}, "validation_error", ["output"], None),
        ({"turns": [GOOD], "output": {"format": "mp3", "bitrate": 192}}, "validation_error",
         ["output", "bitrate"], None),
        ({"turns": [GOOD], "timestamps": "on"}, "validation_error", ["timestamps"], None),
        ({"turns": [GOOD], "extra": True}, "validation_error", ["extra"], None),
    ],
)
def test_validation_matrix(
    client: TestClient, body: Any, code: str, path: list[str], turn_index: int | None
) -> None:
    error = problem(post(client, body), 400, code)
    assert any(item["path"][: len(path)] == path for item in error["validation"]), error
    assert error.get("turn_index") == turn_index


def test_problem_json_for_auth(client: TestClient) -> None:
    response = client.post("/v1/audio/conversation", json={"turns": [GOOD]})
    problem(response, 401, "unauthorized")


@pytest.mark.parametrize("text", ["🙂🙂", "...", "— !"])
def test_text_with_nothing_to_speak_is_422(client: TestClient, text: str) -> None:
    body = {"turns": [GOOD, {"voice": "jm_kumo", "text": text}]}
    error = problem(post(client, body), 422, "unprocessable")
    assert error["turn_index"] == 1
    assert error["validation"][0]["path"] == ["turns", "1", "text"]
