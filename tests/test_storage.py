"""The storage interface's suite, run against both backends: SQLite and DynamoDB (moto)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from handler.storage.base import SavedVoice, Storage, decode_cursor, token_bucket
from handler.storage.dynamodb import DynamoDBStorage
from handler.storage.sqlite import SQLiteStorage

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
        id=f"id-{number:03d}", key_id=key_id, name=f"voice {number}", model="kokoro",
        voice="jf_alpha*1", reference_audio_id=None, transcript=None,
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


def test_token_bucket_formula() -> None:
    left, decision = token_bucket(0.5, 0.0, 0.25, capacity=10, refill_per_s=2.0)
    assert decision.allowed and left == pytest.approx(0.0)
    assert decision.reset_s == pytest.approx(5.0)
    left, decision = token_bucket(0.0, 0.0, 0.0, capacity=10, refill_per_s=2.0)
    assert not decision.allowed and decision.retry_after_s == pytest.approx(0.5)


@pytest.mark.parametrize("cursor", ["", "!!!", "bm8taGFzaA=="])
def test_foreign_cursors_are_rejected(cursor: str) -> None:
    with pytest.raises(ValueError):
        decode_cursor(cursor)
