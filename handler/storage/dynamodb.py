"""DynamoDB backend of :class:`Storage` (boto3), used on AWS.

Tables (created by terraform's ``data`` module; ``create_tables`` makes them
for tests):
  * voices: hash ``key_id``, range ``id``; local secondary index ``by_sort_key``
    on ``sort_key`` gives creation order for listings;
  * usage: hash ``key_id``; totals grow with atomic ``ADD`` updates;
  * rate buckets: hash ``key_id``; read-compute-write guarded by a condition on
    the previous ``updated_at`` (optimistic concurrency, retried).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from botocore.exceptions import ClientError

from handler.storage.base import (
    RateDecision,
    SavedVoice,
    Storage,
    UsageTotals,
    VoicePage,
    encode_cursor,
    token_bucket,
)

VOICE_INDEX = "by_sort_key"
_MAX_CAS_ATTEMPTS = 50


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
    """Storage in three DynamoDB tables.

    Args:
        resource: a boto3 DynamoDB service resource.
        voices_table, usage_table, rate_table: table names.
    """

    def __init__(self, resource: Any, voices_table: str, usage_table: str, rate_table: str) -> None:
        self.voices = resource.Table(voices_table)
        self.usage = resource.Table(usage_table)
        self.rates = resource.Table(rate_table)

    @staticmethod
    def create_tables(resource: Any, voices_table: str, usage_table: str, rate_table: str) -> None:
        """Create the three tables (on-demand billing), as terraform does."""
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
        """The key's voice with this id, or None."""
        item = self.voices.get_item(Key={"key_id": key_id, "id": voice_id}).get("Item")
        return _voice(item) if item else None

    def delete_voice(self, key_id: str, voice_id: str) -> bool:
        """Delete the key's voice; False if it did not exist."""
        answer = self.voices.delete_item(
            Key={"key_id": key_id, "id": voice_id}, ReturnValues="ALL_OLD"
        )
        return "Attributes" in answer

    def list_voices(self, key_id: str, limit: int, after: str | None) -> VoicePage:
        """Up to ``limit`` voices in creation order, after the sort key ``after``."""
        from boto3.dynamodb.conditions import Key

        condition = Key("key_id").eq(key_id)
        if after:
            condition = condition & Key("sort_key").gt(after)
        items: list[dict[str, Any]] = []
        query: dict[str, Any] = {"IndexName": VOICE_INDEX, "KeyConditionExpression": condition}
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
            left, decision = token_bucket(tokens, updated_at, now, capacity, refill_per_s)
            try:
                self.rates.put_item(
                    Item={
                        "key_id": key_id,
                        "tokens": _number(left),
                        "updated_at": _number(now),
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
