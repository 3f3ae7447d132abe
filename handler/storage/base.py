"""The storage interface and its records.

Every method is synchronous (sqlite3 and boto3 are); async callers run them in
a thread. Each backend must pass ``tests/test_storage.py``, which is written
against this interface only.
"""

from __future__ import annotations

import abc
import base64
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SavedVoice:
    """A saved voice owned by one API key.

    Attributes:
        id: UUID string.
        key_id: owner (first 16 hex digits of the key's SHA-256).
        name: display name.
        model: model id the voice belongs to.
        voice: the model's voice spec (e.g. a Kokoro blend), or None for clips.
        reference_audio_id: uploaded reference clip id (codec models), or None.
        transcript: the reference clip's transcript, or None.
        created_at: creation time, Unix seconds.
    """

    id: str
    key_id: str
    name: str
    model: str
    voice: str | None
    reference_audio_id: str | None
    transcript: str | None
    created_at: float

    @property
    def sort_key(self) -> str:
        """Listing order: creation time (ns, zero-padded) then id."""
        return f"{round(self.created_at * 1e9):020d}#{self.id}"


@dataclass(frozen=True)
class VoicePage:
    """One page of a voice listing."""

    voices: list[SavedVoice]
    next_cursor: str | None

    @property
    def has_more(self) -> bool:
        """True when another page follows."""
        return self.next_cursor is not None


@dataclass(frozen=True)
class UsageTotals:
    """Accumulated usage of one API key (seconds of audio, characters of text)."""

    key_id: str
    requests: int
    input_chars: int
    input_audio_seconds: float
    output_audio_seconds: float
    last_request_ts: float | None


@dataclass(frozen=True)
class RateDecision:
    """Outcome of taking one token from a key's bucket.

    Attributes:
        allowed: whether the request may proceed.
        limit: bucket capacity (requests).
        remaining: whole tokens left after this request.
        reset_s: seconds until the bucket is full again.
        retry_after_s: seconds until one token is available (0 when allowed).
    """

    allowed: bool
    limit: int
    remaining: int
    reset_s: float
    retry_after_s: float


def token_bucket(
    tokens: float, updated_at: float, now: float, capacity: int, refill_per_s: float
) -> tuple[float, RateDecision]:
    """Refill a token bucket to ``now`` and try to take one token.

    Returns:
        (tokens left, decision). Classic token bucket: ``capacity`` burst,
        ``refill_per_s`` tokens per second.
    """
    available = min(float(capacity), tokens + max(0.0, now - updated_at) * refill_per_s)
    allowed = available >= 1.0
    left = available - 1.0 if allowed else available
    reset_s = (capacity - left) / refill_per_s
    retry_after = 0.0 if allowed else (1.0 - left) / refill_per_s
    decision = RateDecision(allowed, capacity, math.floor(left), reset_s, retry_after)
    return left, decision


def encode_cursor(sort_key: str) -> str:
    """Opaque pagination cursor for a sort key."""
    return base64.urlsafe_b64encode(sort_key.encode()).decode()


def decode_cursor(cursor: str) -> str:
    """Sort key of a cursor.

    Raises:
        ValueError: not a cursor this service issued.
    """
    try:
        sort_key = base64.urlsafe_b64decode(cursor.encode()).decode()
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError("invalid cursor") from error
    if "#" not in sort_key or not sort_key.split("#", 1)[0].isdigit():
        raise ValueError("invalid cursor")
    return sort_key


class Storage(abc.ABC):
    """Saved voices, usage totals and rate-limit buckets, keyed by API key id."""

    @abc.abstractmethod
    def put_voice(self, voice: SavedVoice) -> None:
        """Store a new voice."""

    @abc.abstractmethod
    def get_voice(self, key_id: str, voice_id: str) -> SavedVoice | None:
        """The key's voice with this id, or None."""

    @abc.abstractmethod
    def delete_voice(self, key_id: str, voice_id: str) -> bool:
        """Delete the key's voice; False if it did not exist."""

    @abc.abstractmethod
    def list_voices(self, key_id: str, limit: int, after: str | None) -> VoicePage:
        """Up to ``limit`` voices in creation order, after the sort key ``after``."""

    @abc.abstractmethod
    def record_usage(
        self,
        key_id: str,
        input_chars: int,
        input_audio_s: float,
        output_audio_s: float,
        now: float,
    ) -> None:
        """Add one request's usage to the key's totals (atomically)."""

    @abc.abstractmethod
    def get_usage(self, key_id: str) -> UsageTotals:
        """The key's totals (zeros when it has none)."""

    @abc.abstractmethod
    def take_token(
        self, key_id: str, capacity: int, refill_per_s: float, now: float
    ) -> RateDecision:
        """Atomically take one token from the key's bucket (see :func:`token_bucket`)."""
