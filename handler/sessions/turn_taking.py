"""Turn-taking: user speech start/stop from per-window VAD speech probabilities.

The rules follow Silero VAD's own streaming iterator (``VADIterator`` in
``silero_vad/utils_vad.py``, snakers4/silero-vad): speech starts at the first
window whose probability reaches ``threshold``; it stops once probabilities stay
below ``threshold - 0.15`` for ``end_silence_ms``; ``speech_pad_ms`` of audio is
kept on both sides. That package's iterator needs torch, which the API process
does not load, so the state machine is re-stated here over plain floats.

Two additions to Silero's rules. Speech that has lasted :data:`MAX_SPEECH_MS`
stops there (a :class:`SpeechStopped` at that window; speech going on starts a
new turn), as Silero's ``get_speech_timestamps`` splits speech longer than its
``max_speech_duration_s``: a turn is at most Whisper's 30 s window, and speech,
noise or a threshold of 0.0 that never falls silent still ends turns. And once
the silence has lasted
:data:`EARLY_END_SILENCE_MS`, a :class:`SpeechPaused` names the end the turn
will have if the silence goes on, so the caller can start transcribing and
replying while it waits for the rest of the end silence; a
:class:`SpeechResumed` says that end is void.

Positions are in samples at :data:`VAD_SAMPLE_RATE` counted from the start of
the stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VAD_SAMPLE_RATE = 16_000
# Samples per VAD window at 16 kHz (Silero VAD's fixed window; DESIGN.md).
VAD_WINDOW = 512
# Silero's hysteresis: speech ends below threshold - 0.15 (VADIterator), floored at 0.01.
NEGATIVE_MARGIN = 0.15
# Silence that ends a user turn; short enough for a reply to feel prompt, long enough
# that a breath between clauses does not end the turn (docs/sessions.md).
END_SILENCE_MS = 500
# Silence after which work on the turn starts, in case it is its end (3 windows). Work
# started at a pause the user speaks on after is thrown away; starting at 96 rather than
# 160 ms gave first audio about 80 ms sooner (docs/PERFORMANCE.md, "Early start").
EARLY_END_SILENCE_MS = 96
# Audio kept before the first and after the last speech window (Silero's default 30 ms).
SPEECH_PAD_MS = 30
# Speech shorter than this is not a turn (Silero's get_speech_timestamps default 250 ms).
MIN_SPEECH_MS = 250
# The longest turn: Whisper transcribes at most 30 s in one window (its encoder's input).
MAX_SPEECH_MS = 30_000


@dataclass(frozen=True)
class SpeechStarted:
    """User speech began at ``sample`` (padding included)."""

    sample: int


@dataclass(frozen=True)
class SpeechStopped:
    """User speech ``[start, end)`` in samples (padding included) has ended.

    ``is_turn`` is False for speech shorter than :data:`MIN_SPEECH_MS` (a cough,
    a click): it interrupts like any speech but is not transcribed. Speech that
    one more window would take past :data:`MAX_SPEECH_MS` stops, silence or not.
    """

    start: int
    end: int
    is_turn: bool


@dataclass(frozen=True)
class SpeechPaused:
    """Silence inside a turn has lasted :data:`EARLY_END_SILENCE_MS`.

    Only speech of at least :data:`MIN_SPEECH_MS` pauses. If no speech comes
    back, the :class:`SpeechStopped` that follows has the same ``start`` and ``end``.
    """

    start: int
    end: int


@dataclass(frozen=True)
class SpeechResumed:
    """Speech came back after a :class:`SpeechPaused` at window ``sample``; that end is void."""

    sample: int


SegmentEvent = SpeechStarted | SpeechPaused | SpeechResumed | SpeechStopped


class SpeechSegmenter:
    """Speech start/stop decisions from VAD probabilities, one window at a time.

    Args:
        threshold: speech probability that starts speech, 0.0-1.0 (the stream's
            ``vad_threshold``); higher needs louder, clearer speech.
        window: samples per probability (:data:`VAD_WINDOW`).
        sample_rate: Hz of the positions (:data:`VAD_SAMPLE_RATE`).
    """

    def __init__(
        self, threshold: float, window: int = VAD_WINDOW, sample_rate: int = VAD_SAMPLE_RATE
    ) -> None:
        self.threshold = threshold
        self.negative_threshold = max(threshold - NEGATIVE_MARGIN, 0.01)
        self.window = window
        self._ms = sample_rate / 1000
        self._position = 0
        self._start: int | None = None
        self._silence_since: int | None = None
        self._paused = False

    @property
    def in_speech(self) -> bool:
        """Whether the user is speaking (speech started and not yet stopped)."""
        return self._start is not None

    def push(self, probability: float) -> SegmentEvent | None:
        """Take the next window's speech probability; returns a decision, if any."""
        window_start = self._position
        self._position += self.window
        pad = int(SPEECH_PAD_MS * self._ms)
        if self._start is None:
            if probability >= self.threshold:
                self._start = max(0, window_start - pad)
                self._silence_since = None
                return SpeechStarted(self._start)
            return None
        if self._position + self.window - self._start > MAX_SPEECH_MS * self._ms:
            start = self._start
            silent_from = self._position if self._silence_since is None else self._silence_since
            end = min(self._position, silent_from + pad)
            self._start = self._silence_since = None
            self._paused = False
            return SpeechStopped(start, end, end - start >= MIN_SPEECH_MS * self._ms)
        if probability >= self.threshold:
            self._silence_since = None
            if self._paused:
                self._paused = False
                return SpeechResumed(window_start)
        elif probability < self.negative_threshold:
            if self._silence_since is None:
                self._silence_since = window_start
            silent = self._position - self._silence_since
            start, end = self._start, self._silence_since + pad
            is_turn = end - start >= MIN_SPEECH_MS * self._ms
            if silent >= END_SILENCE_MS * self._ms:
                self._start = self._silence_since = None
                self._paused = False
                return SpeechStopped(start, end, is_turn)
            if is_turn and not self._paused and silent >= EARLY_END_SILENCE_MS * self._ms:
                self._paused = True
                return SpeechPaused(start, end)
        return None


