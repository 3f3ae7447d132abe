"""Whisper's encoder window on the CPU: transcription time and WER per ``min_encoder_window_s``.

Clips: short replies, the session benchmark's questions and the specs'
sentences, each voiced by both default speakers through the API, bare and
with 0.3 s of silence on both sides (the shape of a session's user turn).
For each window (30 s is Whisper's own) a copy of the exported
``whisper_asr`` with that ``min_encoder_window_s`` runs in its own
tritonserver; every clip is transcribed once, one call at a time. Reported:
mean time per clip and WER, over all clips and over the specs' sentences
alone (voice "0" / voice "1"), side by side in one run.

    python -m benchmarks.asr_window [--windows 30 20 15 10]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.isolated import isolate
from benchmarks.sessions import QUESTIONS
from devtools import REPOSITORY
from devtools.local_stack import LocalStack
from devtools.local_triton import LocalTriton
from devtools.session_client import rendered_speech
from devtools.wer import SPEC_SENTENCES, word_error_rate
from handler.transcription import transcribe
from handler.triton import TritonClient

SHORT_REPLIES = [
    "Yes.", "No thanks.", "Okay, sounds good.", "Tell me more.", "Wait, stop.",
    "Thank you very much.", "Sure.", "Maybe later.", "Go on.", "Hello there.",
    "Not really.", "Of course.", "Why?", "Good morning.", "See you soon.",
]
RATE = 16_000
PADDING_S = 0.3


def variant(root: Path, window_s: int) -> Path:
    """A repository holding only ``whisper_asr`` with ``min_encoder_window_s`` = ``window_s``."""
    target = root / f"window-{window_s}"
    shutil.copytree(REPOSITORY / "whisper_asr", target / "whisper_asr")
    config = target / "whisper_asr" / "config.pbtxt"
    text, count = re.subn(r'(key: "min_encoder_window_s" value \{ string_value: )"[^"]*"',
                          rf'\1"{window_s}"', config.read_text())
    if count != 1:
        raise RuntimeError(f"{config} has no min_encoder_window_s parameter")
    config.write_text(text)
    return target


async def transcripts(url: str, clips: list[np.ndarray]) -> tuple[list[str], float]:
    """Transcript of each clip, one call at a time; and the mean seconds per call."""
    client = TritonClient(url)
    try:
        await transcribe(client, clips[0])
        started = time.perf_counter()
        texts = [(await transcribe(client, clip))[0] for clip in clips]
        return texts, (time.perf_counter() - started) / len(clips)
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, nargs="+", default=[30, 20, 15, 10])
    args = parser.parse_args()
    isolate("converse-asr-window-")
    texts = SHORT_REPLIES + QUESTIONS + SPEC_SENTENCES
    silence = np.zeros(int(PADDING_S * RATE), np.float32)
    clips, references, spec = [], [], []
    with LocalStack(REPOSITORY) as stack:
        for speaker in ("0", "1"):
            for text in texts:
                bare = rendered_speech(stack.base_url, stack.api_key, text, RATE, speaker)
                for clip in (bare, np.concatenate([silence, bare, silence])):
                    spec.append((speaker, text in SPEC_SENTENCES))
                    clips.append(clip)
                    references.append(text)
    rows = []
    with tempfile.TemporaryDirectory(prefix="converse-asr-window-") as scratch:
        for window_s in args.windows:
            with LocalTriton(variant(Path(scratch), window_s)) as triton:
                heard, mean_s = asyncio.run(transcripts(triton.http_url, clips))
            rates = [word_error_rate(references, heard)]
            for speaker in ("0", "1"):
                chosen = [i for i, (s, is_spec) in enumerate(spec) if s == speaker and is_spec]
                rates.append(word_error_rate([references[i] for i in chosen],
                                             [heard[i] for i in chosen]))
            rows.append(f"| {window_s} s | {mean_s * 1000:.0f} | {100 * rates[0]:.1f} % | "
                        f"{100 * rates[1]:.1f} % / {100 * rates[2]:.1f} % |")
    print("\n".join([
        "### Whisper encoder window (what was measured)",
        "",
        f"`python -m benchmarks.asr_window`: {len(clips)} clips ({len(texts)} texts, both",
        f"default voices, bare and with {PADDING_S} s of silence each side), one Whisper-base",
        "call at a time through Triton; the window is the shortest encoder input",
        "(`min_encoder_window_s`), 30 s being Whisper's own.",
        "",
        "| window | ms per clip | WER, all clips | WER, spec sentences (voice 0 / 1) |",
        "|---|---|---|---|",
        *rows,
    ]))


if __name__ == "__main__":
    main()
