"""SQLite backend of :class:`Storage`: one file, safe across threads and processes.

Writes run in ``BEGIN IMMEDIATE`` transactions, so read-modify-write of a
rate-limit bucket or usage row is atomic under concurrent requests.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from handler.storage.base import (
    SESSION_RETENTION_S,
    RateDecision,
    SavedVoice,
    SessionRecord,
    Storage,
    TurnRecord,
    UsageTotals,
    VoicePage,
    encode_cursor,
    expired,
    token_bucket,
    turn_from_json,
    turn_to_json,
    utf8_json,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS voices (
    key_id TEXT NOT NULL, id TEXT NOT NULL, sort_key TEXT NOT NULL, name TEXT NOT NULL,
    model TEXT NOT NULL, voice TEXT, reference_audio_id TEXT, transcript TEXT,
    created_at REAL NOT NULL, PRIMARY KEY (key_id, id));
CREATE INDEX IF NOT EXISTS voices_order ON voices (key_id, sort_key);
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT PRIMARY KEY, requests INTEGER NOT NULL, input_chars INTEGER NOT NULL,
    input_audio_seconds REAL NOT NULL, output_audio_seconds REAL NOT NULL,
    last_request_ts REAL);
CREATE TABLE IF NOT EXISTS rate_buckets (
    key_id TEXT PRIMARY KEY, tokens REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    key_id TEXT NOT NULL, id TEXT NOT NULL, config TEXT NOT NULL, model TEXT NOT NULL,
    voice TEXT NOT NULL, created_at REAL NOT NULL, status TEXT NOT NULL, ended_reason TEXT,
    ended_at REAL, expires_at REAL, seq INTEGER NOT NULL, connection_id TEXT NOT NULL,
    last_turn INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (key_id, id));
CREATE TABLE IF NOT EXISTS turns (
    key_id TEXT NOT NULL, session_id TEXT NOT NULL, turn_id TEXT NOT NULL,
    sort_key TEXT NOT NULL, data TEXT NOT NULL, PRIMARY KEY (key_id, session_id, turn_id));
CREATE INDEX IF NOT EXISTS turns_order ON turns (key_id, session_id, sort_key);
"""
_VOICE_COLUMNS = "id, key_id, name, model, voice, reference_audio_id, transcript, created_at"
_SESSION_COLUMNS = (
    "id, key_id, config, model, voice, created_at, status, ended_reason, ended_at, expires_at, "
    "seq, connection_id, last_turn"
)


def _session(row: tuple[object, ...]) -> SessionRecord:
    values = list(row)
    values[2] = json.loads(str(values[2]))
    return SessionRecord(*values)  # type: ignore[arg-type]