class RecentAudio:
    """The last ``capacity`` samples of a stream, addressed by stream position, and when they came.

    A ring buffer: appending costs the chunk's length, not the history's. (An
    array grown and re-copied for every 20 ms message made that copy the API
    process's main CPU cost with several sessions open.) Arrival times are kept
    per ``window`` samples (a VAD window), in a second ring: the time each
    window of the samples held was completed, so a turn's figures can count
    from when its last sample of speech reached the server. One time per
    window, not per message: a flood of tiny messages (one sample each) held
    one record per message before, about 100 bytes per 2-byte message.

    Args:
        capacity: samples kept.
        window: samples per arrival time (:data:`VAD_WINDOW`; positions of the
            VAD's window ends are timed exactly).
    """

    def __init__(self, capacity: int, window: int = VAD_WINDOW) -> None:
        self._buffer = np.zeros(capacity, dtype=np.float32)
        self.end = 0
        self.window = window
        # When window w (samples [w * window, (w + 1) * window)) was completed, at w % size.
        self._completed = np.zeros(capacity // window + 2, dtype=np.float64)
        self._latest: float | None = None  # when the last non-empty chunk arrived

    def append(self, samples: np.ndarray, arrived_at: float) -> None:
        """Add float32 [n] samples at the stream's end; ``arrived_at``: when, any clock (s)."""
        kept = samples[-len(self._buffer) :]
        start = self.end + len(samples) - len(kept)
        self._buffer[np.arange(start, start + len(kept)) % len(self._buffer)] = kept
        first, last = self.end // self.window, (self.end + len(samples)) // self.window
        self.end += len(samples)
        if len(samples):
            self._latest = arrived_at
        if last > first:  # windows [first, last) completed by this chunk
            slots = len(self._completed)
            self._completed[np.arange(max(first, last - slots), last) % slots] = arrived_at

    def arrived_at(self, end: int) -> float:
        """When the window holding the sample just before stream position ``end`` was complete.

        ``append``'s clock, seconds. At a window boundary (``end`` a multiple of
        ``window``, as the VAD's positions are) that is when sample ``end - 1``
        arrived; inside a window, when the last of its samples did (the last
        chunk's time while the window is still partial). The time of the oldest
        window still held when that sample is gone.

        Raises:
            ValueError: ``end`` is past the samples received, or nothing was received.
        """
        if end > self.end or self._latest is None:
            raise ValueError(f"sample {end - 1} has not arrived (have up to {self.end})")
        window = max(end - 1, 0) // self.window
        if window >= self.end // self.window:  # not complete yet
            return self._latest
        oldest = max(0, self.end - len(self._buffer)) // self.window  # the oldest held
        return float(self._completed[max(window, oldest) % len(self._completed)])

    def between(self, start: int, end: int) -> np.ndarray:
        """A copy of the stream samples of ``[start, end)`` still held, float32 [k].

        Samples older than the last ``capacity`` are gone: k is ``end - start``
        less those (0 when the whole range is gone).

        Raises:
            ValueError: ``end`` is past the samples received, or ``start > end``.
        """
        if end > self.end or start > end:
            raise ValueError(f"samples [{start}, {end}) are not held (have up to {self.end})")
        held_from = min(max(start, self.end - len(self._buffer)), end)
        return self._buffer[np.arange(held_from, end) % len(self._buffer)]
