"""Session and turn storage, run against both backends (SQLite, DynamoDB under moto)."""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from handler.sessions.protocol import MAX_TOOL_OUTPUT_CHARS
from handler.sessions.service import MAX_CONFIG_BYTES
from handler.storage.base import (
    SESSION_RETENTION_S,
    SessionRecord,
    Storage,
    TurnRecord,
    turn_to_json,
)
from handler.storage.dynamodb import TTL_ATTRIBUTE, DynamoDBStorage
from handler.storage.sqlite import SQLiteStorage

TABLES = ("voices", "usage", "rates", "sessions")
DAY = 86400.0


class Clock:
    """A settable clock (Unix seconds)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(1_800_000_000.0)


@pytest.fixture(params=["sqlite", "dynamodb"])
def storage(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Iterator[Storage]:
    if request.param == "sqlite":
        yield SQLiteStorage(tmp_path / "state.db", clock=clock)
        return
    with mock_aws():
        resource = boto3.resource("dynamodb", region_name="us-east-1")
        DynamoDBStorage.create_tables(resource, *TABLES)
        yield DynamoDBStorage(resource, *TABLES, clock=clock)


def session(clock: Clock, session_id: str = "conv_1", key_id: str = "key-a") -> SessionRecord:
    return SessionRecord(
        id=session_id,
        key_id=key_id,
        config={"voice_id": "jf_alpha", "tools": [], "max_turns": None},
        model="kokoro",
        voice="jf_alpha*1",
        created_at=clock.now,
    )


def turn(n: int, role: str = "user", text: str = "hello") -> TurnRecord:
    return TurnRecord(turn_id=f"turn_{n}", role=role, text=text, started_at=1.0 + n)


def test_session_round_trip_and_owner_isolation(storage: Storage, clock: Clock) -> None:
    record = session(clock)
    storage.put_session(record)
    assert storage.get_session("key-a", "conv_1") == record
    assert storage.get_session("key-b", "conv_1") is None
    assert storage.get_session("key-a", "conv_2") is None
    assert storage.end_session("key-b", "conv_1", "deleted") is None


def test_turns_listed_by_number_and_replaced_by_id(storage: Storage, clock: Clock) -> None:
    storage.put_session(session(clock))
    for n in (10, 2, 1):
        storage.put_turn("key-a", "conv_1", turn(n))
    storage.put_turn(
        "key-a",
        "conv_1",
        TurnRecord(
            "turn_2", "assistant", "Hi the", 3.0, 4.0, 900.0, True, 450.0,
            [{"id": "call_1", "name": "lookup", "arguments": "{}"}], None, {"first_audio": 610.0},
        ),
    )
    turns = storage.list_turns("key-a", "conv_1")
    assert [t.turn_id for t in turns] == ["turn_1", "turn_2", "turn_10"]
    assert turns[1].interrupted and turns[1].played_ms == 450.0 and turns[1].text == "Hi the"
    assert turns[1].tool_calls[0]["name"] == "lookup"
    assert storage.list_turns("key-b", "conv_1") == []


@pytest.mark.parametrize("character", ["€", "😀", "\x01", "a"])
def test_the_longest_tool_result_a_socket_takes_is_stored(
    storage: Storage, clock: Clock, character: str
) -> None:
    """Whatever its characters: on DynamoDB the turn must fit one item (400 KB).

    (Escaped to ASCII, 65,536 emoji took 786 KB.)
    """
    storage.put_session(session(clock))
    result = TurnRecord("turn_2", "tool", character * MAX_TOOL_OUTPUT_CHARS, 3.0,
                        tool_call_id="c" * 128)
    storage.put_turn("key-a", "conv_1", result)
    assert storage.list_turns("key-a", "conv_1") == [result]


def test_a_configuration_at_its_size_cap_is_stored(storage: Storage, clock: Clock) -> None:
    """Kept as UTF-8: escaped to ASCII, 87,000 euro signs took 522 KB, over an item's 400 KB."""
    record = session(clock)
    record.config["tools"] = [{"description": "\u20ac" * (MAX_CONFIG_BYTES // 3 - 100)}]
    storage.put_session(record)
    stored = storage.get_session("key-a", "conv_1")
    assert stored is not None and stored.config == record.config


def test_turns_are_stored_as_utf8_json_and_a_lone_surrogate_still_round_trips(
    storage: Storage, clock: Clock
) -> None:
    assert "Café €" in turn_to_json(turn(1, text="Café €"))
    storage.put_session(session(clock))
    odd = turn(2, role="assistant", text="half an emoji: \ud83d, then é")
    storage.put_turn("key-a", "conv_1", odd)
    assert storage.list_turns("key-a", "conv_1") == [odd]


def test_end_keeps_history_for_30_days_then_it_is_gone(storage: Storage, clock: Clock) -> None:
    storage.put_session(session(clock))
    storage.put_turn("key-a", "conv_1", turn(1))
    clock.now += 60
    ended = storage.end_session("key-a", "conv_1", "deleted")
    assert ended is not None and ended.status == "ended" and ended.ended_reason == "deleted"
    assert ended.ended_at == clock.now and ended.expires_at == clock.now + SESSION_RETENTION_S
    again = storage.end_session("key-a", "conv_1", "idle_timeout")
    assert again is not None and again.ended_reason == "deleted"
    assert not storage.claim_session("key-a", "conv_1", "socket-2")
    clock.now += 30 * DAY - 1
    assert storage.get_session("key-a", "conv_1") is not None
    assert len(storage.list_turns("key-a", "conv_1")) == 1
    clock.now += 1
    assert storage.get_session("key-a", "conv_1") is None
    assert storage.list_turns("key-a", "conv_1") == []


def test_an_end_in_the_past_starts_retention_then(storage: Storage, clock: Clock) -> None:
    storage.put_session(session(clock))
    end = clock.now + 3600
    clock.now += 20 * DAY
    ended = storage.end_session("key-a", "conv_1", "max_duration", ended_at=end)
    assert ended is not None and ended.ended_at == end
    assert ended.expires_at == end + SESSION_RETENTION_S
    clock.now = end + SESSION_RETENTION_S
    assert storage.get_session("key-a", "conv_1") is None


def test_dynamodb_ttl_attribute_is_on_session_and_turns(clock: Clock) -> None:
    with mock_aws():
        resource = boto3.resource("dynamodb", region_name="us-east-1")
        DynamoDBStorage.create_tables(resource, *TABLES)
        store = DynamoDBStorage(resource, *TABLES, clock=clock)
        ttl = resource.meta.client.describe_time_to_live(TableName="sessions")
        assert ttl["TimeToLiveDescription"]["AttributeName"] == TTL_ATTRIBUTE
        store.put_session(session(clock))
        store.put_turn("key-a", "conv_1", turn(1))
        store.end_session("key-a", "conv_1", "deleted")
        store.put_turn("key-a", "conv_1", turn(2))
        items = resource.Table("sessions").scan()["Items"]
        assert len(items) == 3
        assert {float(item[TTL_ATTRIBUTE]) for item in items} == {clock.now + SESSION_RETENTION_S}


def test_terraform_sessions_table_uses_the_same_ttl_attribute() -> None:
    terraform = Path(__file__).resolve().parent.parent / "terraform/modules/data/main.tf"
    tables = terraform.read_text()
    assert re.search(rf'sessions\s*=\s*{{[^}}]*ttl = "{TTL_ATTRIBUTE}"', tables)


def test_sequence_reservations_never_overlap(storage: Storage, clock: Clock) -> None:
    storage.put_session(session(clock))
    assert storage.reserve_seq("key-a", "conv_1", 5) == 1
    assert storage.reserve_seq("key-a", "conv_1", 3) == 6
    record = storage.get_session("key-a", "conv_1")
    assert record is not None and record.seq == 8
    firsts: list[int] = []
    lock = threading.Lock()

    def reserve() -> None:
        first = storage.reserve_seq("key-a", "conv_1", 10)
        with lock:
            firsts.append(first)

    threads = [threading.Thread(target=reserve) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(firsts) == [9 + 10 * i for i in range(8)]
    with pytest.raises(KeyError):
        storage.reserve_seq("key-a", "conv_missing", 1)


def test_the_last_turn_sent_only_rises(storage: Storage, clock: Clock) -> None:
    storage.put_session(session(clock))
    storage.note_turn("key-a", "conv_1", 3)
    storage.note_turn("key-a", "conv_1", 2)  # an older number changes nothing
    record = storage.get_session("key-a", "conv_1")
    assert record is not None and record.last_turn == 3
    storage.note_turn("key-a", "conv_1", 7)
    record = storage.get_session("key-a", "conv_1")
    assert record is not None and record.last_turn == 7
    storage.note_turn("key-a", "conv_missing", 1)  # nothing to raise, no error
    assert storage.get_session("key-a", "conv_missing") is None


def test_a_sqlite_file_from_before_last_turn_is_brought_up_to_date(
    tmp_path: Path, clock: Clock
) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE sessions (key_id TEXT NOT NULL, id TEXT NOT NULL, config TEXT NOT NULL,"
            " model TEXT NOT NULL, voice TEXT NOT NULL, created_at REAL NOT NULL,"
            " status TEXT NOT NULL, ended_reason TEXT, ended_at REAL, expires_at REAL,"
            " seq INTEGER NOT NULL, connection_id TEXT NOT NULL, PRIMARY KEY (key_id, id))"
        )
        db.execute(
            "INSERT INTO sessions VALUES ('key-a', 'conv_old', '{}', 'kokoro', 'jf_alpha*1',"
            " 1.0, 'active', NULL, NULL, NULL, 64, '')"
        )
    storage = SQLiteStorage(path, clock=clock)
    record = storage.get_session("key-a", "conv_old")
    assert record is not None and (record.seq, record.last_turn) == (64, 0)
    storage.note_turn("key-a", "conv_old", 5)
    again = storage.get_session("key-a", "conv_old")
    assert again is not None and again.last_turn == 5


def test_claim_records_the_live_connection(storage: Storage, clock: Clock) -> None:
    storage.put_session(session(clock))
    assert storage.claim_session("key-a", "conv_1", "socket-1")
    assert storage.claim_session("key-a", "conv_1", "socket-2")
    record = storage.get_session("key-a", "conv_1")
    assert record is not None and record.connection_id == "socket-2"
    assert not storage.claim_session("key-b", "conv_1", "socket-3")


def test_turn_ids_must_be_numbered() -> None:
    with pytest.raises(ValueError):
        _ = TurnRecord("t1", "user", "x", 0.0).sort_key
