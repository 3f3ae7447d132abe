"""Adapters for the speech-understanding models in Triton: ``whisper_asr`` and ``aligner``.

Both take 16 kHz mono float32 audio; callers resample first
(:data:`SPEECH_SAMPLE_RATE`). Word intervals are seconds from the clip's start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from handler.triton import TritonClient

SPEECH_SAMPLE_RATE = 16_000
ASR_MODEL = "whisper_asr"
ALIGNER_MODEL = "aligner"


@dataclass(frozen=True)
class TimedWord:
    """One word and its interval in seconds."""

    text: str
    start: float
    end: float


def _words(payload: np.ndarray) -> list[TimedWord]:
    items = json.loads(bytes(payload.reshape(-1)[0]).decode("utf-8"))
    return [TimedWord(str(i["word"]), float(i["start"]), float(i["end"])) for i in items]


async def transcribe(
    triton: TritonClient, audio_16k: np.ndarray, language: str = "en"
) -> tuple[str, list[TimedWord]]:
    """Transcript and word timestamps of 16 kHz mono float32 audio.

    Args:
        triton: the API's Triton client.
        audio_16k: float32 [n] mono at 16 kHz in [-1, 1].
        language: ISO 639-1 code of the speech (Whisper's language token).

    Raises:
        ServiceUnavailable, InferenceError: from the Triton client.
    """
    outputs = await triton.infer(
        ASR_MODEL,
        {
            "AUDIO": audio_16k.astype(np.float32),
            "LANGUAGE": np.array([language.encode("utf-8")], dtype=np.object_),
        },
        ["TEXT", "WORDS"],
    )
    text = bytes(outputs["TEXT"].reshape(-1)[0]).decode("utf-8")
    return text, _words(outputs["WORDS"])


async def align(triton: TritonClient, audio_16k: np.ndarray, text: str) -> list[TimedWord]:
    """Word intervals of ``text`` forced-aligned on 16 kHz mono float32 audio.

    Raises:
        InferenceError: the alignment failed (Triton error answer).
        ServiceUnavailable: Triton unreachable.
    """
    outputs = await triton.infer(
        ALIGNER_MODEL,
        {
            "AUDIO": audio_16k.astype(np.float32),
            "TEXT": np.array([text.encode("utf-8")], dtype=np.object_),
        },
        ["WORDS"],
    )
    return _words(outputs["WORDS"])
