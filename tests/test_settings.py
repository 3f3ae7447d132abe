"""Key digests: plaintext keys hashed, digests accepted, Secrets Manager read (moto)."""

from __future__ import annotations

import hashlib

import boto3
import pytest
from moto import mock_aws

from handler.settings import Settings


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_plain_keys_are_kept_only_as_digests() -> None:
    settings = Settings(api_keys="alpha, beta", api_key_sha256=sha("gamma").upper())
    assert settings.key_digests == {sha("alpha"), sha("beta"), sha("gamma")}


def test_digests_from_secrets_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        client = boto3.client("secretsmanager")
        arn = client.create_secret(Name="keys", SecretString=f"{sha('k1')},{sha('k2')}")["ARN"]
        settings = Settings(api_keys_secret_arn=arn)
        assert settings.key_digests == {sha("k1"), sha("k2")}


def test_a_secret_without_a_value_accepts_no_key_until_it_has_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """terraform creates the keys secret empty; requests before the digests are put get 401."""
    from fastapi.testclient import TestClient

    from devtools.fake_triton import FakeTriton
    from handler.app import create_app
    from tests.helpers import make_settings

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws(), FakeTriton() as triton:
        client = boto3.client("secretsmanager")
        arn = client.create_secret(Name="keys")["ARN"]
        settings = make_settings(triton_url=triton.http_url, api_keys_secret_arn=arn)
        with TestClient(create_app(settings), raise_server_exceptions=False) as api:
            key = {"Authorization": "Bearer k1"}
            before = api.get("/v1/models", headers=key)
            client.put_secret_value(SecretId=arn, SecretString=sha("k1"))
            after = api.get("/v1/models", headers=key)
    assert before.status_code == 401, before.text
    assert after.status_code == 200, after.text


def test_handler_package_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, handler.lambda_function; assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"CONVERSE_SQLITE_PATH": "/tmp/converse-import-check.db",
                                 "PATH": "/usr/bin:/bin"}, check=False)
    assert result.returncode == 0, result.stderr
