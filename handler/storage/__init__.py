"""Persistence behind one small interface: saved voices, usage, rate-limit buckets, sessions.

Backends: SQLite file (default, local) and DynamoDB (AWS). Audio objects
(large responses, uploads) live in a blob store: a local directory or S3.
"""

from __future__ import annotations

from handler.settings import Settings
from handler.storage.base import Storage
from handler.storage.blobs import BlobStore, LocalBlobStore, S3BlobStore


def make_storage(settings: Settings) -> Storage:
    """The storage backend the settings name."""
    if settings.storage_backend == "dynamodb":
        import boto3

        from handler.storage.dynamodb import DynamoDBStorage

        return DynamoDBStorage(
            boto3.resource("dynamodb"),
            settings.dynamodb_voices_table,
            settings.dynamodb_usage_table,
            settings.dynamodb_rate_table,
            settings.dynamodb_sessions_table,
        )
    from handler.storage.sqlite import SQLiteStorage

    return SQLiteStorage(settings.sqlite_path)


def make_blob_store(settings: Settings) -> BlobStore:
    """The blob store the settings name."""
    if settings.blob_backend == "s3":
        import boto3

        return S3BlobStore(boto3.client("s3"), settings.s3_bucket)
    return LocalBlobStore(settings.blob_dir, settings.signing_secret)
