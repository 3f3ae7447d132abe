"""Cutting a reply that is still being written into clauses the voice can speak.

A reply is voiced piece by piece while the LM writes it: a piece ends at a
sentence end (``.``, ``!``, ``?``, ``…``), or at a clause mark (``,``, ``;``,
``:``, a dash) once it holds :data:`MIN_CLAUSE_CHARS`, or at the last space
before :data:`MAX_CLAUSE_CHARS` (:data:`MAX_FIRST_CLAUSE_CHARS` for the first
piece of a reply). A mark counts only when whitespace follows it,
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
MAX_FIRST_CLAUSE_CHARS = 32

_SENTENCE_END = re.compile(r"[.!?…]+[\"')\]]*\s")
_CLAUSE_END = re.compile(r"[,;:—–]\s|\s[-—–]\s")


class ClauseSplitter:
    """Accumulates streamed text and hands out finished clauses, in order."""

    def __init__(self) -> None:
        self._pending = ""
        self._cut_any = False

    def push(self, text: str) -> list[str]:
        """Add generated text; returns the clauses it completed (stripped, non-empty)."""
        self._pending += text
        clauses = []
        while (cut := self._next_cut()) is not None:
            clause, self._pending = self._pending[:cut].strip(), self._pending[cut:]
            if clause:
                clauses.append(clause)
                self._cut_any = True
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
        longest = MAX_CLAUSE_CHARS if self._cut_any else MAX_FIRST_CLAUSE_CHARS
        if len(self._pending) > longest:
            space = self._pending.rfind(" ", 0, longest)
            return space + 1 if space > 0 else longest
        return None
