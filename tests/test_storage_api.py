"""Saved voices, usage, rate limits, uploads and large responses through the API."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse, urlsplit

import boto3
import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient
from moto import mock_aws

from handler.app import create_app
from handler.schemas.converse import MAX_TURN_AUDIO_BYTES
from handler.services.telemetry import RequestRecord
from handler.storage.dynamodb import DynamoDBStorage
from tests.helpers import AUTH, asgi_post, make_settings, tone, wav_b64
from tests.moto_shims import refuse_long_sort_keys


@pytest.fixture(scope="module")
def small_inline(triton_url: str) -> Any:
    """An app whose inline threshold is 1 KB, so every audio answer becomes a URL."""
    settings = make_settings(triton_url=triton_url, inline_audio_max_bytes=1000)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def fetch(client: TestClient, url: str) -> Any:
    parsed = urlparse(url)
    return client.get(f"{parsed.path}?{parsed.query}")


def test_voice_crud_and_pagination(client: TestClient) -> None:
    created = [
        client.post("/v1/voices", json={"name": f"v{i}", "voice": "jf_alpha*2+jm_kumo*2"},
                    headers=AUTH)
        for i in range(3)
    ]
    assert all(r.status_code == 201 for r in created)
    ids = [r.json()["id"] for r in created]
    assert created[0].json()["voice"] == "jf_alpha*0.5+jm_kumo*0.5"
    assert created[0].json()["model"] == "kokoro"
    first = client.get("/v1/voices?limit=2", headers=AUTH).json()
    assert first["has_more"] is True and len(first["data"]) == 2
    rest = client.get(f"/v1/voices?limit=200&cursor={first['next_cursor']}", headers=AUTH).json()
    listed = [v["id"] for v in first["data"] + rest["data"]]
    assert listed[-3:] == ids and len(listed) == len(set(listed))
    assert rest["has_more"] is False and rest["next_cursor"] is None
    assert client.get(f"/v1/voices/{ids[0]}", headers=AUTH).json()["name"] == "v0"
    assert client.delete(f"/v1/voices/{ids[0]}", headers=AUTH).status_code == 204
    missing = client.get(f"/v1/voices/{ids[0]}", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    assert client.delete(f"/v1/voices/{ids[0]}", headers=AUTH).status_code == 404


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=201", "limit=abc", "cursor=not-a-cursor",
     "limit=%C2%B9",  # superscript one: str.isdigit() says yes, int() says no
     "limit=" + "9" * 5000],  # past int()'s 4300-digit limit
)
def test_bad_listing_queries(client: TestClient, query: str) -> None:
    response = client.get(f"/v1/voices?{query}", headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request"


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x", "voice": "alloy"},
        {"name": "x"},
        {"name": "x", "reference_audio_id": "abc", "transcript": "hello"},
        {"name": "x", "voice": "jf_alpha", "model": "nope"},
        {"name": "", "voice": "jf_alpha"},
    ],
)
def test_bad_voices_are_rejected(client: TestClient, body: dict[str, Any]) -> None:
    response = client.post("/v1/voices", json=body, headers=AUTH)
    assert response.status_code == 400, response.text


def test_a_saved_blend_with_a_tiny_weight_can_be_used(client: TestClient) -> None:
    saved = client.post("/v1/voices", headers=AUTH,
                        json={"name": "faint", "voice": "jf_alpha+jm_kumo*0.0000001"})
    assert saved.status_code == 201, saved.text
    body = {"turns": [{"voiceId": saved.json()["id"], "text": "Hello."}], "output": "pcm"}
    response = client.post("/v1/audio/conversation", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    assert saved.json()["voice"] == "jf_alpha*1+jm_kumo*0.0000001"


@pytest.fixture
def dynamodb_client(triton_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The API on DynamoDB (moto) that refuses sort keys over 1024 bytes, as AWS does."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    settings = make_settings(triton_url=triton_url, storage_backend="dynamodb")
    with mock_aws():
        DynamoDBStorage.create_tables(
            boto3.resource("dynamodb"), settings.dynamodb_voices_table,
            settings.dynamodb_usage_table, settings.dynamodb_rate_table,
            settings.dynamodb_sessions_table)
        app = create_app(settings)
        app.state.storage.voices.meta.client.meta.events.register(
            "provide-client-params.dynamodb.*", refuse_long_sort_keys)
        with TestClient(app, raise_server_exceptions=False) as test_client:
            yield test_client


def test_ids_that_cannot_be_voice_ids_are_not_found(dynamodb_client: TestClient) -> None:
    long_id = "a" * 1025
    for method in ("GET", "DELETE"):
        response = dynamodb_client.request(method, f"/v1/voices/{long_id}", headers=AUTH)
        assert response.status_code == 404, response.text
        assert response.json()["error"]["type"] == "not_found"
    saved = dynamodb_client.post("/v1/voices", json={"name": "n", "voice": "jf_alpha"},
                                 headers=AUTH)
    assert dynamodb_client.get(f"/v1/voices/{saved.json()['id']}", headers=AUTH).json() == (
        saved.json())


def test_session_ids_that_were_never_issued_are_not_found(dynamodb_client: TestClient) -> None:
    long_id = "conv_" + "a" * 1100
    for method in ("GET", "DELETE"):
        response = dynamodb_client.request(method, f"/v1/conversations/{long_id}", headers=AUTH)
        assert response.status_code == 404, response.text
        assert response.json()["error"]["type"] == "not_found"


def test_a_write_that_outlasts_the_deadline_is_answered_not_refused(triton_url: str) -> None:
    """A 504 would leave the voice stored and a retry would store a second one."""
    settings = make_settings(triton_url=triton_url, triton_timeout_s=1.0, lambda_timeout_s=2.0,
                             gateway_timeout_s=3.0)
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        storage = api.app.state.storage  # type: ignore[attr-defined]
        put_voice = storage.put_voice

        def slow_put_voice(voice: Any) -> None:  # e.g. SQLite waiting on a busy database
            time.sleep(1.5)
            put_voice(voice)

        storage.put_voice = slow_put_voice
        created = api.post("/v1/voices", json={"name": "slow", "voice": "jf_alpha"}, headers=AUTH)
        listed = api.get("/v1/voices", headers=AUTH).json()["data"]
    assert created.status_code == 201, created.text
    assert [v["id"] for v in listed] == [created.json()["id"]]


def test_saved_and_inline_voices_mix_in_one_conversation(client: TestClient) -> None:
    saved = client.post("/v1/voices", json={"name": "host", "voice": "jm_kumo"}, headers=AUTH)
    voice_id = saved.json()["id"]
    body = {"turns": [{"voiceId": voice_id, "text": "Hello there."},
                      {"voice": "jf_alpha", "model": "kokoro", "text": "Hi!"}],
            "split": True}
    response = client.post("/v1/audio/conversation", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    assert [s["turnIndex"] for s in response.json()["audioSegments"]] == [0, 1]
    inline = client.post("/v1/audio/conversation", headers=AUTH, json={
        "turns": [{"voice": "jm_kumo", "text": "Hello there."}], "output": "pcm"})
    by_id = client.post("/v1/audio/conversation", headers=AUTH, json={
        "turns": [{"voiceId": voice_id, "text": "Hello there."}], "output": "pcm"})
    assert inline.content == by_id.content


def test_usage_counts_requests_of_this_key(triton_url: str) -> None:
    settings = make_settings(triton_url=triton_url)
    with TestClient(create_app(settings)) as client:
        clip = wav_b64(tone(2.0), 24_000)
        client.post("/v1/converse", headers=AUTH,
                    json={"conversation": [{"speaker": "0", "audio_wav_b64": clip},
                                           {"speaker": "1", "text": "Hello."}]})
        client.post("/v1/audio/conversation", headers=AUTH,
                    json={"turns": [{"voice": "jm_kumo", "text": "Hi there."}], "gapMs": 0})
        usage = client.get("/v1/usage", headers=AUTH).json()
    assert usage["requests"] == 2
    assert usage["input_chars"] == len("Hello.") + len("Hi there.")
    assert usage["input_audio_seconds"] == pytest.approx(2.0, abs=1e-3)
    assert usage["output_audio_seconds"] > 0.5 and usage["last_request_ts"] > 0
    assert len(usage["key_id"]) == 16


def test_rate_limit_under_concurrency(triton_url: str) -> None:
    settings = make_settings(triton_url=triton_url, rate_limit_capacity=5,
                             rate_limit_per_minute=0.001)
    with TestClient(create_app(settings)) as client, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: client.get("/v1/models", headers=AUTH), range(20)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 5 + [429] * 15
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.json()["error"]["type"] == "rate_limit_exceeded"
    assert int(limited.headers["retry-after"]) >= 1
    for response in responses:
        assert response.headers["x-ratelimit-limit"] == "5"
        assert int(response.headers["x-ratelimit-remaining"]) >= 0
        assert int(response.headers["x-ratelimit-reset"]) > 0


def test_upload_then_reference_by_audio_id(client: TestClient) -> None:
    upload = client.post("/v1/uploads", headers=AUTH)
    assert upload.status_code == 201
    info = upload.json()
    buffer = io.BytesIO()
    sf.write(buffer, tone(1.25, 16_000), 16_000, format="WAV", subtype="PCM_16")
    parsed = urlparse(info["upload_url"])
    assert client.put(f"{parsed.path}?{parsed.query}", content=buffer.getvalue()).status_code == 204
    tampered = parsed.query.replace("signature=", "signature=0")
    assert client.put(f"{parsed.path}?{tampered}", content=b"x").status_code == 401
    body = {"conversation": [{"speaker": "0", "audio_id": info["id"]},
                             {"speaker": "1", "text": "Nice clip."}]}
    response = client.post("/v1/converse", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["input_audio_seconds"] == pytest.approx(1.25, abs=1e-3)
    missing = {"conversation": [{"speaker": "0", "audio_id": "nope"},
                                {"speaker": "1", "text": "Hi."}]}
    bad = client.post("/v1/converse", json=missing, headers=AUTH)
    assert bad.status_code == 400 and "audio_id" in bad.json()["error"]["message"]


def test_large_converse_reply_comes_back_as_url(small_inline: TestClient) -> None:
    body = {"conversation": [{"speaker": "0", "text": "This reply is too big to inline."}]}
    audio = small_inline.post("/v1/converse", json=body, headers=AUTH).json()["reply"]["audio"]
    assert audio["data_b64"] is None and audio["expires_in"] == 3600
    download = fetch(small_inline, audio["url"])
    assert download.status_code == 200 and download.headers["content-type"] == "audio/wav"
    samples, rate = sf.read(io.BytesIO(download.content))
    assert rate == 24_000 and len(samples) > 24_000


def test_large_conversation_and_split_come_back_as_urls(small_inline: TestClient) -> None:
    turns = [{"voice": "jm_kumo", "text": "First turn."}, {"voice": "jf_alpha", "text": "Second."}]
    stitched = small_inline.post("/v1/audio/conversation", headers=AUTH,
                                 json={"turns": turns, "output": "pcm"})
    assert stitched.headers["content-type"] == "application/json"
    link = stitched.json()
    assert link["mediaType"] == "audio/pcm"
    whole = np.frombuffer(fetch(small_inline, link["audio"]["url"]).content, "<i2")
    split = small_inline.post("/v1/audio/conversation", headers=AUTH,
                              json={"turns": turns, "output": "pcm", "split": True}).json()
    parts = [np.frombuffer(fetch(small_inline, s["url"]).content, "<i2")
             for s in split["audioSegments"]]
    assert all(s["audio"] is None for s in split["audioSegments"])
    assert np.array_equal(whole, np.concatenate(parts))


def test_expired_or_unsigned_file_urls_are_refused(client: TestClient) -> None:
    assert client.get("/v1/files/responses/x/y.wav").status_code == 401
    assert client.get("/v1/files/responses/x/y.wav?expires=1&signature=00").status_code == 401



@pytest.mark.parametrize("method", ["GET", "PUT"])
@pytest.mark.parametrize(
    "expires",
    ["%C2%B2",  # superscript two: str.isdigit() says yes, int() says no
     "9" * 5000],  # past int()'s 4300-digit limit
    ids=["superscript", "5000-digits"],
)
def test_file_urls_whose_expiry_is_no_ascii_number_are_refused(
    client: TestClient, method: str, expires: str
) -> None:
    response = client.request(method, f"/v1/files/uploads/x.wav?expires={expires}&signature=00",
                              content=b"RIFF" if method == "PUT" else None)
    assert response.status_code == 401, response.text
    assert response.json()["error"] == {
        "type": "authentication_error", "message": "invalid or expired file signature",
        "request_id": response.headers["x-request-id"]}


MIB = 1 << 20


def no_triton_app() -> Any:
    """The API over an address where no Triton listens: these requests never reach it."""
    return create_app(make_settings(triton_url="127.0.0.1:9", log_requests=False))


def send_raw(
    app: Any, scope: dict[str, Any], chunks: Iterable[bytes], leaves: bool = False
) -> tuple[list[dict[str, Any]], int, RequestRecord]:
    """Send ``chunks`` as the body of ``scope``'s request, as a server would.

    ``leaves``: the client disconnects after the last chunk instead of ending
    the body. Returns the ASGI messages the app sent, the body bytes it took
    and the request's log record.
    """
    source = iter(chunks)
    taken, ended = 0, False

    async def receive() -> dict[str, Any]:
        nonlocal taken, ended
        chunk = None if ended else next(source, None)
        if chunk is not None:
            taken += len(chunk)
            return {"type": "http.request", "body": chunk, "more_body": True}
        if leaves or ended:
            return {"type": "http.disconnect"}
        ended = True
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent, taken, scope["state"]["record"]


def upload_scope(app: Any, key: str, declared: int | None) -> dict[str, Any]:
    """The ASGI scope of a signed ``PUT`` of ``key`` (``declared``: its Content-Length)."""
    url = urlsplit(app.state.blobs.upload_url(key, 300, "http://testserver"))
    headers = [(b"host", b"testserver"), (b"content-type", b"audio/wav")]
    if declared is not None:
        headers.append((b"content-length", str(declared).encode()))
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "PUT",
        "scheme": "http", "path": url.path, "raw_path": url.path.encode(),
        "query_string": url.query.encode(), "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 1), "server": ("testserver", 80), "state": {},
    }


def mebibytes(count: int) -> Iterator[bytes]:
    return (b"\0" * MIB for _ in range(count))


def test_an_upload_declared_over_25_mib_is_413_before_its_body_is_read() -> None:
    app = no_triton_app()
    scope = upload_scope(app, "uploads/k/big.wav", declared=30 * MIB)
    sent, taken, record = send_raw(app, scope, mebibytes(30))
    assert sent[0]["status"] == 413 and taken == 0
    assert b'"type":"invalid_request"' in sent[1]["body"]
    assert (record.status, record.error_code) == (413, "payload_too_large")
    assert app.state.blobs.get("uploads/k/big.wav", max_bytes=64 * MIB) is None


def test_an_undeclared_upload_over_25_mib_is_413_once_it_passes_the_limit() -> None:
    app = no_triton_app()
    scope = upload_scope(app, "uploads/k/chunked.wav", declared=None)
    sent, taken, record = send_raw(app, scope, mebibytes(30))
    assert sent[0]["status"] == 413
    assert taken == MAX_TURN_AUDIO_BYTES + MIB  # read up to the first chunk past the limit
    assert (record.status, record.error_code) == (413, "payload_too_large")


def test_an_upload_of_exactly_25_mib_is_stored() -> None:
    app = no_triton_app()
    scope = upload_scope(app, "uploads/k/full.wav", declared=MAX_TURN_AUDIO_BYTES)
    sent, _, _ = send_raw(app, scope, mebibytes(MAX_TURN_AUDIO_BYTES // MIB))
    assert sent[0]["status"] == 204
    stored = app.state.blobs.get("uploads/k/full.wav", max_bytes=64 * MIB)
    assert stored is not None and len(stored) == MAX_TURN_AUDIO_BYTES


def test_a_client_that_leaves_during_an_upload_is_a_499_not_an_error() -> None:
    app = no_triton_app()
    scope = upload_scope(app, "uploads/k/gone.wav", declared=10 * MIB)
    sent, _, record = send_raw(app, scope, mebibytes(2), leaves=True)  # raises nothing
    assert sent[0]["status"] == 499
    assert (record.status, record.error_code) == (499, "client_closed_request")
    assert app.state.blobs.get("uploads/k/gone.wav", max_bytes=64 * MIB) is None


@pytest.mark.parametrize("path", ["/v1/voices", "/v1/converse", "/v1/audio/conversation"])
def test_a_client_that_leaves_while_sending_json_is_a_499_not_an_error(path: str) -> None:
    """Every route that reads its JSON with parse_body."""
    app = no_triton_app()
    sent, _, record = send_raw(app, asgi_post(path, b"x" * 10_000), [b'{"turns": ['], leaves=True)
    assert sent[0]["status"] == 499
    assert (record.status, record.error_code) == (499, "client_closed_request")
