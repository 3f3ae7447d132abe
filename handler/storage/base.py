"""The storage interface and its records.

Every method is synchronous (sqlite3 and boto3 are); async callers run them in
a thread. Each backend must pass ``tests/test_storage.py``, which is written
against this interface only.
"""

from __future__ import annotations

import abc
import base64
import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


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
) -> tuple[float, float, RateDecision]:
    """Refill a token bucket to ``now`` and try to take one token.

    Classic token bucket: ``capacity`` burst, ``refill_per_s`` tokens per second.

    Args:
        tokens: tokens stored with the bucket.
        updated_at: the bucket's stored time, Unix seconds.
        now: when the request arrived, Unix seconds; may be before ``updated_at``
            when a request reaches storage after a later one.
        capacity: burst size (tokens).
        refill_per_s: tokens added per second.

    Returns:
        (tokens left, the bucket's new time, decision). The new time is
        ``max(now, updated_at)`` and is what must be stored: storing an earlier
        ``now`` would credit the refill since then a second time.
    """
    now = max(now, updated_at)
    available = min(float(capacity), tokens + (now - updated_at) * refill_per_s)
    allowed = available >= 1.0
    left = available - 1.0 if allowed else available
    reset_s = (capacity - left) / refill_per_s
    retry_after = 0.0 if allowed else (1.0 - left) / refill_per_s
    decision = RateDecision(allowed, capacity, math.floor(left), reset_s, retry_after)
    return left, now, decision


_VOICE_ID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"  # str(uuid.uuid4())
_VOICE_ID_PATTERN = re.compile(_VOICE_ID)
_SORT_KEY_PATTERN = re.compile(f"[0-9]{{20}}#{_VOICE_ID}")  # SavedVoice.sort_key


def is_voice_id(text: str) -> bool:
    """True when ``text`` has the shape of a saved voice's id (a lower-case UUID string)."""
    return _VOICE_ID_PATTERN.fullmatch(text) is not None


def encode_cursor(sort_key: str) -> str:
    """Opaque pagination cursor for a sort key."""
    return base64.urlsafe_b64encode(sort_key.encode()).decode()


def decode_cursor(cursor: str) -> str:
    """Sort key of a cursor.

    Raises:
        ValueError: not a cursor this service issued (it does not decode to a
            :attr:`SavedVoice.sort_key`: 20 digits, ``#``, a voice id).
    """
    try:
        sort_key = base64.urlsafe_b64decode(cursor.encode()).decode()
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError("invalid cursor") from error
    # Only a key of the stored shape reaches storage: DynamoDB refuses keys over 1024 bytes.
    if _SORT_KEY_PATTERN.fullmatch(sort_key) is None:
        raise ValueError("invalid cursor")
    return sort_key


@dataclass(frozen=True)
class SessionRecord:
    """A live conversation session (``POST /v1/conversations/create``).

    Attributes:
        id: ``conv_<32 hex>``.
        key_id: owner (first 16 hex digits of the key's SHA-256).
        config: the stored create request (``voice_id``, ``system_prompt``,
            ``language``, ``tools``, ``context_window``, ``max_turns``), JSON-able.
        model: API model id that voices the replies.
        voice: canonical voice spec of ``model`` (a bundled voice or blend).
        created_at: Unix seconds.
        status: ``active`` or ``ended``.
        ended_reason: why it ended (``deleted``, ``max_turns``, ...), None while active.
        ended_at: Unix seconds, None while active.
        expires_at: Unix seconds after which the session and its turns are gone:
            ``ended_at`` + retention once ended; while active, the latest end
            the session can have + retention (an abandoned session still goes).
        seq: last event sequence number reserved (see :meth:`Storage.reserve_seq`).
        connection_id: id of the socket that holds the session, '' when none did.
        last_turn: the highest turn number (``turn_<n>``) sent to a client, stored
            or not (see :meth:`Storage.note_turn`), so a later socket numbers on
            above it.
    """

    id: str
    key_id: str
    config: dict[str, Any]
    model: str
    voice: str
    created_at: float
    status: str = "active"
    ended_reason: str | None = None
    ended_at: float | None = None
    expires_at: float | None = None
    seq: int = 0
    connection_id: str = ""
    last_turn: int = 0


SESSION_RETENTION_S = 30 * 86400.0  # kalpa spec: history stays 30 days after deletion
_TURN_ID = re.compile(r"^turn_([0-9]{1,9})$")


def turn_number(turn_id: str) -> int:
    """The ``n`` of a turn id ``turn_<n>``.

    Raises:
        ValueError: ``turn_id`` is not ``turn_<n>``.
    """
    match = _TURN_ID.match(turn_id)
    if match is None:
        raise ValueError(f"turn id {turn_id!r} is not turn_<n>")
    return int(match.group(1))


