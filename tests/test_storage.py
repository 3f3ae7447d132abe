"""The storage interface's suite, run against both backends: SQLite and DynamoDB (moto)."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from handler.storage.base import (
    SavedVoice,
    SessionRecord,
    Storage,
    TurnRecord,
    decode_cursor,
    encode_cursor,
    token_bucket,
)
from handler.storage.dynamodb import DynamoDBStorage
from handler.storage.sqlite import SQLiteStorage
from tests.moto_shims import refuse_long_sort_keys

TABLES = ("voices", "usage", "rates")


@pytest.fixture(params=["sqlite", "dynamodb"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "sqlite":
        yield SQLiteStorage(tmp_path / "state.db")
        return
    with mock_aws():
        resource = boto3.resource("dynamodb", region_name="us-east-1")
        DynamoDBStorage.create_tables(resource, *TABLES)
        yield DynamoDBStorage(resource, *TABLES)


def voice(key_id: str, number: int) -> SavedVoice:
    return SavedVoice(
        id=f"00000000-0000-4000-8000-{number:012d}", key_id=key_id, name=f"voice {number}",
        model="kokoro", voice="jf_alpha*1", reference_audio_id=None, transcript=None,
        created_at=1_700_000_000.0 + number,
    )


def test_voice_round_trip_and_owner_isolation(storage: Storage) -> None:
    saved = voice("key-a", 1)
    storage.put_voice(saved)
    assert storage.get_voice("key-a", saved.id) == saved
    assert storage.get_voice("key-b", saved.id) is None
    assert storage.delete_voice("key-b", saved.id) is False
    assert storage.delete_voice("key-a", saved.id) is True
    assert storage.get_voice("key-a", saved.id) is None
    assert storage.delete_voice("key-a", saved.id) is False


def test_cursor_pagination_visits_every_voice_once_in_order(storage: Storage) -> None:
    expected = [voice("key-a", n) for n in range(7)]
    for item in reversed(expected):
        storage.put_voice(item)
    storage.put_voice(voice("key-b", 99))
    seen, after = [], None
    while True:
        page = storage.list_voices("key-a", 3, after)
        seen.extend(page.voices)
        if not page.has_more:
            break
        assert page.next_cursor is not None and len(page.voices) == 3
        after = decode_cursor(page.next_cursor)
    assert seen == expected


def test_usage_accumulates(storage: Storage) -> None:
    assert storage.get_usage("key-a").requests == 0
    storage.record_usage("key-a", 10, 1.5, 2.0, now=100.0)
    storage.record_usage("key-a", 5, 0.0, 1.25, now=200.0)
    totals = storage.get_usage("key-a")
    assert (totals.requests, totals.input_chars, totals.last_request_ts) == (2, 15, 200.0)
    assert totals.input_audio_seconds == pytest.approx(1.5)
    assert totals.output_audio_seconds == pytest.approx(3.25)
    assert storage.get_usage("key-b").requests == 0


def test_token_bucket_refills(storage: Storage) -> None:
    decisions = [storage.take_token("key-a", 3, 1.0, now=1000.0) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert decisions[-1].retry_after_s == pytest.approx(1.0)
    assert storage.take_token("key-a", 3, 1.0, now=1001.0).allowed
    assert storage.take_token("key-b", 3, 1.0, now=1001.0).remaining == 2


def test_concurrent_requests_take_exactly_the_capacity(storage: Storage) -> None:
    allowed: list[bool] = []
    lock = threading.Lock()

    def take() -> None:
        decision = storage.take_token("key-c", 5, 1e-6, now=5000.0)
        with lock:
            allowed.append(decision.allowed)

    threads = [threading.Thread(target=take) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(allowed) == [False] * 15 + [True] * 5


def test_a_request_that_reaches_the_bucket_late_does_not_rewind_its_clock(
    storage: Storage,
) -> None:
    # Capacity 2, 1 token/s: in [100, 101] at most 2 + 1 refilled requests pass. The third
    # call was stamped t=100 but reached storage after the t=101 one (thread pool wait).
    stamps = [100.0, 101.0, 100.0, 101.0, 101.0]
    allowed = [storage.take_token("key-a", 2, 1.0, now=stamp).allowed for stamp in stamps]
    assert allowed == [True, True, True, False, False]


def test_dynamodb_voice_reads_are_strongly_consistent() -> None:
    # SQLite reads see every committed write; DynamoDB's default read may not.
    reads: list[tuple[str, Any]] = []

    def note(params: dict[str, Any], model: Any, **_: Any) -> None:
        if model.name in ("GetItem", "Query"):
            reads.append((model.name, params.get("ConsistentRead")))

    with mock_aws():
        resource = boto3.resource("dynamodb", region_name="us-east-1")
        DynamoDBStorage.create_tables(resource, *TABLES)
        storage = DynamoDBStorage(resource, *TABLES)
        storage.put_voice(voice("key-a", 1))
        resource.meta.client.meta.events.register("provide-client-params.dynamodb.*", note)
        assert storage.get_voice("key-a", voice("key-a", 1).id) is not None
        assert len(storage.list_voices("key-a", 10, None).voices) == 1
    assert reads == [("GetItem", True), ("Query", True)]


def test_dynamodb_ids_too_long_to_be_keys_are_absent_voices() -> None:
    with mock_aws():
        resource = boto3.resource("dynamodb", region_name="us-east-1")
        DynamoDBStorage.create_tables(resource, *TABLES)
        storage = DynamoDBStorage(resource, *TABLES)
        resource.meta.client.meta.events.register(
            "provide-client-params.dynamodb.*", refuse_long_sort_keys)
        assert storage.get_voice("key-a", "a" * 1025) is None
        assert storage.delete_voice("key-a", "é" * 513) is False


def test_dynamodb_a_turn_written_while_its_session_ends_gets_the_end_expiry() -> None:
    with mock_aws():
        resource = boto3.resource("dynamodb", region_name="us-east-1")
        DynamoDBStorage.create_tables(resource, *TABLES, "sessions")
        storage = DynamoDBStorage(resource, *TABLES, "sessions", clock=lambda: 1000.0,
                                  retention_s=10.0)
        storage.put_session(SessionRecord("conv_1", "key-a", {}, "kokoro", "jf_alpha*1", 0.0))
        put_item = storage.sessions.put_item

        def end_then_put(**kwargs: Any) -> Any:  # the session ends between read and write
            storage.sessions.put_item = put_item
            storage.end_session("key-a", "conv_1", "deleted")
            return put_item(**kwargs)

        storage.sessions.put_item = end_then_put
        storage.put_turn("key-a", "conv_1", TurnRecord("turn_1", "assistant", "bye", 999.0))
        items = {item["id"]: item for item in storage.sessions.scan()["Items"]}
    assert items["conv_1"]["expires_at"] == 1010
    assert items["conv_1#000000001"]["expires_at"] == 1010


def test_token_bucket_formula() -> None:
    left, stamp, decision = token_bucket(0.5, 0.0, 0.25, capacity=10, refill_per_s=2.0)
    assert decision.allowed and left == pytest.approx(0.0) and stamp == 0.25
    assert decision.reset_s == pytest.approx(5.0)
    left, stamp, decision = token_bucket(0.0, 0.0, 0.0, capacity=10, refill_per_s=2.0)
    assert not decision.allowed and decision.retry_after_s == pytest.approx(0.5)
    left, stamp, decision = token_bucket(1.0, 10.0, 9.0, capacity=10, refill_per_s=2.0)
    assert decision.allowed and left == pytest.approx(0.0) and stamp == 10.0


def b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "cursor",
    [
        "", "!!!", "bm8taGFzaA==",
        b64("1#" + "x" * 1100),  # a sort key DynamoDB refuses (over 1024 bytes)
        b64(f"{0:020d}#not-a-voice-id"),
        b64(f"12#{voice('key-a', 1).id}"),
    ],
)
def test_foreign_cursors_are_rejected(cursor: str) -> None:
    with pytest.raises(ValueError):
        decode_cursor(cursor)


def test_issued_cursors_decode_to_their_sort_key() -> None:
    sort_key = voice("key-a", 1).sort_key
    assert decode_cursor(encode_cursor(sort_key)) == sort_key
