"""Triton down -> 503 with Retry-After; Triton error -> 502; deadline -> 504."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fastapi.testclient import TestClient

from devtools.local_triton import free_port
from handler.app import create_app
from handler.errors import InferenceError
from handler.settings import Settings
from handler.triton import TritonClient
from tests.helpers import AUTH, make_settings

CONVERSE = {"conversation": [{"speaker": "0", "text": "Hello there, how are you today?"}]}


def test_unreachable_triton_is_503_with_retry_after() -> None:
    settings = make_settings(triton_url=f"127.0.0.1:{free_port()}", retry_after_s=7)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        response = client.post("/v1/converse", json=CONVERSE, headers=AUTH)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "7"
        assert response.json()["error"]["type"] == "service_unavailable"
        problem = client.post(
            "/v1/audio/conversation", json={"turns": [{"voice": "jf_alpha", "text": "Hi."}]},
            headers=AUTH,
        )
        assert problem.status_code == 503 and problem.json()["code"] == "service_unavailable"
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/ready").status_code == 503


def test_triton_error_is_inference_error(triton_url: str) -> None:
    async def bad_voice() -> None:
        client = TritonClient(triton_url)
        try:
            await client.infer(
                "kokoro",
                {
                    "TEXT": np.array([b"Hello."], dtype=np.object_),
                    "VOICE": np.array([b"nobody*1"], dtype=np.object_),
                    "SPEED": np.array([1.0], np.float32),
                },
                ["AUDIO"],
            )
        finally:
            await client.close()

    with pytest.raises(InferenceError) as raised:
        asyncio.run(bad_voice())
    assert "unknown voice" in raised.value.detail


def test_deadline_is_504_with_own_body(triton_url: str) -> None:
    settings = make_settings(triton_url=triton_url, triton_timeout_s=0.001)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        response = client.post("/v1/converse", json=CONVERSE, headers=AUTH)
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "timeout_error"


def test_deadlines_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="ordered"):
        Settings(triton_timeout_s=30, lambda_timeout_s=25, gateway_timeout_s=29)