@dataclass(frozen=True)
class TurnRecord:
    """One stored turn of a session.

    Attributes:
        turn_id: ``turn_<n>``, n monotonic per session (turns are listed by n).
        role: ``user``, ``assistant`` or ``tool``.
        text: user transcript, assistant text (only the words heard when
            interrupted) or the tool result's content.
        started_at, ended_at: Unix seconds (``ended_at`` None while in progress).
        audio_ms: milliseconds of audio in the turn (user speech or reply audio).
        interrupted: True when the reply was cut off by the user.
        played_ms: milliseconds of the reply the client reported as played.
        tool_calls: the model's calls, ``[{"id", "name", "arguments", "text_offset"}]``
            (``text_offset``: characters of ``text`` written before the call).
        tool_call_id: for a ``tool`` turn, the call it answers.
        latency_ms: named latency figures of the turn in milliseconds
            (e.g. ``asr``, ``first_token``, ``first_audio``).
    """

    turn_id: str
    role: str
    text: str
    started_at: float
    ended_at: float | None = None
    audio_ms: float = 0.0
    interrupted: bool = False
    played_ms: float | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    tool_call_id: str | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)

    @property
    def index(self) -> int:
        """The turn's ``n``.

        Raises:
            ValueError: ``turn_id`` is not ``turn_<n>``.
        """
        return turn_number(self.turn_id)

    @property
    def sort_key(self) -> str:
        """Listing order: ``n`` zero-padded."""
        return f"{self.index:09d}"


def expired(record: SessionRecord, now: float) -> bool:
    """True when the session's retention has passed at ``now`` (Unix seconds)."""
    return record.expires_at is not None and record.expires_at <= now


class SessionStore(abc.ABC):
    """Sessions and their turns, keyed by API key id; retention by an injected clock.

    ``clock`` returns Unix seconds; an ended session and its turns disappear
    ``retention_s`` after it ended (reads return None / [] from then on, and a
    backend may delete them lazily: SQLite on access, DynamoDB by TTL).
    """

    clock: Callable[[], float]
    retention_s: float

    @abc.abstractmethod
    def put_session(self, record: SessionRecord) -> None:
        """Store a new session."""

    @abc.abstractmethod
    def get_session(self, key_id: str, session_id: str) -> SessionRecord | None:
        """The key's session, or None (unknown, another key's, or past retention)."""

    @abc.abstractmethod
    def end_session(
        self, key_id: str, session_id: str, reason: str, ended_at: float | None = None
    ) -> SessionRecord | None:
        """End an active session with ``reason`` and start its retention from its end.

        Args:
            key_id: the owning key's id.
            session_id: the session's id (``conv_…``).
            reason: its ``ended_reason`` (``deleted``, ``max_turns``, ...).
            ended_at: when it ended, Unix seconds; None: now. A session found past its
                maximum length ended at that length, not when it was found.

        Returns:
            The session afterwards (unchanged when it had already ended), or None
            when there is no such session.
        """

    @abc.abstractmethod
    def claim_session(self, key_id: str, session_id: str, connection_id: str) -> bool:
        """Make ``connection_id`` the session's live socket; False if it is not active."""

    @abc.abstractmethod
    def reserve_seq(self, key_id: str, session_id: str, count: int) -> int:
        """Atomically reserve ``count`` event sequence numbers.

        Returns:
            The first reserved number (the previous last + 1); the session's
            stored ``seq`` becomes first + count - 1, so a later reservation,
            from this process or another, continues above it.

        Raises:
            KeyError: no such session.
        """

    @abc.abstractmethod
    def note_turn(self, key_id: str, session_id: str, number: int) -> None:
        """Raise the session's ``last_turn`` to ``number`` (≥ 1), atomically.

        No change when it is already that high or the session is gone.
        """

    @abc.abstractmethod
    def put_turn(self, key_id: str, session_id: str, turn: TurnRecord) -> None:
        """Insert or replace (same ``turn_id``) one turn of the session."""

    @abc.abstractmethod
    def list_turns(self, key_id: str, session_id: str) -> list[TurnRecord]:
        """The session's turns ordered by ``n`` ([] past retention)."""


def utf8_json(value: Any) -> str:
    r"""``value`` as compact JSON text, characters outside ASCII kept as they are.

    Not escaped, because ``\u20ac`` takes 6 bytes where UTF-8's ``€`` takes 3,
    and a DynamoDB item holds 400 KB. A lone surrogate (which UTF-8 cannot
    encode; a chat endpoint's JSON may carry one) is escaped, in a value that
    has one, so the text always encodes as UTF-8.
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(value, separators=(",", ":"))
    return text


def turn_to_json(turn: TurnRecord) -> str:
    """A turn as JSON text (how both backends store its fields; :func:`utf8_json`)."""
    return utf8_json(asdict(turn))


def turn_from_json(text: str) -> TurnRecord:
    """The turn stored by :func:`turn_to_json`."""
    return TurnRecord(**json.loads(text))


class Storage(SessionStore):
    """Saved voices, usage totals, rate-limit buckets and sessions, keyed by API key id."""

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
        """Atomically take one token from the key's bucket (see :func:`token_bucket`).

        ``now`` is when the request arrived (Unix seconds); one stamped before the
        bucket's stored time refills nothing and leaves that time as it is.
        """
