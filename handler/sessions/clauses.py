"""Cutting a reply that is still being written into clauses the voice can speak.

The LM writes a reply into a :class:`ReplyText`; the voice takes the next
clause whenever it is free to voice one, with a length limit it picks then
(:func:`next_clause_chars`): a piece ends at the last sentence end (``.``,
``!``, ``?``, ``…``) within the limit, else at the last clause mark (``,``,
``;``, ``:``, a dash) within it once the piece holds :data:`MIN_CLAUSE_CHARS`,
else, once more text than the limit is waiting, at the last space before the
limit. A mark counts only when whitespace follows it, so "3.5" or "e.g."
inside a word do not cut, and nothing is cut until the character after the
mark has arrived.

The limit follows the audio queued ahead of playback: a piece may be as long
as the voice can voice while the audio already sent plays, so the listener
hears no stall, and it is never shorter than the first piece of a reply
(:data:`MAX_FIRST_CLAUSE_CHARS`, whose voicing is part of the time to first
audio) nor longer than :data:`MAX_CLAUSE_CHARS`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

# Clause marks cut only pieces at least this long: a two-word clause voiced alone
# sounds clipped, and each piece costs one voice call.
MIN_CLAUSE_CHARS = 24
# The longest piece voiced in one call (a reply without punctuation still streams).
MAX_CLAUSE_CHARS = 160
# The first piece of a reply is cut sooner: its voicing time is part of the time to
# first audio, and voicing takes about as long as the text is (docs/sessions.md).
# No later piece is cut shorter: with nothing queued the voice is where it was then.
MAX_FIRST_CLAUSE_CHARS = 20

_SENTENCE_END = re.compile(r"[.!?…]+[\"')\]]*\s")
_CLAUSE_END = re.compile(r"[,;:—–]\s|\s[-—–]\s")


def next_clause_chars(queued_s: float, voice_s_per_char: float) -> int:
    """Length limit, in characters, of the next piece of a reply being voiced.

    Args:
        queued_s: audio sent to the listener and not yet played, seconds (≥ 0).
        voice_s_per_char: how long the voice took per character of the piece
            before, seconds (≥ 0; 0 allows the longest piece); a per-call
            overhead makes it overstate the cost of a longer piece, which errs
            towards shorter pieces.

    Returns:
        ``queued_s / voice_s_per_char`` (the characters the voice can voice
        before the queued audio runs out), within ``[MAX_FIRST_CLAUSE_CHARS,
        MAX_CLAUSE_CHARS]``. This project's rule, measured against a doubling
        limit in docs/PERFORMANCE.md ("Clause limits that follow playback").
    """
    fits = int(queued_s / voice_s_per_char) if voice_s_per_char > 0 else MAX_CLAUSE_CHARS
    return max(MAX_FIRST_CLAUSE_CHARS, min(MAX_CLAUSE_CHARS, fits))


class ReplyText:
    """A reply's text as the LM writes it, handed to the voice a clause at a time.

    One writer calls :meth:`write` and then :meth:`end`; one reader awaits
    :meth:`next_clause`. Clauses are stripped, non-empty and keep every
    character of the text apart from the whitespace between them.
    """

    def __init__(self) -> None:
        self._pending = ""
        self._ended = False
        self._changed = asyncio.Event()

    def write(self, text: str) -> None:
        """Add generated text."""
        self._pending += text
        self._changed.set()

    def end(self) -> None:
        """No more text will come: what is pending is handed out as the last clauses."""
        self._ended = True
        self._changed.set()

    async def next_clause(self, limit: Callable[[], int]) -> str | None:
        """The next clause, at most ``limit()`` characters (≥ 1), once it is complete.

        Waits for text until one can be cut (see the module docstring; a word
        longer than the limit is cut inside). ``limit`` is asked again each time
        text arrives (the audio queued ahead drains while the voice waits).
        Returns ``None`` once the text has ended and all of it was handed out.
        """
        while (clause := self.cut(limit())) is None and not self._ended:
            self._changed.clear()
            await self._changed.wait()
        return clause

    def cut(self, limit: int) -> str | None:
        """The next clause if the text so far ends one (after :meth:`end`: the rest), else None."""
        self._pending = self._pending.lstrip()
        at = self._cut_at(limit) if self._pending else None
        if at is None:
            return None
        clause, self._pending = self._pending[:at].strip(), self._pending[at:]
        return clause

    def _cut_at(self, limit: int) -> int | None:
        within = self._pending[: limit + 1]
        sentence_ends = [m.end() for m in _SENTENCE_END.finditer(within)]
        if sentence_ends:
            return sentence_ends[-1]
        clause_ends = [m.end() for m in _CLAUSE_END.finditer(within) if m.end() >= MIN_CLAUSE_CHARS]
        if clause_ends:
            return clause_ends[-1]
        if len(self._pending) > limit:
            space = self._pending.rfind(" ", 0, limit)
            return space + 1 if space > 0 else limit
        return len(self._pending) if self._ended else None
