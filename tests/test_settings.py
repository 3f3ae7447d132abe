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


def test_handler_package_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, handler.lambda_function; assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"CONVERSE_SQLITE_PATH": "/tmp/converse-import-check.db",
                                 "PATH": "/usr/bin:/bin"}, check=False)
    assert result.returncode == 0, result.stderr
