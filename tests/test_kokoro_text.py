"""Text splitting and voice spec parsing for the Kokoro adapter."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from handler.engines.kokoro import (
    TOO_MANY_TOKENS,
    KokoroEngine,
    VoiceSpecError,
    halves,
    packed_pieces,
    parse_voice_spec,
    sentence_pieces,
)
from handler.errors import InferenceError
from tests.helpers import AMOUNTS
from tests.robust_fakes import PIECE_SAMPLES, FakeTriton, constant_voice, failing

VOICES = frozenset({"jf_alpha", "jm_kumo"})


def test_blend_weights_are_normalised() -> None:
    assert parse_voice_spec("jf_alpha", VOICES) == "jf_alpha*1"
    assert parse_voice_spec("jf_alpha*0.5+jm_kumo*1.5", VOICES) == "jf_alpha*0.25+jm_kumo*0.75"


@given(st.floats(min_value=1e-12, max_value=1e12), st.floats(min_value=1e-12, max_value=1e12))
def test_a_canonical_blend_parses_again(alpha: float, kumo: float) -> None:
    canonical = parse_voice_spec(f"jf_alpha*{alpha:.17f}+jm_kumo*{kumo:.17f}", VOICES)
    assert "e" not in canonical.replace("jf_alpha", "").replace("jm_kumo", "")
    assert parse_voice_spec(canonical, VOICES)


def test_tiny_blend_weights_are_written_without_an_exponent() -> None:
    assert parse_voice_spec("jf_alpha+jm_kumo*0.0000001", VOICES) == "jf_alpha*1+jm_kumo*0.0000001"


@pytest.mark.parametrize(
    "spec",
    ["", "nobody", "jf_alpha*0", "jf_alpha+jf_alpha", "jf_alpha*-1", "jf_alpha**2", "+",
     "jf_alpha*" + "9" * 400,  # float() overflows to inf
     "jf_alpha*1" + "0" * 308 + "+jm_kumo*0." + "0" * 300 + "1"],  # jm_kumo's share is 0.0
)
def test_bad_voice_specs_are_rejected(spec: str) -> None:
    with pytest.raises(VoiceSpecError):
        parse_voice_spec(spec, VOICES)


def test_split_at_sentence_boundaries() -> None:
    text = "First sentence here. " * 30
    pieces = packed_pieces(sentence_pieces(text, limit=100), limit=100)
    assert all(len(p) <= 100 for p in pieces)
    assert all(p.endswith(".") for p in pieces)


@given(st.text(alphabet="abc ,.!?", min_size=0, max_size=2000))
def test_split_keeps_every_word_and_respects_limit(text: str) -> None:
    pieces = packed_pieces(sentence_pieces(text, limit=50), limit=50)
    assert all(0 < len(p) <= 50 for p in pieces)
    assert "".join("".join(pieces).split()) == "".join(text.split())


@pytest.mark.parametrize(
    ("text", "first", "second"),
    [
        ("One two. Three four five, six seven.", "One two.", "Three four five, six seven."),
        ("One two three, four five six seven", "One two three,", "four five six seven"),
        ("one two three four", "one two", "three four"),
    ],
)
def test_halves_prefer_sentences_then_clauses_then_spaces(
    text: str, first: str, second: str,
) -> None:
    assert halves(text) == (first, second)


@given(st.text(alphabet="ab .,", min_size=1, max_size=80))
def test_halves_keep_every_word_or_refuse_a_single_one(text: str) -> None:
    parts = halves(text)
    if parts is None:
        assert len(text.split()) <= 1
    else:
        assert all(parts) and (parts[0] + " " + parts[1]).split() == text.split()


def test_a_piece_over_the_token_limit_is_voiced_in_parts() -> None:
    """The frontend refuses a piece with too many phoneme tokens; it is cut until each fits."""
    limit_chars = 40  # the stand-in frontend's limit, in characters
    voiced: list[str] = []

    async def frontend(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        text = bytes(inputs["TEXT"].reshape(-1)[0]).decode()
        if len(text) > limit_chars:
            await failing(f"{TOO_MANY_TOKENS} text gives 600 phoneme tokens; limit 510")(inputs)
        voiced.append(text)
        return await constant_voice(inputs)

    fake = FakeTriton()
    fake.behaviours["kokoro"] = frontend
    engine = KokoroEngine("kokoro", frozenset({"jf_alpha"}), 24_000, (0.5, 2.0),
                          ("jf_alpha*1",), pause_ms=0)
    audio = asyncio.run(engine.synthesize(fake, AMOUNTS, "jf_alpha*1", 1.0))  # type: ignore[arg-type]
    assert all(len(text) <= limit_chars for text in voiced)
    assert " ".join(voiced).split() == AMOUNTS.split()
    assert len(audio) == len(voiced) * PIECE_SAMPLES


@pytest.mark.parametrize(
    ("text", "message"),
    [("Supercalifragilistic", f"{TOO_MANY_TOKENS} text gives 600 phoneme tokens; limit 510"),
     ("Two words", "unknown voice 'nobody'")],
)
def test_a_single_word_or_another_error_is_not_cut(text: str, message: str) -> None:
    fake = FakeTriton()
    fake.behaviours["kokoro"] = failing(message)
    engine = KokoroEngine("kokoro", frozenset({"jf_alpha"}), 24_000, (0.5, 2.0),
                          ("jf_alpha*1",), pause_ms=0)
    with pytest.raises(InferenceError):
        asyncio.run(engine.synthesize(fake, text, "jf_alpha*1", 1.0))  # type: ignore[arg-type]
    assert fake.calls == ["kokoro"]
