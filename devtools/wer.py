"""Word error rate of the bundled voices read back by Whisper (tests/test_speech.py, benchmarks)."""

from __future__ import annotations

import re

import jiwer
from sanotts.nano_g2p import cardinal_words

# The specs' own example lines (speechbase-conversation.md, kalpa-converse.md).
SPEC_SENTENCES = [
    "How was your weekend?",
    "Good — I finally caught up on sleep.",
    "Lucky you.",
    "Welcome back to the show.",
    "Glad to be here.",
    "Let's pick up where we left off — episode twelve.",
    "Did you end up trying that recipe?",
    "I did — the timing was the hard part.",
    "Same here. Did you keep the flame low like she said?",
]


def normalise(text: str) -> str:
    """Lower case, digits spelled out, punctuation dropped (WER normalisation)."""
    text = re.sub(r"\d+", lambda m: f" {cardinal_words(int(m.group(0)))} ", text.lower())
    return " ".join(re.sub(r"[^a-z' ]+", " ", text.replace("-", " ")).split())


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER (jiwer) after :func:`normalise` on both sides."""
    return float(jiwer.wer([normalise(r) for r in references], [normalise(h) for h in hypotheses]))