class SQLiteStorage(Storage):
    """Storage in one SQLite file (``:memory:`` is not supported: use a temp file).

    Args:
        path: the database file.
        clock: Unix seconds now (session retention); ``time.time`` unless a test injects one.
        retention_s: how long an ended session stays readable, seconds (30 days).
    """

    def __init__(
        self,
        path: Path,
        clock: Callable[[], float] = time.time,
        retention_s: float = SESSION_RETENTION_S,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.clock = clock
        self.retention_s = retention_s
        self._local = threading.local()
        # executescript manages its own transaction (it commits first).
        self._connection().executescript(_SCHEMA)
        columns = {row[1] for row in self._connection().execute("PRAGMA table_info(sessions)")}
        if "last_turn" not in columns:  # a file made before sessions had it
            try:
                self._connection().execute(
                    "ALTER TABLE sessions ADD COLUMN last_turn INTEGER NOT NULL DEFAULT 0"
                )
            except sqlite3.OperationalError as error:  # another process added it first
                if "duplicate column" not in str(error):
                    raise

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            self._local.connection = connection
        return connection

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def put_voice(self, voice: SavedVoice) -> None:
        """Store a new voice."""
        with self._transaction() as db:
            db.execute(
                f"INSERT INTO voices (sort_key, {_VOICE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    voice.sort_key,
                    voice.id,
                    voice.key_id,
                    voice.name,
                    voice.model,
                    voice.voice,
                    voice.reference_audio_id,
                    voice.transcript,
                    voice.created_at,
                ),
            )

    def get_voice(self, key_id: str, voice_id: str) -> SavedVoice | None:
        """The key's voice with this id, or None."""
        row = (
            self._connection()
            .execute(
                f"SELECT {_VOICE_COLUMNS} FROM voices WHERE key_id = ? AND id = ?",
                (key_id, voice_id),
            )
            .fetchone()
        )
        return SavedVoice(*row) if row else None

    def delete_voice(self, key_id: str, voice_id: str) -> bool:
        """Delete the key's voice; False if it did not exist."""
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM voices WHERE key_id = ? AND id = ?", (key_id, voice_id)
            )
        return cursor.rowcount > 0

    def list_voices(self, key_id: str, limit: int, after: str | None) -> VoicePage:
        """Up to ``limit`` voices in creation order, after the sort key ``after``."""
        rows = (
            self._connection()
            .execute(
                f"SELECT {_VOICE_COLUMNS} FROM voices WHERE key_id = ? AND sort_key > ? "
                "ORDER BY sort_key LIMIT ?",
                (key_id, after or "", limit + 1),
            )
            .fetchall()
        )
        voices = [SavedVoice(*row) for row in rows[:limit]]
        more = len(rows) > limit
        return VoicePage(voices, encode_cursor(voices[-1].sort_key) if more else None)

    def record_usage(
        self,
        key_id: str,
        input_chars: int,
        input_audio_s: float,
        output_audio_s: float,
        now: float,
    ) -> None:
        """Add one request's usage to the key's totals (atomically)."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO usage VALUES (?, 1, ?, ?, ?, ?) ON CONFLICT(key_id) DO UPDATE SET "
                "requests = requests + 1, input_chars = input_chars + excluded.input_chars, "
                "input_audio_seconds = input_audio_seconds + excluded.input_audio_seconds, "
                "output_audio_seconds = output_audio_seconds + excluded.output_audio_seconds, "
                "last_request_ts = excluded.last_request_ts",
                (key_id, input_chars, input_audio_s, output_audio_s, now),
            )

    def get_usage(self, key_id: str) -> UsageTotals:
        """The key's totals (zeros when it has none)."""
        row = (
            self._connection()
            .execute(
                "SELECT requests, input_chars, input_audio_seconds, output_audio_seconds, "
                "last_request_ts FROM usage WHERE key_id = ?",
                (key_id,),
            )
            .fetchone()
        )
        return UsageTotals(key_id, *row) if row else UsageTotals(key_id, 0, 0, 0.0, 0.0, None)

    def take_token(
        self, key_id: str, capacity: int, refill_per_s: float, now: float
    ) -> RateDecision:
        """Atomically take one token from the key's bucket."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT tokens, updated_at FROM rate_buckets WHERE key_id = ?", (key_id,)
            ).fetchone()
            tokens, updated_at = row if row else (float(capacity), now)
            left, stamp, decision = token_bucket(tokens, updated_at, now, capacity, refill_per_s)
            db.execute(
                "INSERT OR REPLACE INTO rate_buckets VALUES (?, ?, ?)", (key_id, left, stamp)
            )
        return decision

    def put_session(self, record: SessionRecord) -> None:
        """Store a new session."""
        with self._transaction() as db:
            db.execute(
                f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    record.id,
                    record.key_id,
                    utf8_json(record.config),
                    record.model,
                    record.voice,
                    record.created_at,
                    record.status,
                    record.ended_reason,
                    record.ended_at,
                    record.expires_at,
                    record.seq,
                    record.connection_id,
                    record.last_turn,
                ),
            )

    def get_session(self, key_id: str, session_id: str) -> SessionRecord | None:
        """The key's session, or None; one past retention is deleted with its turns."""
        row = (
            self._connection()
            .execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE key_id = ? AND id = ?",
                (key_id, session_id),
            )
            .fetchone()
        )
        if row is None:
            return None
        record = _session(row)
        if expired(record, self.clock()):
            with self._transaction() as db:
                db.execute("DELETE FROM sessions WHERE key_id = ? AND id = ?", (key_id, session_id))
                db.execute(
                    "DELETE FROM turns WHERE key_id = ? AND session_id = ?", (key_id, session_id)
                )
            return None
        return record

    def end_session(
        self, key_id: str, session_id: str, reason: str, ended_at: float | None = None
    ) -> SessionRecord | None:
        """End an active session with ``reason`` (at ``ended_at``, else now); start retention."""
        end = self.clock() if ended_at is None else ended_at
        with self._transaction() as db:
            db.execute(
                "UPDATE sessions SET status = 'ended', ended_reason = ?, ended_at = ?, "
                "expires_at = ? WHERE key_id = ? AND id = ? AND status = 'active'",
                (reason, end, end + self.retention_s, key_id, session_id),
            )
        return self.get_session(key_id, session_id)

    def claim_session(self, key_id: str, session_id: str, connection_id: str) -> bool:
        """Make ``connection_id`` the session's live socket; False if it is not active."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE sessions SET connection_id = ? "
                "WHERE key_id = ? AND id = ? AND status = 'active'",
                (connection_id, key_id, session_id),
            )
        return cursor.rowcount > 0

    def reserve_seq(self, key_id: str, session_id: str, count: int) -> int:
        """Atomically reserve ``count`` event sequence numbers; returns the first."""
        with self._transaction() as db:
            row = db.execute(
                "UPDATE sessions SET seq = seq + ? WHERE key_id = ? AND id = ? RETURNING seq",
                (count, key_id, session_id),
            ).fetchone()
        if row is None:
            raise KeyError(session_id)
        return int(row[0]) - count + 1

    def note_turn(self, key_id: str, session_id: str, number: int) -> None:
        """Raise the session's ``last_turn`` to ``number`` (no change if already that high)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE sessions SET last_turn = MAX(last_turn, ?) WHERE key_id = ? AND id = ?",
                (number, key_id, session_id),
            )

    def put_turn(self, key_id: str, session_id: str, turn: TurnRecord) -> None:
        """Insert or replace (same ``turn_id``) one turn of the session."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO turns VALUES (?, ?, ?, ?, ?)",
                (key_id, session_id, turn.turn_id, turn.sort_key, turn_to_json(turn)),
            )

    def list_turns(self, key_id: str, session_id: str) -> list[TurnRecord]:
        """The session's turns ordered by ``n`` ([] past retention)."""
        if self.get_session(key_id, session_id) is None:
            return []
        rows = (
            self._connection()
            .execute(
                "SELECT data FROM turns WHERE key_id = ? AND session_id = ? ORDER BY sort_key",
                (key_id, session_id),
            )
            .fetchall()
        )
        return [turn_from_json(row[0]) for row in rows]
