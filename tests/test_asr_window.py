"""Whisper's shortened encoder window and its repetition-loop guard (model_repository/whisper_asr).

The CPU repository's encoder sees a short clip plus padding, at least 15 s,
instead of 30 s; these tests hold the two ways that can go wrong: speech past
the short window lost, and a reply repeated into the padding. Then the guard
against greedy decoding looping on repetitive speech.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fastapi.testclient import TestClient

from devtools.local_triton import LocalTriton
from devtools.wer import SPEC_SENTENCES, normalise, word_error_rate
from handler.transcription import TimedWord, transcribe
from handler.triton import TritonClient
from tests.helpers import speak

pytestmark = pytest.mark.triton


def transcripts(triton: LocalTriton, clips: list[np.ndarray]) -> list[tuple[str, list[TimedWord]]]:
    """Transcript and word timestamps of each 16 kHz clip, through Triton."""

    async def run() -> list[tuple[str, list[TimedWord]]]:
        asr = TritonClient(triton.http_url)
        try:
            return [await transcribe(asr, clip) for clip in clips]
        finally:
            await asr.close()

    return asyncio.run(run())


def test_speech_past_the_shortest_window_is_transcribed(
    real_client: TestClient, triton: LocalTriton
) -> None:
    sentences = [("0", s) for s in SPEC_SENTENCES] + [("1", s) for s in SPEC_SENTENCES[:5]]
    clip = np.concatenate([speak(real_client, speaker, s) for speaker, s in sentences])
    assert 18.0 < len(clip) / 16_000 < 30.0
    [(text, words)] = transcripts(triton, [clip])
    assert word_error_rate([" ".join(s for _, s in sentences)], [text]) <= 0.15, text
    assert words[-1].end > 16.0, words[-1]


def test_a_clip_repeated_into_the_padding_is_transcribed_again(
    real_client: TestClient, triton: LocalTriton
) -> None:
    # With the 15 s window and no second pass, Whisper-base hears this clip as
    # "See you soon. See you soon." (the repeat's words have no duration).
    silence = np.zeros(4_800, np.float32)
    phrase = "See you soon."
    clip = np.concatenate([silence, speak(real_client, "0", phrase), silence])
    [(text, words)] = transcripts(triton, [clip])
    assert normalise(text).split() == normalise(phrase).split(), text
    assert all(w.end - w.start >= 0.02 for w in words), words


def test_a_transcript_that_loops_is_decoded_again_and_repetitions_said_are_kept(
    real_client: TestClient, triton: LocalTriton
) -> None:
    # Without the guard, Whisper-base writes the laugh as one "word" of hundreds of
    # characters ("Dojojojo..."); the yeses keep at least the four said (decoded again
    # without repeated 3-grams, they would come out as three).
    laugh, yeses = "Ha ha ha ha ha ha ha ha ha ha.", "Yes, yes, yes, yes, of course."
    clips = [speak(real_client, "0", phrase) for phrase in (laugh, yeses)]
    [(looped, _), (repeated, _)] = transcripts(triton, clips)
    assert len(looped) <= 40 * len(clips[0]) / 16_000 + 20, looped
    assert normalise(repeated).split().count("yes") >= 4, repeated
