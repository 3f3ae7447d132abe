"""Text splitting and voice spec parsing for the Kokoro adapter."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from handler.engines.kokoro import (
    VoiceSpecError,
    packed_pieces,
    parse_voice_spec,
    sentence_pieces,
)

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
