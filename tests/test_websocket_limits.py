"""The live-session socket's message limit on real uvicorn: the app answers a message a
little over it (4413), the WebSocket layer refuses a much larger one (1009) before it is
held whole, where websockets' default would take 16 MiB first."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from devtools.api_server import WS_MAX_SIZE_FACTOR, ApiServer
from handler.app import create_app
from handler.sessions.protocol import CloseCode
from tests.helpers import API_KEY, make_settings

LIMIT = 4096  # CONVERSE_SESSION_MAX_MESSAGE_BYTES under test, bytes
PERSONA = {"voice_id": "jf_alpha", "system_prompt": "Listen."}


def auth() -> dict[str, str]:
    """A fresh header dict: Starlette's TestClient adds its handshake headers to the dict
    it is given (``tests.helpers.AUTH`` in other tests), which a real handshake must not send."""
    return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(triton_url: str) -> Iterator[ApiServer]:
    app = create_app(make_settings(triton_url=triton_url, session_max_message_bytes=LIMIT))
    with ApiServer(app) as running:
        yield running


def close_code_after_sending(server: ApiServer, message: bytes) -> int:
    """Open a session's socket, send ``message``, return the code the server closes with."""
    created = httpx.post(f"{server.base_url}/v1/conversations/create", json=PERSONA,
                         headers=auth(), timeout=30)
    assert created.status_code == 201, created.text
    url = (server.base_url.replace("http", "ws")
           + f"/v1/conversations/{created.json()['session_id']}/stream")
    with connect(url, additional_headers=auth(), max_size=None, open_timeout=30) as socket:
        socket.recv(timeout=30)  # session.started
        socket.send(message)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                socket.recv(timeout=30)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code


@pytest.mark.parametrize(
    ("size", "code"),
    [(LIMIT + 2, CloseCode.MESSAGE_TOO_BIG), (WS_MAX_SIZE_FACTOR * LIMIT + 2, 1009)],
    ids=["over-the-app-limit", "over-the-websocket-limit"],
)
def test_oversized_messages_close_the_socket(server: ApiServer, size: int, code: int) -> None:
    assert close_code_after_sending(server, b"\0" * size) == code
