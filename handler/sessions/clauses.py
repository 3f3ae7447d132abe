"""Cutting a reply that is still being written into clauses the voice can speak.

A reply is voiced piece by piece while the LM writes it: a piece ends at a
sentence end (``.``, ``!``, ``?``, ``…``), or at a clause mark (``,``, ``;``,
``:``, a dash) once it holds :data:`MIN_CLAUSE_CHARS`, or at the last space
before its length limit: :data:`MAX_FIRST_CLAUSE_CHARS` for the first piece of
a reply, doubling with each piece after it up to :data:`MAX_CLAUSE_CHARS`
(20, 40, 80, 160, ...); a sentence or clause end that arrives in the same
text that passes the limit still wins. A mark counts only when whitespace follows it,
so "3.5" or "e.g." inside a word do not cut, and nothing is cut until the
character after the mark has arrived.
"""

from __future__ import annotations

import re

# Clause marks cut only pieces at least this long: a two-word clause voiced alone
# sounds clipped, and each piece costs one voice call.
MIN_CLAUSE_CHARS = 24
# The longest piece voiced in one call (a reply without punctuation still streams).
MAX_CLAUSE_CHARS = 160
# The first piece of a reply is cut sooner: its voicing time is part of the time to
# first audio, and voicing takes about as long as the text is (docs/sessions.md).
# Each later piece may be twice as long as the limit before it: a piece is voiced
# while the ones before it play, in well under their playing time (Kokoro's RTF is
# about 0.4 on 2 cores, docs/PERFORMANCE.md), so the reply plays without a stall.
MAX_FIRST_CLAUSE_CHARS = 20

_SENTENCE_END = re.compile(r"[.!?…]+[\"')\]]*\s")
_CLAUSE_END = re.compile(r"[,;:—–]\s|\s[-—–]\s")


def max_clause_chars(index: int) -> int:
    """Length limit, in characters, of a reply's piece number ``index`` (0-based, ≥ 0).

    ``MAX_FIRST_CLAUSE_CHARS · 2**index``, at most :data:`MAX_CLAUSE_CHARS`
    (the doubling is this project's choice, measured in docs/PERFORMANCE.md,
    "Growing clause limits").
    """
    return min(MAX_CLAUSE_CHARS, MAX_FIRST_CLAUSE_CHARS * 2**index)


class ClauseSplitter:
    """Accumulates streamed text and hands out finished clauses, in order."""

    def __init__(self) -> None:
        self._pending = ""
        self._cuts = 0

    def push(self, text: str) -> list[str]:
        """Add generated text; returns the clauses it completed (stripped, non-empty)."""
        self._pending += text
        clauses = []
        while (cut := self._next_cut()) is not None:
            clause, self._pending = self._pending[:cut].strip(), self._pending[cut:]
            if clause:
                clauses.append(clause)
                self._cuts += 1
        return clauses

    def flush(self) -> list[str]:
        """The text left when generation ended, as the last clause (or nothing)."""
        rest, self._pending = self._pending.strip(), ""
        return [rest] if rest else []

    def _next_cut(self) -> int | None:
        cuts = [m.end() for m in _SENTENCE_END.finditer(self._pending)][:1]
        cuts += [
            m.end() for m in _CLAUSE_END.finditer(self._pending) if m.end() >= MIN_CLAUSE_CHARS
        ][:1]
        if cuts:
            return min(cuts)
        longest = max_clause_chars(self._cuts)
        if len(self._pending) > longest:
            space = self._pending.rfind(" ", 0, longest)
            return space + 1 if space > 0 else longest
        return None
