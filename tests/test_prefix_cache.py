"""The LM loops' prefix cache (``PrefixCache`` in model_repository/common/converse_backend.py).

``generate`` runs here over a step function standing in for a step graph: its
"KV cache" holds the ids fed so far, one position each, and it picks the next
id from all of them in order, so a cache sliced at the wrong position or a
prefill that skips or repeats an id changes what is generated. The real step
graph with the cache runs in tests/test_chat.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

VOCAB = 50


class StepGraph:
    """A step graph stand-in; ``prefills`` records how many ids each call was given."""

    def __init__(self) -> None:
        self.prefills: list[int] = []

    def __call__(self, network: str, inputs: dict[str, np.ndarray],
                 names: list[str]) -> list[np.ndarray]:
        ids = inputs["input_ids"][0]
        self.prefills.append(len(ids))
        keys = np.concatenate(
            [inputs["past_keys"], ids.astype(np.float32).reshape(1, 1, 1, -1, 1)], axis=3)
        history = keys.reshape(-1).astype(np.int64)
        chosen = int(np.sum(history * np.arange(1, len(history) + 1)) % VOCAB)
        logits = np.full((1, VOCAB), -1.0, np.float32)
        logits[0, chosen] = 1.0
        return [logits, keys, keys.copy()]


def run(backend: Any, monkeypatch: pytest.MonkeyPatch, prompt: list[int],
        cache: Any = None) -> tuple[list[int], list[int]]:
    """Generated ids (greedy, 6 at most) and the id counts of each step call.

    Also checks the ``usage`` the loop reports against the prefill it made.
    """
    step = StepGraph()
    monkeypatch.setattr(backend, "infer", step)
    usage: dict[str, int] = {}
    generated = list(backend.generate(
        "lm", (1, 1, 1, 0, 1), prompt, max_context=100, max_new_tokens=6, stop_ids=set(),
        temperature=0.0, top_k=0, seed=0, prefix_cache=cache, usage=usage))
    assert usage == {"prompt_tokens": len(prompt),
                     "cached_tokens": len(prompt) - step.prefills[0]}
    return generated, step.prefills


def test_a_prompt_that_continues_an_earlier_one_is_prefilled_only_past_it(
    backend: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = backend.PrefixCache(4)
    first = [1, 2, 3, 4, 5]
    reply, _ = run(backend, monkeypatch, first, cache)
    later = first + reply + [7, 8, 9]
    warm, prefills = run(backend, monkeypatch, later, cache)
    cold, cold_prefills = run(backend, monkeypatch, later)
    assert warm == cold
    # The earlier generation fed its prompt and every generated id but the last.
    assert prefills[0] == len(later) - (len(first) + len(reply) - 1) == 4
    assert cold_prefills[0] == len(later)


def test_as_many_conversations_as_entries_taking_turns_all_find_their_last_turn(
    backend: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A conversation's next turn drops the entry of its turn before (it holds all of it);
    # otherwise each conversation kept two and the third one's were pushed out.
    cache = backend.PrefixCache(3)
    prompts = {name: [first, 20 + first, 30 + first] for name, first in
               (("a", 1), ("b", 2), ("c", 3))}
    for _turn in range(3):
        for name, prompt in prompts.items():
            reply, prefills = run(backend, monkeypatch, prompt, cache)
            if len(prompt) > 3:
                assert prefills[0] == 1 + 3, name  # the reply's last id (never fed), the turn
            prompts[name] = prompt + reply + [40, 41, 42]


def test_a_prompt_already_cached_whole_still_prefills_its_last_id(
    backend: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = backend.PrefixCache(2)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    first, _ = run(backend, monkeypatch, prompt, cache)
    again, prefills = run(backend, monkeypatch, prompt, cache)
    assert again == first and prefills[0] == 1


def test_a_prompt_that_differs_early_shares_only_the_common_part(
    backend: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = backend.PrefixCache(2)
    run(backend, monkeypatch, [1, 2, 3, 4, 5, 6], cache)
    warm, prefills = run(backend, monkeypatch, [1, 2, 9, 4, 5, 6], cache)
    assert prefills[0] == 4
    assert warm == run(backend, monkeypatch, [1, 2, 9, 4, 5, 6])[0]


def test_the_least_recently_used_entry_is_evicted(
    backend: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = backend.PrefixCache(3)
    run(backend, monkeypatch, [1, 1, 1, 1], cache)
    run(backend, monkeypatch, [2, 2, 2, 2], cache)
    # Uses the [1, ...] entry (so it is no longer the oldest used) and adds a third.
    assert run(backend, monkeypatch, [1, 1, 1, 1, 7], cache)[1][0] == 1
    run(backend, monkeypatch, [3, 3, 3, 3], cache)  # a fourth: the [2, ...] entry goes
    assert run(backend, monkeypatch, [2, 2, 2, 2, 7], cache)[1][0] == 5


def test_a_cache_of_no_entries_keeps_nothing(backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = backend.PrefixCache(0)
    prompt = [4, 4, 4, 4]
    first, _ = run(backend, monkeypatch, prompt, cache)
    again, prefills = run(backend, monkeypatch, prompt, cache)
    assert again == first and prefills[0] == len(prompt)
