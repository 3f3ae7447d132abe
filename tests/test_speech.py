"""ASR and word timestamps: what Whisper and pocketsphinx hear in the real local Triton."""

from __future__ import annotations

import asyncio
import base64
import difflib
import io
import itertools
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from devtools.local_triton import LocalTriton
from devtools.wer import SPEC_SENTENCES, normalise, word_error_rate
from handler.errors import InferenceError
from handler.services import timestamps as timestamps_service
from handler.transcription import align, transcribe
from handler.triton import TritonClient
from tests.helpers import AUTH, speak

T = TypeVar("T")


def word_error_rates(client: TestClient, triton: LocalTriton) -> dict[str, float]:
    async def transcripts(audios: list[np.ndarray]) -> list[str]:
        asr = TritonClient(triton.http_url)
        try:
            return [(await transcribe(asr, audio))[0] for audio in audios]
        finally:
            await asr.close()

    rates = {}
    for speaker in ("0", "1"):
        heard = asyncio.run(transcripts([speak(client, speaker, s) for s in SPEC_SENTENCES]))
        rates[speaker] = word_error_rate(SPEC_SENTENCES, heard)
    return rates


@pytest.mark.triton
def test_spec_sentences_transcribe_back_within_10_percent_wer(
    real_client: TestClient, triton: LocalTriton
) -> None:
    rates = word_error_rates(real_client, triton)
    print(f"WER per default voice: {rates}")
    assert all(rate <= 0.10 for rate in rates.values()), rates


TURNS = [
    {"voice": "jf_alpha", "text": "How was your weekend?"},
    {"voice": "jm_kumo", "text": "Good — I finally caught up on sleep, Zorblax."},
    {"voice": "jf_alpha", "text": "Lucky you."},
]


