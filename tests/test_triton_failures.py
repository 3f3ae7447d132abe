"""Triton down -> 503 with Retry-After; Triton error -> 502; deadline -> 504."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fastapi.testclient import TestClient

from devtools.local_triton import LocalTriton, free_port
from handler.app import create_app
from handler.errors import InferenceError, ServiceUnavailable
from handler.settings import Settings
from handler.triton import TritonClient
from tests.helpers import AUTH, make_settings

CONVERSE = {"conversation": [{"speaker": "0", "text": "Hello there, how are you today?"}]}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unreachable_triton_is_503_with_retry_after(protocol: str) -> None:
    settings = make_settings(triton_url=f"127.0.0.1:{free_port()}",
                             triton_grpc_url=f"127.0.0.1:{free_port()}",
                             triton_protocol=protocol, retry_after_s=7)
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


async def voice_nobody(client: TritonClient) -> None:
    """Ask Kokoro for a voice it does not have (an error answer from the model)."""
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


def test_triton_error_is_inference_error(triton_url: str) -> None:
    with pytest.raises(InferenceError) as raised:
        asyncio.run(voice_nobody(TritonClient(triton_url)))
    assert "unknown voice" in raised.value.detail


@pytest.mark.triton
def test_grpc_errors_name_the_same_triton_codes_as_http(triton: LocalTriton) -> None:
    with pytest.raises(InferenceError) as over_http:
        asyncio.run(voice_nobody(TritonClient(triton.http_url)))
    with pytest.raises(InferenceError) as over_grpc:
        asyncio.run(voice_nobody(TritonClient(triton.http_url, grpc_url=triton.grpc_url)))
    assert "unknown voice" in over_grpc.value.detail
    assert over_grpc.value.upstream is not None and over_http.value.upstream is not None
    assert over_grpc.value.upstream.code == over_http.value.upstream.code != "UNKNOWN"
    assert over_grpc.value.upstream.status is None  # a gRPC answer has no HTTP status
    assert str(triton.grpc_port) not in str(over_grpc.value)


@pytest.mark.triton
def test_an_unreachable_grpc_endpoint_is_service_unavailable(triton: LocalTriton) -> None:
    client = TritonClient(triton.http_url, retry_after_s=3, grpc_url=f"127.0.0.1:{free_port()}")
    with pytest.raises(ServiceUnavailable) as raised:
        asyncio.run(voice_nobody(client))
    assert raised.value.headers == {"Retry-After": "3"}


def test_deadline_is_504_with_own_body(triton_url: str) -> None:
    settings = make_settings(triton_url=triton_url, triton_timeout_s=0.001)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        response = client.post("/v1/converse", json=CONVERSE, headers=AUTH)
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "timeout_error"


def test_deadlines_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="ordered"):
        Settings(triton_timeout_s=30, lambda_timeout_s=25, gateway_timeout_s=29)


# Triton stops while it answers (the body ends before its Content-Length); Triton
# cannot take the request now (a model not ready, a queue full: UNAVAILABLE, HTTP 503).
CUT_SHORT = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
             b"Content-Length: 1000\r\n\r\n{\"model_name\"")
UNAVAILABLE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
               b"Content-Length: 38\r\n\r\n{\"error\":\"Exceeds maximum queue size\"}")


@pytest.mark.parametrize("answer", [CUT_SHORT, UNAVAILABLE], ids=["cut_short", "unavailable"])
def test_an_answer_triton_could_not_finish_is_service_unavailable(answer: bytes) -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    async def run() -> None:
        server = await asyncio.start_server(reply, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            await voice_nobody(TritonClient(f"127.0.0.1:{port}", retry_after_s=7))
        finally:
            server.close()

    with pytest.raises(ServiceUnavailable) as raised:
        asyncio.run(run())
    assert raised.value.headers == {"Retry-After": "7"}
