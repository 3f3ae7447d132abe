"""What the listener has heard of a reply: playback position and the words heard.

The server sends a reply's audio faster than real time; the client buffers and
plays it. Where the client reports its position (``playback.position`` events)
the last report is used, advanced in real time until the next; otherwise
playback is assumed to start when the first audio message is sent and to run
in real time (a client that underruns its buffer hears less than this
estimate; docs/sessions.md says to report).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from handler.errors import InferenceError, ServiceUnavailable
from handler.transcription import TimedWord

# How long ending an interrupted reply waits for the word timings of the clause
# playing, seconds. They are normally ready (aligned while the clause plays); on a
# machine so busy that the aligner lags behind, the words are taken in proportion to
# the audio played instead, so the ``interrupted`` answer stays prompt (issue #10:
# within 300 ms of the user's speech).
ALIGNMENT_WAIT_S = 0.1

Clock = Callable[[], float]


@dataclass(frozen=True)
class VoicedClause:
    """One voiced piece of a reply.

    Attributes:
        text: what was voiced.
        start_s: its offset in the reply's audio, seconds.
        audio: float32 [n] mono at ``sample_rate`` Hz.
        sample_rate: Hz.
    """

    text: str
    start_s: float
    audio: np.ndarray
    sample_rate: int

    @property
    def end_s(self) -> float:
        """Offset of its last sample's end in the reply's audio, seconds."""
        return self.start_s + len(self.audio) / self.sample_rate


class PlaybackClock:
    """Milliseconds of a reply's audio the listener has heard.

    Args:
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._first_sent: float | None = None
        self._sent_ms = 0.0
        self._reported_ms: float | None = None
        self._reported_at = 0.0

    def sent(self, duration_ms: float) -> None:
        """Record that ``duration_ms`` more audio went to the client."""
        if self._first_sent is None:
            self._first_sent = self._clock()
        self._sent_ms += duration_ms

    def report(self, played_ms: float) -> None:
        """The client's own playback position of this reply, milliseconds."""
        if played_ms >= (self._reported_ms or 0.0):
            self._reported_ms, self._reported_at = played_ms, self._clock()

    @property
    def sent_ms(self) -> float:
        """Milliseconds of audio sent so far."""
        return self._sent_ms

    def played_ms(self) -> float:
        """Milliseconds heard so far, never more than was sent.

        The client's last report plus the real time since it; without reports,
        the real time since the first send.
        """
        if self._reported_ms is not None:
            since_report = (self._clock() - self._reported_at) * 1000.0
            return min(self._reported_ms + since_report, self._sent_ms)
        if self._first_sent is None:
            return 0.0
        return min((self._clock() - self._first_sent) * 1000.0, self._sent_ms)

    def remaining_s(self) -> float:
        """Seconds until everything sent has been played (estimate), at least 0."""
        return max(self._sent_ms - self.played_ms(), 0.0) / 1000.0


Aligner = Callable[[VoicedClause], Awaitable[list[TimedWord]]]


async def heard_text(clauses: Sequence[VoicedClause], played_s: float, align: Aligner) -> str:
    """The reply's text as far as the listener heard it.

    Clauses that finished playing count whole; in the clause playing at
    ``played_s`` only the words whose end was reached count. Word intervals come
    from ``align`` (the forced aligner on that clause's audio); when it fails (an
    error answer, or Triton unreachable) or has not answered within
    :data:`ALIGNMENT_WAIT_S` (it is then cancelled), the clause's words are taken
    in proportion to the share of its audio played.
    Words keep their written form (punctuation included); a written word the
    aligner split counts once all its parts were heard.
    """
    heard = [c.text for c in clauses if c.end_s <= played_s]
    current = next((c for c in clauses if c.start_s < played_s < c.end_s), None)
    if current is not None:
        written = current.text.split()
        into_clause = played_s - current.start_s
        try:
            async with asyncio.timeout(ALIGNMENT_WAIT_S):  # keeps a cancel of the caller
                words = await align(current)
        except (InferenceError, ServiceUnavailable, TimeoutError):
            share = into_clause / (current.end_s - current.start_s)
            heard += written[: int(len(written) * share)]
        else:
            done = [w.text for w in words if w.end <= into_clause]
            heard += _written_prefix(written, done)
    return " ".join(heard)


def _written_prefix(written: list[str], spoken: list[str]) -> list[str]:
    """The written words that the aligner's ``spoken`` words cover, whole words only.

    The aligner may split a written word ("age-old" -> "age", "old") or drop its
    punctuation, so words are matched by their letters and digits: a written
    word counts once all of its letters are in ``spoken``.
    """
    def letters(word: str) -> int:
        return sum(ch.isalnum() for ch in word)

    budget = sum(letters(word) for word in spoken)
    prefix = []
    for word in written:
        budget -= letters(word)
        if budget < 0:
            break
        prefix.append(word)
    return prefix
