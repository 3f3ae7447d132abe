"""DynamoDB backend of :class:`Storage` (boto3), used on AWS.

Tables (created by terraform's ``data`` module; ``create_tables`` makes them
for tests):
  * voices: hash ``key_id``, range ``id``; local secondary index ``by_sort_key``
    on ``sort_key`` gives creation order for listings;
  * usage: hash ``key_id``; totals grow with atomic ``ADD`` updates;
  * rate buckets: hash ``key_id``; read-compute-write guarded by a condition on
    the previous ``updated_at`` (optimistic concurrency, retried);
  * sessions: hash ``key_id``, range ``id``: a session is the item ``id =
    <session id>``, its turns are ``id = <session id>#<n, 9 digits>`` (one
    query lists them in order). Ending a session writes ``expires_at`` (Unix
    seconds, the table's TTL attribute in terraform) on it and its turns;
    DynamoDB deletes expired items within days, so reads also compare
    ``expires_at`` with the clock.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from botocore.exceptions import ClientError

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

VOICE_INDEX = "by_sort_key"
TTL_ATTRIBUTE = "expires_at"  # terraform/modules/data/main.tf: the sessions table's TTL
_MAX_CAS_ATTEMPTS = 50
MAX_SORT_KEY_BYTES = 1024  # DynamoDB's limit; a longer key is a ValidationException


def _number(value: float) -> Decimal:
    return Decimal(repr(float(value)))


def _voice_item(voice: SavedVoice) -> dict[str, Any]:
    item: dict[str, Any] = {
        "key_id": voice.key_id,
        "id": voice.id,
        "sort_key": voice.sort_key,
        "name": voice.name,
        "model": voice.model,
        "created_at": _number(voice.created_at),
    }
    for field in ("voice", "reference_audio_id", "transcript"):
        if getattr(voice, field) is not None:
            item[field] = getattr(voice, field)
    return item


def _fits_sort_key(value: str) -> bool:
    """True when ``value`` can be a sort key: DynamoDB refuses one over 1024 bytes (UTF-8)."""
    return len(value.encode()) <= MAX_SORT_KEY_BYTES


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _session_item(record: SessionRecord) -> dict[str, Any]:
    item: dict[str, Any] = {
        "key_id": record.key_id,
        "id": record.id,
        "config": utf8_json(record.config),
        "model": record.model,
        "voice": record.voice,
        "created_at": _number(record.created_at),
        "status": record.status,
        "seq": record.seq,
        "connection_id": record.connection_id,
        "last_turn": record.last_turn,
    }
    if record.ended_reason is not None:
        item["ended_reason"] = record.ended_reason
    for name in ("ended_at", TTL_ATTRIBUTE):
        if getattr(record, name) is not None:
            item[name] = _number(getattr(record, name))
    return item


def _session(item: dict[str, Any]) -> SessionRecord:
    return SessionRecord(
        id=item["id"],
        key_id=item["key_id"],
        config=json.loads(item["config"]),
        model=item["model"],
        voice=item["voice"],
        created_at=float(item["created_at"]),
        status=item["status"],
        ended_reason=item.get("ended_reason"),
        ended_at=_optional_float(item.get("ended_at")),
        expires_at=_optional_float(item.get(TTL_ATTRIBUTE)),
        seq=int(item["seq"]),
        connection_id=item["connection_id"],
        last_turn=int(item.get("last_turn", 0)),
    )


def _turn_prefix(session_id: str) -> str:
    return f"{session_id}#"


def _voice(item: dict[str, Any]) -> SavedVoice:
    return SavedVoice(
        id=item["id"],
        key_id=item["key_id"],
        name=item["name"],
        model=item["model"],
        voice=item.get("voice"),
        reference_audio_id=item.get("reference_audio_id"),
        transcript=item.get("transcript"),
        created_at=float(item["created_at"]),
    )


class DynamoDBStorage(Storage):
    """Storage in four DynamoDB tables.

    Args:
        resource: a boto3 DynamoDB service resource.
        voices_table, usage_table, rate_table, sessions_table: table names.
        clock: Unix seconds now (session retention); ``time.time`` unless a test injects one.
        retention_s: how long an ended session stays readable, seconds (30 days).
    """

    def __init__(
        self,
        resource: Any,
        voices_table: str,
        usage_table: str,
        rate_table: str,
        sessions_table: str = "converse-sessions",
        clock: Callable[[], float] = time.time,
        retention_s: float = SESSION_RETENTION_S,
    ) -> None:
        self.voices = resource.Table(voices_table)
        self.usage = resource.Table(usage_table)
        self.rates = resource.Table(rate_table)
        self.sessions = resource.Table(sessions_table)
        self.clock = clock
        self.retention_s = retention_s

    @staticmethod
    def create_tables(
        resource: Any,
        voices_table: str,
        usage_table: str,
        rate_table: str,
        sessions_table: str = "converse-sessions",
    ) -> None:
        """Create the four tables (on-demand billing, sessions with TTL), as terraform does."""
        resource.create_table(
            TableName=sessions_table,
            KeySchema=[
                {"AttributeName": "key_id", "KeyType": "HASH"},
                {"AttributeName": "id", "KeyType": "RANGE"},
            ],
            AttributeDefinitions=[
                {"AttributeName": name, "AttributeType": "S"} for name in ("key_id", "id")
            ],
            BillingMode="PAY_PER_REQUEST",
        )
        resource.meta.client.update_time_to_live(
            TableName=sessions_table,
            TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE},
        )
        resource.create_table(
            TableName=voices_table,
            KeySchema=[
                {"AttributeName": "key_id", "KeyType": "HASH"},
                {"AttributeName": "id", "KeyType": "RANGE"},
            ],
            AttributeDefinitions=[
                {"AttributeName": name, "AttributeType": "S"}
                for name in ("key_id", "id", "sort_key")
            ],
            LocalSecondaryIndexes=[
                {
                    "IndexName": VOICE_INDEX,
                    "KeySchema": [
                        {"AttributeName": "key_id", "KeyType": "HASH"},
                        {"AttributeName": "sort_key", "KeyType": "RANGE"},
                    ],
                    "Projection": {"ProjectionType": "ALL"},
                }
            ],
            BillingMode="PAY_PER_REQUEST",
        )
        for name in (usage_table, rate_table):
            resource.create_table(
                TableName=name,
                KeySchema=[{"AttributeName": "key_id", "KeyType": "HASH"}],
                AttributeDefinitions=[{"AttributeName": "key_id", "AttributeType": "S"}],
                BillingMode="PAY_PER_REQUEST",
            )

    def put_voice(self, voice: SavedVoice) -> None:
        """Store a new voice."""
        self.voices.put_item(Item=_voice_item(voice))

    def get_voice(self, key_id: str, voice_id: str) -> SavedVoice | None:
        """The key's voice with this id, or None (strongly consistent, as SQLite reads are)."""
        if not _fits_sort_key(voice_id):
            return None
        item = self.voices.get_item(
            Key={"key_id": key_id, "id": voice_id}, ConsistentRead=True
        ).get("Item")
        return _voice(item) if item else None

    def delete_voice(self, key_id: str, voice_id: str) -> bool:
        """Delete the key's voice; False if it did not exist."""
        if not _fits_sort_key(voice_id):
            return False
        answer = self.voices.delete_item(
            Key={"key_id": key_id, "id": voice_id}, ReturnValues="ALL_OLD"
        )
        return "Attributes" in answer

    def list_voices(self, key_id: str, limit: int, after: str | None) -> VoicePage:
        """Up to ``limit`` voices in creation order, after the sort key ``after``.

        Strongly consistent (a local secondary index allows it), as SQLite reads are.
        """
        from boto3.dynamodb.conditions import Key

        condition = Key("key_id").eq(key_id)
        if after:
            condition = condition & Key("sort_key").gt(after)
        items: list[dict[str, Any]] = []
        query: dict[str, Any] = {
            "IndexName": VOICE_INDEX,
            "KeyConditionExpression": condition,
            "ConsistentRead": True,
        }
        while len(items) <= limit:
            answer = self.voices.query(**query, Limit=limit + 1 - len(items))
            items.extend(answer.get("Items", []))
            if "LastEvaluatedKey" not in answer:
                break
            query["ExclusiveStartKey"] = answer["LastEvaluatedKey"]
        voices = [_voice(item) for item in items[:limit]]
        more = len(items) > limit
        return VoicePage(voices, encode_cursor(voices[-1].sort_key) if more else None)

    def record_usage(
        self,
        key_id: str,
        input_chars: int,
        input_audio_s: float,
        output_audio_s: float,
        now: float,
    ) -> None:
        """Add one request's usage to the key's totals (one atomic UpdateItem)."""
        self.usage.update_item(
            Key={"key_id": key_id},
            UpdateExpression="ADD requests :one, input_chars :chars, input_audio_seconds :ain, "
            "output_audio_seconds :aout SET last_request_ts = :now",
            ExpressionAttributeValues={
                ":one": 1,
                ":chars": input_chars,
                ":ain": _number(input_audio_s),
                ":aout": _number(output_audio_s),
                ":now": _number(now),
            },
        )

    def get_usage(self, key_id: str) -> UsageTotals:
        """The key's totals (zeros when it has none)."""
        item = self.usage.get_item(Key={"key_id": key_id}, ConsistentRead=True).get("Item")
        if not item:
            return UsageTotals(key_id, 0, 0, 0.0, 0.0, None)
        return UsageTotals(
            key_id,
            int(item["requests"]),
            int(item["input_chars"]),
            float(item["input_audio_seconds"]),
            float(item["output_audio_seconds"]),
            float(item["last_request_ts"]),
        )

    def take_token(
        self, key_id: str, capacity: int, refill_per_s: float, now: float
    ) -> RateDecision:
        """Take one token with compare-and-set on the bucket's ``version``.

        Raises:
            RuntimeError: the bucket stayed contended for ``_MAX_CAS_ATTEMPTS`` tries.
        """
        for _ in range(_MAX_CAS_ATTEMPTS):
            item = self.rates.get_item(Key={"key_id": key_id}, ConsistentRead=True).get("Item")
            if item:
                tokens, updated_at = float(item["tokens"]), float(item["updated_at"])
                version = int(item["version"])
            else:
                tokens, updated_at, version = float(capacity), now, 0
            left, stamp, decision = token_bucket(tokens, updated_at, now, capacity, refill_per_s)
            try:
                self.rates.put_item(
                    Item={
                        "key_id": key_id,
                        "tokens": _number(left),
                        "updated_at": _number(stamp),
                        "version": version + 1,
                    },
                    ConditionExpression="attribute_not_exists(key_id) OR version = :seen",
                    ExpressionAttributeValues={":seen": version},
                )
            except ClientError as error:
                if error.response["Error"]["Code"] == "ConditionalCheckFailedException":
                    continue
                raise
            return decision
        raise RuntimeError(f"rate bucket for {key_id} stayed contended")

    def put_session(self, record: SessionRecord) -> None:
        """Store a new session."""
        self.sessions.put_item(Item=_session_item(record))

    def get_session(self, key_id: str, session_id: str) -> SessionRecord | None:
        """The key's session, or None (past ``expires_at``: TTL may not have run yet)."""
        item = self.sessions.get_item(
            Key={"key_id": key_id, "id": session_id}, ConsistentRead=True
        ).get("Item")
        if item is None or "#" in session_id:
            return None
        record = _session(item)
        return None if expired(record, self.clock()) else record

    def end_session(
        self, key_id: str, session_id: str, reason: str, ended_at: float | None = None
    ) -> SessionRecord | None:
        """End an active session (at ``ended_at``, else now); ``expires_at`` on it and its turns."""
        end = self.clock() if ended_at is None else ended_at
        expires = _number(end + self.retention_s)
        try:
            self.sessions.update_item(
                Key={"key_id": key_id, "id": session_id},
                UpdateExpression="SET #status = :ended, ended_reason = :reason, "
                "ended_at = :now, #ttl = :expires",
                ConditionExpression="#status = :active",
                ExpressionAttributeNames={"#status": "status", "#ttl": TTL_ATTRIBUTE},
                ExpressionAttributeValues={
                    ":ended": "ended",
                    ":active": "active",
                    ":reason": reason,
                    ":now": _number(end),
                    ":expires": expires,
                },
            )
        except ClientError as error:
            if error.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise
            return self.get_session(key_id, session_id)
        for item in self._turn_items(key_id, session_id):
            self.sessions.update_item(
                Key={"key_id": key_id, "id": item["id"]},
                UpdateExpression="SET #ttl = :expires",
                ExpressionAttributeNames={"#ttl": TTL_ATTRIBUTE},
                ExpressionAttributeValues={":expires": expires},
            )
        return self.get_session(key_id, session_id)

    def claim_session(self, key_id: str, session_id: str, connection_id: str) -> bool:
        """Make ``connection_id`` the session's live socket; False if it is not active."""
        try:
            self.sessions.update_item(
                Key={"key_id": key_id, "id": session_id},
                UpdateExpression="SET connection_id = :connection",
                ConditionExpression="#status = :active",
                ExpressionAttributeNames={"#status": "status"},
                ExpressionAttributeValues={":connection": connection_id, ":active": "active"},
            )
        except ClientError as error:
            if error.response["Error"]["Code"] == "ConditionalCheckFailedException":
                return False
            raise
        return True

    def reserve_seq(self, key_id: str, session_id: str, count: int) -> int:
        """Atomically reserve ``count`` event sequence numbers (one ``ADD``); the first."""
        try:
            answer = self.sessions.update_item(
                Key={"key_id": key_id, "id": session_id},
                UpdateExpression="ADD seq :count",
                ConditionExpression="attribute_exists(id)",
                ExpressionAttributeValues={":count": count},
                ReturnValues="UPDATED_NEW",
            )
        except ClientError as error:
            if error.response["Error"]["Code"] == "ConditionalCheckFailedException":
                raise KeyError(session_id) from error
            raise
        return int(answer["Attributes"]["seq"]) - count + 1

    def note_turn(self, key_id: str, session_id: str, number: int) -> None:
        """Raise the session's ``last_turn`` to ``number`` (one conditional update)."""
        try:
            self.sessions.update_item(
                Key={"key_id": key_id, "id": session_id},
                UpdateExpression="SET last_turn = :number",
                ConditionExpression="attribute_exists(id) AND "
                "(attribute_not_exists(last_turn) OR last_turn < :number)",
                ExpressionAttributeValues={":number": number},
            )
        except ClientError as error:
            # Already that high, or the session is gone: nothing to raise.
            if error.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise

    def put_turn(self, key_id: str, session_id: str, turn: TurnRecord) -> None:
        """Insert or replace (same ``turn_id``) with the session's ``expires_at``.

        The session is read again after the write: a session ended meanwhile had its
        turns' expiry set before this one existed, so the turn takes it here.
        """
        item: dict[str, Any] = {
            "key_id": key_id,
            "id": f"{_turn_prefix(session_id)}{turn.sort_key}",
            "data": turn_to_json(turn),
        }
        expires = self._session_expiry(key_id, session_id)
        if expires is not None:
            item[TTL_ATTRIBUTE] = expires
        self.sessions.put_item(Item=item)
        # An end_session between the read and the put set the session's new expiry
        # on the turns it found, which did not include this one yet: copy it now.
        latest = self._session_expiry(key_id, session_id)
        if latest is None or latest == expires:
            return
        try:
            self.sessions.update_item(
                Key={"key_id": key_id, "id": item["id"]},
                UpdateExpression="SET #ttl = :expires",
                ConditionExpression="attribute_exists(id)",
                ExpressionAttributeNames={"#ttl": TTL_ATTRIBUTE},
                ExpressionAttributeValues={":expires": latest},
            )
        except ClientError as error:
            # Gone already (TTL deleted it): an update must not recreate it without data.
            if error.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise

    def _session_expiry(self, key_id: str, session_id: str) -> Decimal | None:
        session = self.sessions.get_item(
            Key={"key_id": key_id, "id": session_id},
            ConsistentRead=True,
            ProjectionExpression="#ttl",
            ExpressionAttributeNames={"#ttl": TTL_ATTRIBUTE},
        ).get("Item")
        return None if session is None else session.get(TTL_ATTRIBUTE)

    def list_turns(self, key_id: str, session_id: str) -> list[TurnRecord]:
        """The session's turns ordered by ``n`` ([] past retention)."""
        if self.get_session(key_id, session_id) is None:
            return []
        return [turn_from_json(item["data"]) for item in self._turn_items(key_id, session_id)]

    def _turn_items(self, key_id: str, session_id: str) -> list[dict[str, Any]]:
        from boto3.dynamodb.conditions import Key

        query: dict[str, Any] = {
            "KeyConditionExpression": Key("key_id").eq(key_id)
            & Key("id").begins_with(_turn_prefix(session_id)),
            "ConsistentRead": True,
        }
        items: list[dict[str, Any]] = []
        while True:
            answer = self.sessions.query(**query)
            items.extend(answer.get("Items", []))
            if "LastEvaluatedKey" not in answer:
                return items
            query["ExclusiveStartKey"] = answer["LastEvaluatedKey"]
