"""Blob store for audio objects: large responses and uploaded clips.

``S3BlobStore`` hands out S3 presigned URLs; ``LocalBlobStore`` keeps files in a
directory and signs its own URLs (HMAC-SHA256 over method, key and expiry) for
the API's ``/v1/files/{key}`` route, so both backends give clients the same
flow: a URL that works without the API key until it expires.
"""

from __future__ import annotations

import abc
import hashlib
import hmac
import re
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]{0,200}$")


def check_key(key: str) -> str:
    """Validate an object key (no ``..``, no leading slash).

    Raises:
        ValueError: for a key outside ``[A-Za-z0-9._-/]`` or with ``..``.
    """
    if not _KEY.match(key) or ".." in key:
        raise ValueError(f"invalid object key {key!r}")
    return key


class BlobStore(abc.ABC):
    """Put/get bytes and hand out time-limited URLs."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store ``data`` under ``key``."""

    @abc.abstractmethod
    def get(self, key: str, max_bytes: int) -> bytes | None:
        """The object's bytes, None if absent.

        Raises:
            ValueError: the object is larger than ``max_bytes`` (checked before reading).
        """

    @abc.abstractmethod
    def download_url(self, key: str, expires_s: int, base_url: str) -> str:
        """A GET URL valid for ``expires_s`` seconds."""

    @abc.abstractmethod
    def upload_url(self, key: str, expires_s: int, base_url: str) -> str:
        """A PUT URL valid for ``expires_s`` seconds."""


class LocalBlobStore(BlobStore):
    """Files under ``root``, served by the API's ``/v1/files/{key}`` route."""

    def __init__(self, root: Path, secret: bytes) -> None:
        self.root = root
        self.secret = secret

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Write the file atomically; the content type is kept beside it."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own per write: two PUTs of one key must not write one temp file.
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
        tmp.write_bytes(data)
        tmp.replace(path)
        path.with_name(path.name + ".type").write_text(content_type)

    def file(self, key: str) -> Path | None:
        """The object's file (to be streamed from disk), None if absent."""
        path = self._path(key)
        return path if path.is_file() else None

    def get(self, key: str, max_bytes: int) -> bytes | None:
        """The file's bytes, None if absent."""
        path = self._path(key)
        if not path.is_file():
            return None
        if path.stat().st_size > max_bytes:
            raise ValueError(f"object {key} is larger than {max_bytes} bytes")
        return path.read_bytes()

    def content_type(self, key: str) -> str:
        """The content type recorded at ``put`` (``application/octet-stream`` if none)."""
        path = self._path(key).with_name(self._path(key).name + ".type")
        return path.read_text() if path.is_file() else "application/octet-stream"

    def signature(self, method: str, key: str, expires: int) -> str:
        """Hex HMAC-SHA256 of ``method``, ``key`` and ``expires`` (Unix seconds)."""
        message = f"{method}\n{key}\n{expires}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    def verify(self, method: str, key: str, expires: int, signature: str, now: float) -> bool:
        """True if the signature matches and has not expired."""
        expected = self.signature(method, key, expires)
        return now <= expires and hmac.compare_digest(expected, signature)

    def _signed(self, method: str, key: str, expires_s: int, base_url: str) -> str:
        expires = int(time.time()) + expires_s
        query = urlencode({"expires": expires, "signature": self.signature(method, key, expires)})
        return f"{base_url.rstrip('/')}/v1/files/{check_key(key)}?{query}"

    def download_url(self, key: str, expires_s: int, base_url: str) -> str:
        """Signed ``GET /v1/files/{key}`` URL."""
        return self._signed("GET", key, expires_s, base_url)

    def upload_url(self, key: str, expires_s: int, base_url: str) -> str:
        """Signed ``PUT /v1/files/{key}`` URL."""
        return self._signed("PUT", key, expires_s, base_url)


class S3BlobStore(BlobStore):
    """Objects in one S3 bucket; URLs are S3 presigned URLs (SigV4)."""

    def __init__(self, client: Any, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """PutObject (server-side encryption is the bucket's default)."""
        self.client.put_object(
            Bucket=self.bucket, Key=check_key(key), Body=data, ContentType=content_type
        )

    def get(self, key: str, max_bytes: int) -> bytes | None:
        """HeadObject for the size, then GetObject."""
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=check_key(key))
        except ClientError as error:
            if error.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        if int(head["ContentLength"]) > max_bytes:
            raise ValueError(f"object {key} is larger than {max_bytes} bytes")
        body: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return body

    def download_url(self, key: str, expires_s: int, base_url: str) -> str:
        """Presigned GetObject URL (``base_url`` unused)."""
        url: str = self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": check_key(key)},
            ExpiresIn=expires_s,
        )
        return url

    def upload_url(self, key: str, expires_s: int, base_url: str) -> str:
        """Presigned PutObject URL (``base_url`` unused)."""
        url: str = self.client.generate_presigned_url(
            "put_object",
            Params={"Bucket": self.bucket, "Key": check_key(key)},
            ExpiresIn=expires_s,
        )
        return url