def post_timed(client: TestClient, **extra: Any) -> Any:
    body = {"model": "kokoro", "turns": TURNS, "gapMs": 400, **extra}
    response = client.post("/v1/audio/conversation/with-timestamps", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.triton
def test_stitched_timestamps_are_ordered_inside_the_audio_and_mapped_to_turns(
    real_client: TestClient,
) -> None:
    body = post_timed(real_client)
    samples, rate = sf.read(io.BytesIO(base64.b64decode(body["audio"])), dtype="float32")
    duration = len(samples) / rate
    words = body["timestamps"]
    assert body["mediaType"] == "audio/wav" and body["warnings"] == []
    expected = [(i, w) for i, t in enumerate(TURNS) for w in re.findall(r"[A-Za-z']+", t["text"])]
    assert [(w["turnIndex"], w["text"]) for w in words] == expected
    previous_end = 0.0
    for word in words:
        assert 0.0 <= word["start"] <= word["end"] <= duration + 1e-6
        assert word["start"] >= previous_end - 1e-6
        previous_end = word["end"]
    # Each turn's words fall inside that turn's span of the stitched file.
    gap = 0.4
    turn_lengths = [
        s["durationMs"] / 1000 for s in post_timed(real_client, split=True)["audioSegments"]
    ]
    starts = np.concatenate([[0.0], np.cumsum(np.array(turn_lengths) + gap)])
    for word in words:
        index = word["turnIndex"]
        assert starts[index] - 1e-3 <= word["start"]
        assert word["end"] <= starts[index] + turn_lengths[index] + 1e-3


@pytest.mark.triton
def test_split_timestamps_are_block_relative(real_client: TestClient) -> None:
    body = post_timed(real_client, split=True)
    for segment in body["audioSegments"]:
        words = segment["timestamps"]
        assert words and words[0]["start"] < 0.5
        assert all("turnIndex" not in w for w in words)
        assert words[-1]["end"] <= segment["durationMs"] / 1000 + 1e-3


def test_timestamps_off_skips_them(client: TestClient) -> None:
    assert post_timed(client, timestamps="off")["timestamps"] == []


def with_triton_client(triton: LocalTriton,
                       work: Callable[[TritonClient], Awaitable[T]]) -> T:
    """``work`` run with a :class:`TritonClient` on ``triton``, closed afterwards."""
    async def run() -> T:
        triton_client = TritonClient(triton.http_url)
        try:
            return await work(triton_client)
        finally:
            await triton_client.close()

    return asyncio.run(run())


@pytest.mark.triton
def test_aligned_starts_agree_with_whisper(real_client: TestClient, triton: LocalTriton) -> None:
    text = "The weather was lovely, so we walked along the river for an hour."
    audio = speak(real_client, "1", text)

    async def both(triton_client: TritonClient) -> tuple[Any, Any]:
        return await align(triton_client, audio, text), await transcribe(triton_client, audio)

    aligned, (_, heard) = with_triton_client(triton, both)
    # Pair words in order (difflib's longest matching blocks), not by first occurrence.
    matcher = difflib.SequenceMatcher(
        a=[normalise(w.text) for w in aligned], b=[normalise(w.text) for w in heard],
        autojunk=False,
    )
    differences = [
        abs(aligned[block.a + k].start - heard[block.b + k].start)
        for block in matcher.get_matching_blocks()
        for k in range(block.size)
    ]
    assert len(differences) >= 0.8 * len(aligned)
    print(f"mean |aligned start - whisper start| = {np.mean(differences) * 1000:.0f} ms")
    assert np.mean(differences) < 0.100


@pytest.mark.triton
def test_an_empty_clip_fails_alone_and_missing_words_are_added_and_aligned(
    real_client: TestClient, triton: LocalTriton,
) -> None:
    """An utterance left open by a failed clip used to fail every later alignment.

    The sentence after it has three words the dictionary lacks, added together.
    """
    text = "Zubrowski met Quillandra and Brexenthal at the harbour."
    audio = speak(real_client, "0", text)

    async def empty_then_speech(triton_client: TritonClient) -> tuple[InferenceError, Any]:
        with pytest.raises(InferenceError) as empty:
            await align(triton_client, np.zeros(0, np.float32), text)
        return empty.value, await align(triton_client, audio, text)

    empty, words = with_triton_client(triton, empty_then_speech)
    assert "too few to align" in empty.detail
    assert [normalise(w.text) for w in words] == [normalise(w) for w in text.split()]
    assert all(a.end <= b.start + 1e-6 for a, b in itertools.pairwise(words))


@pytest.mark.triton
def test_alignment_failure_falls_back_to_whisper(
    real_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing_align(*_: Any) -> Any:
        raise InferenceError("alignment failed")

    monkeypatch.setattr(timestamps_service, "align", failing_align)
    body = post_timed(real_client)
    assert len(body["warnings"]) == 3 and "ASR" in body["warnings"][0]
    heard = [normalise(w["text"]) for w in body["timestamps"] if w["turnIndex"] == 0]
    assert heard == ["how", "was", "your", "weekend"]


def test_both_failing_is_503_timestamps_unavailable(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing(*_: Any) -> Any:
        raise InferenceError("model failed")

    monkeypatch.setattr(timestamps_service, "align", failing)
    monkeypatch.setattr(timestamps_service, "transcribe", failing)
    response = client.post("/v1/audio/conversation/with-timestamps", headers=AUTH,
                           json={"model": "kokoro", "turns": TURNS})
    assert response.status_code == 503
    assert response.json()["code"] == "timestamps_unavailable"
    assert int(response.headers["retry-after"]) >= 1  # a 503 says when to try again


def test_with_timestamps_validates_like_the_plain_endpoint(client: TestClient) -> None:
    response = client.post("/v1/audio/conversation/with-timestamps", headers=AUTH,
                           json={"turns": [{"voice": "alloy", "text": "Hi."}], "timestamps": "x"})
    assert response.status_code == 400
    paths = [item["path"] for item in response.json()["validation"]]
    assert ["timestamps"] in paths
