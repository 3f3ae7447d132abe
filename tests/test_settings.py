"""Key digests: plaintext keys hashed, digests accepted, Secrets Manager read (moto, Stubber)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator
from typing import Any

import boto3
import httpx
import pytest
from botocore.exceptions import EndpointConnectionError
from botocore.stub import Stubber
from moto import mock_aws

from handler.errors import ServiceUnavailable
from handler.settings import Settings
from tests.helpers import make_settings


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
        assert settings.key_digests == frozenset()  # not read yet: the property does no I/O
        assert asyncio.run(settings.load_key_digests()) == {sha("k1"), sha("k2")}
        assert settings.key_digests == {sha("k1"), sha("k2")}


@pytest.mark.parametrize("first_value", [None, " , "], ids=["no-value", "no-digest"])
def test_a_secret_without_a_value_accepts_no_key_until_it_has_one(
    monkeypatch: pytest.MonkeyPatch, first_value: str | None
) -> None:
    """terraform creates the keys secret empty; requests before the digests are put get 401.

    A value that holds no digest is no value either: it is not kept, so the
    digests put after it are accepted without a restart.
    """
    from fastapi.testclient import TestClient

    from devtools.fake_triton import FakeTriton
    from handler.app import create_app

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws(), FakeTriton() as triton:
        client = boto3.client("secretsmanager")
        value = {} if first_value is None else {"SecretString": first_value}
        arn = client.create_secret(Name="keys", **value)["ARN"]
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


class HeldRead:
    """A hook before each GetSecretValue call: counts the reads and holds the first.

    The first read waits (in whatever thread makes it) until ``release`` is set;
    ``released`` says whether it was, rather than given up after ``hold_s``.
    """

    def __init__(self, hold_s: float = 10.0, error: Exception | None = None) -> None:
        self.reads = 0
        self.started = threading.Event()
        self.release = threading.Event()
        self.released = False
        self.hold_s = hold_s
        self.error = error

    def __call__(self, **_: Any) -> None:
        self.reads += 1
        if self.reads == 1:
            self.started.set()
            self.released = self.release.wait(self.hold_s)
        if self.error is not None:
            raise self.error


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The Secrets Manager client (moto) that ``boto3.client("secretsmanager")`` returns."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        client = boto3.client("secretsmanager")
        real = boto3.client
        monkeypatch.setattr(
            boto3, "client",
            lambda name, *a, **k: client if name == "secretsmanager" else real(name, *a, **k),
        )
        yield client


def hold_reads(client: Any, error: Exception | None = None) -> HeldRead:
    held = HeldRead(error=error)
    client.meta.events.register("before-parameter-build.secrets-manager.GetSecretValue", held)
    return held


def throttled(client: Any, arn: str) -> Stubber:
    """Stub GetSecretValue: ThrottlingException once, then the digest of key ``k1``."""
    stubber = Stubber(client)
    stubber.add_client_error(
        "get_secret_value", service_error_code="ThrottlingException",
        service_message="Rate exceeded", http_status_code=400, expected_params={"SecretId": arn},
    )
    stubber.add_response("get_secret_value", {"ARN": arn, "Name": "keys",
                                              "SecretString": sha("k1")}, {"SecretId": arn})
    stubber.activate()
    return stubber


def test_the_secret_is_read_off_the_event_loop(secrets: Any) -> None:
    """While a request waits on Secrets Manager, the process still answers others."""
    arn = secrets.create_secret(Name="keys", SecretString=sha("k1"))["ARN"]
    held = hold_reads(secrets)
    from handler.app import create_app

    app = create_app(make_settings(api_keys="", api_keys_secret_arn=arn))

    async def scenario() -> tuple[int, int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as api:
            keyed = asyncio.ensure_future(
                api.get("/v1/usage", headers={"Authorization": "Bearer k1"}))
            await asyncio.to_thread(held.started.wait, held.hold_s)
            health = await api.get("/health")  # answered while the read is held
            held.release.set()
            return health.status_code, (await keyed).status_code

    assert asyncio.run(scenario()) == (200, 200)
    assert held.released  # the read was let go by the answered /health, not by its timeout
    assert held.reads == 1


@pytest.mark.parametrize("outcome", ["no-value", "throttled", "unreachable"])
def test_requests_that_arrive_during_a_read_share_it(secrets: Any, outcome: str) -> None:
    """Five requests, one read: its digests, or its failure (503); the next request reads again."""
    if outcome == "no-value":
        arn = secrets.create_secret(Name="keys")["ARN"]
        held = hold_reads(secrets)
    elif outcome == "throttled":
        arn = secrets.create_secret(Name="keys", SecretString=sha("k1"))["ARN"]
        held = hold_reads(secrets)
        throttled(secrets, arn)
    else:
        arn = secrets.create_secret(Name="keys", SecretString=sha("k1"))["ARN"]
        gone = EndpointConnectionError(endpoint_url="https://secretsmanager.us-east-1.amazonaws.com")
        held = hold_reads(secrets, error=gone)
    settings = Settings(api_key_sha256=sha("configured"), api_keys_secret_arn=arn)

    async def load() -> frozenset[str] | ServiceUnavailable:
        try:
            return await settings.load_key_digests()
        except ServiceUnavailable as error:
            return error

    async def scenario() -> list[frozenset[str] | ServiceUnavailable]:
        loads = asyncio.gather(*(load() for _ in range(5)))
        await asyncio.to_thread(held.started.wait, held.hold_s)
        held.release.set()
        return await loads

    results = asyncio.run(scenario())
    assert held.reads == 1 and held.released
    if outcome == "no-value":
        assert results == [{sha("configured")}] * 5
    else:
        assert all(isinstance(r, ServiceUnavailable) for r in results)
        assert len({id(r) for r in results}) == 5  # one error each, not one shared instance
        assert all(r.headers == {"Retry-After": str(settings.retry_after_s)} for r in results
                   if isinstance(r, ServiceUnavailable))
    # Nothing was kept: the next request reads the secret again.
    held.error = None
    if outcome == "no-value":
        secrets.put_secret_value(SecretId=arn, SecretString=sha("k1"))
    assert asyncio.run(settings.load_key_digests()) == {sha("configured"), sha("k1")}
    assert held.reads == 2


def test_a_failed_read_of_the_secret_is_a_503_with_retry_after(
    secrets: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Throttled by Secrets Manager: 503 service_unavailable, Retry-After; the next one passes."""
    from fastapi.testclient import TestClient

    from handler.app import create_app

    arn = secrets.create_secret(Name="keys", SecretString=sha("k1"))["ARN"]
    stubber = throttled(secrets, arn)
    settings = make_settings(api_keys="", api_keys_secret_arn=arn, retry_after_s=7)
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        key = {"Authorization": "Bearer k1"}
        refused = api.get("/v1/usage", headers=key)
        after = api.get("/v1/usage", headers=key)
    stubber.assert_no_pending_responses()
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "7"
    assert refused.json()["error"]["type"] == "service_unavailable"
    assert "ThrottlingException" not in refused.text  # the upstream's words go to the log only
    assert after.status_code == 200, after.text
    assert "ThrottlingException" in capsys.readouterr().out
