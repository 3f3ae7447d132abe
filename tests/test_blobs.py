"""Blob stores: local signed URLs and S3 presigned flows (moto)."""

from __future__ import annotations

import threading
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import boto3
import pytest
import requests
from moto import mock_aws

from handler.storage.blobs import LocalBlobStore, S3BlobStore, check_key


def test_local_store_signs_and_verifies(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path, b"secret")
    store.put("responses/r1/a.wav", b"RIFF", "audio/wav")
    assert store.get("responses/r1/a.wav", 10) == b"RIFF"
    assert store.content_type("responses/r1/a.wav") == "audio/wav"
    with pytest.raises(ValueError):
        store.get("responses/r1/a.wav", 3)
    url = urlparse(store.download_url("responses/r1/a.wav", 60, "http://h:1/"))
    assert url.path == "/v1/files/responses/r1/a.wav"
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    expires = int(query["expires"])
    assert store.verify("GET", "responses/r1/a.wav", expires, query["signature"], expires - 1)
    assert not store.verify("PUT", "responses/r1/a.wav", expires, query["signature"], 0)
    assert not store.verify("GET", "responses/r1/b.wav", expires, query["signature"], 0)
    assert not store.verify("GET", "responses/r1/a.wav", expires, query["signature"], expires + 1)


def test_puts_of_one_key_at_once_each_land_whole(tmp_path: Path) -> None:
    """Concurrent uploads of one key: every write succeeds, and the file is one of them."""
    store = LocalBlobStore(tmp_path, b"secret")
    bodies = [bytes([n]) * 200_000 for n in range(8)]
    failures: list[BaseException] = []

    def put(body: bytes) -> None:
        try:
            for _ in range(20):
                store.put("uploads/k/u.wav", body, "audio/wav")
        except Exception as error:  # collected for the assertion
            failures.append(error)

    threads = [threading.Thread(target=put, args=(body,)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert store.get("uploads/k/u.wav", 1 << 20) in bodies
    assert [p.name for p in (tmp_path / "uploads/k").iterdir() if p.suffix == ".partial"] == []


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a/../b", "", "sp ace"])
def test_bad_keys_are_rejected(key: str) -> None:
    with pytest.raises(ValueError):
        check_key(key)


def test_s3_presigned_put_then_get() -> None:
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="audio")
        store = S3BlobStore(client, "audio")
        put_url = store.upload_url("uploads/k/x.wav", 300, "unused")
        assert "X-Amz-Signature" in put_url or "Signature" in put_url
        assert requests.put(put_url, data=b"RIFF-clip", timeout=10).status_code == 200
        assert store.get("uploads/k/x.wav", 100) == b"RIFF-clip"
        assert store.get("uploads/k/missing.wav", 100) is None
        with pytest.raises(ValueError):
            store.get("uploads/k/x.wav", 4)
        store.put("responses/r/a.wav", b"audio-bytes", "audio/wav")
        response = requests.get(store.download_url("responses/r/a.wav", 300, "unused"), timeout=10)
        assert response.status_code == 200 and response.content == b"audio-bytes"
