"""API Gateway events through ``handler.lambda_function.handler`` (Mangum)."""

from __future__ import annotations

import base64
import importlib
import io
import json
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import soundfile as sf

from tests.helpers import API_KEY, STATE_DIR, TEST_DEADLINES


class FakeContext:
    function_name = "converse"
    aws_request_id = "lambda-req-1"


def load_lambda(triton_url: str, **env: str) -> Iterator[ModuleType]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONVERSE_TRITON_URL", triton_url)
        patch.setenv("CONVERSE_API_KEYS", API_KEY)
        patch.setenv("CONVERSE_SQLITE_PATH", str(STATE_DIR / "lambda.db"))
        patch.setenv("CONVERSE_BLOB_DIR", str(STATE_DIR / "lambda-blobs"))
        patch.setenv("CONVERSE_RATE_LIMIT_CAPACITY", "100000")
        for name, seconds in TEST_DEADLINES.items():
            patch.setenv(f"CONVERSE_{name.upper()}", str(seconds))
        for name, value in env.items():
            patch.setenv(name, value)
        import handler.lambda_function

        yield importlib.reload(handler.lambda_function)


@pytest.fixture(scope="module")
def lambda_module(triton_url: str) -> Iterator[ModuleType]:
    yield from load_lambda(triton_url)


@pytest.fixture(scope="module")
def small_inline_lambda(triton_url: str) -> Iterator[ModuleType]:
    yield from load_lambda(triton_url, CONVERSE_INLINE_AUDIO_MAX_BYTES="1000")


def http_api_v2_event(method: str, path: str, body: Any = None) -> dict[str, Any]:
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": "",
        "headers": {"authorization": f"Bearer {API_KEY}", "content-type": "application/json",
                    "host": "api.example.com", "x-forwarded-proto": "https"},
        "requestContext": {
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1",
                     "sourceIp": "203.0.113.1", "userAgent": "pytest"},
            "requestId": "abc", "routeKey": "$default", "stage": "$default",
        },
        "body": json.dumps(body) if body is not None else None,
        "isBase64Encoded": False,
    }


def rest_v1_event(method: str, path: str, body: Any = None) -> dict[str, Any]:
    return {
        "resource": "/{proxy+}",
        "path": path,
        "httpMethod": method,
        "headers": {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json",
                    "Host": "api.example.com", "X-Forwarded-Proto": "https"},
        "multiValueHeaders": {},
        "queryStringParameters": None,
        "multiValueQueryStringParameters": None,
        "requestContext": {"resourcePath": "/{proxy+}", "httpMethod": method, "stage": "prod",
                           "identity": {"sourceIp": "203.0.113.1"}, "requestId": "abc"},
        "body": json.dumps(body) if body is not None else None,
        "isBase64Encoded": False,
    }


CONVERSATION = {"model": "kokoro", "turns": [{"voice": "jm_kumo", "text": "Hello there."}]}


@pytest.mark.parametrize("make_event", [http_api_v2_event, rest_v1_event])
def test_models_json(lambda_module: ModuleType, make_event: Any) -> None:
    result = lambda_module.handler(make_event("GET", "/v1/models"), FakeContext())
    assert result["statusCode"] == 200
    assert result["isBase64Encoded"] is False
    assert json.loads(result["body"])["data"][0]["id"] == "kokoro"


@pytest.mark.parametrize("make_event", [http_api_v2_event, rest_v1_event])
def test_audio_comes_back_base64(lambda_module: ModuleType, make_event: Any) -> None:
    result = lambda_module.handler(make_event("POST", "/v1/audio/conversation", CONVERSATION),
                                   FakeContext())
    assert result["statusCode"] == 200 and result["isBase64Encoded"] is True
    headers = {k.lower(): v for k, v in result.get("headers", {}).items()}
    assert headers["content-type"] == "audio/wav" and headers["x-request-id"]
    samples, rate = sf.read(io.BytesIO(base64.b64decode(result["body"])))
    assert rate == 24_000 and len(samples) > 0


@pytest.mark.parametrize("make_event", [http_api_v2_event, rest_v1_event])
def test_error_envelope(lambda_module: ModuleType, make_event: Any) -> None:
    result = lambda_module.handler(make_event("POST", "/v1/converse", {"conversation": []}),
                                   FakeContext())
    assert result["statusCode"] == 400
    assert json.loads(result["body"])["error"]["type"] == "invalid_request"


@pytest.mark.parametrize("make_event", [http_api_v2_event, rest_v1_event])
def test_over_threshold_response_is_a_url(small_inline_lambda: ModuleType, make_event: Any) -> None:
    event = make_event("POST", "/v1/audio/conversation", CONVERSATION)
    result = small_inline_lambda.handler(event, FakeContext())
    assert result["statusCode"] == 200 and result["isBase64Encoded"] is False
    body = json.loads(result["body"])
    assert body["mediaType"] == "audio/wav"
    assert body["audio"]["url"].startswith("https://api.example.com/")
    assert "/v1/files/responses/" in body["audio"]["url"] and body["audio"]["expires_in"] > 0
