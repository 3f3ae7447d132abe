"""The LM loops' repetition penalty falls on both spellings of a seen word.

``penalise_repetition`` and ``spelling_variants`` in
model_repository/common/converse_backend.py; the chat model through Triton
with the bundled LM is in tests/test_chat.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from devtools.tiny_models import char_tokenizer

PENALTY = 1.3
WORDS = ("to", "Ġto", "Ġthere", "Ġ,", ",", "<unk>")


def byte_level_tokenizer() -> Any:
    """A byte-level tokenizer whose vocabulary is :data:`WORDS` (ids in that order)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tokenizer


def test_a_word_is_paired_with_its_spaced_spelling(backend: Any) -> None:
    tokenizer = byte_level_tokenizer()
    assert tokenizer.encode(" to", add_special_tokens=False).tokens == ["Ġto"]
    variants = backend.spelling_variants(tokenizer)
    to, spaced_to = WORDS.index("to"), WORDS.index("Ġto")
    assert variants[to] == spaced_to and variants[spaced_to] == to
    # " there" has no unspaced twin; punctuation and special tokens are not words.
    assert [variants[WORDS.index(w)] for w in ("Ġthere", "Ġ,", ",", "<unk>")] == [-1] * 4


def test_a_character_level_vocabulary_has_no_variants(backend: Any) -> None:
    tokenizer, vocab = char_tokenizer()
    variants = backend.spelling_variants(tokenizer.backend_tokenizer)
    assert len(variants) == max(vocab.values()) + 1
    assert np.all(variants == -1)


def transformers_penalty(logits: np.ndarray, seen: list[int]) -> np.ndarray:
    """transformers' CTRL processor on ``seen`` (the reference rule)."""
    scores = RepetitionPenaltyLogitsProcessor(PENALTY)(torch.tensor([seen]),
                                                       torch.tensor(logits[None]))
    return np.asarray(scores[0].numpy())


def test_the_penalty_falls_on_both_spellings_of_a_seen_word(backend: Any) -> None:
    variants = backend.spelling_variants(byte_level_tokenizer())
    logits = np.array([4.0, 6.0, -2.0, 1.0, 0.5, -1.0], np.float32)
    seen = [WORDS.index("Ġto"), WORDS.index("Ġthere")]

    penalised = backend.penalise_repetition(logits, seen, PENALTY, variants)
    # The unspaced "to" is penalised as if it had been seen too; nothing else is.
    expected = transformers_penalty(logits, [*seen, WORDS.index("to")])
    np.testing.assert_allclose(penalised, expected, rtol=1e-6)
    assert penalised[1] > penalised[0]
    # Without the table the rule is transformers' own.
    np.testing.assert_allclose(backend.penalise_repetition(logits, seen, PENALTY),
                               transformers_penalty(logits, seen), rtol=1e-6)


@pytest.mark.parametrize("penalty", [1.0, PENALTY])
def test_no_penalty_or_nothing_seen_leaves_the_logits(backend: Any, penalty: float) -> None:
    variants = backend.spelling_variants(byte_level_tokenizer())
    logits = np.array([4.0, 6.0, -2.0, 1.0, 0.5, -1.0], np.float32)
    seen = [WORDS.index("Ġto")] if penalty == 1.0 else []
    np.testing.assert_array_equal(backend.penalise_repetition(logits, seen, penalty, variants),
                                  logits)
