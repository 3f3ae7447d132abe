"""The API app under uvicorn in a background thread on a loopback port (HTTP and WebSockets)."""

from __future__ import annotations

import logging
import threading
import time

import uvicorn
from fastapi import FastAPI

from devtools.local_triton import free_port
from devtools.service import Service
from handler.sessions.transport import CLEANUP_S
from handler.settings import Settings

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 2 * CLEANUP_S + 5.0  # seconds
# uvicorn's WebSocket layer (``--ws-max-size``, ``--ws-max-queue``; the sessions service's
# terraform passes the same): a message up to twice CONVERSE_SESSION_MAX_MESSAGE_BYTES is
# read and answered by the app (4413); a bigger one websockets refuses (1009) before it
# holds it whole, where its default would take 16 MiB; at most this many wait unread.
WS_MAX_QUEUE = 4
WS_MAX_SIZE_FACTOR = 2
logger = logging.getLogger(__name__)


class ApiServer(Service):
    """uvicorn serving ``app`` on ``127.0.0.1``; ``base_url`` once started.

    Args:
        app: the FastAPI app (``handler.app.create_app``).
        port: TCP port; a free one when None.
    """

    def __init__(self, app: FastAPI, port: int | None = None) -> None:
        self.port = port or free_port()
        settings: Settings = app.state.settings
        self._server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                ws_max_size=WS_MAX_SIZE_FACTOR * settings.session_max_message_bytes,
                ws_max_queue=WS_MAX_QUEUE,
            )
        )
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ApiServer:
        """Serve in a daemon thread; return once uvicorn is listening.

        Raises:
            RuntimeError: uvicorn did not start within :data:`START_TIMEOUT_S`.
        """
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                raise RuntimeError("the API server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Ask uvicorn to exit and join its thread (open sockets are closed by uvicorn)."""
        if self._thread is not None:
            self._server.should_exit = True
            # A closing live socket may take up to 2 x CLEANUP_S (transport.py) to finish.
            self._thread.join(timeout=STOP_TIMEOUT_S)
            if self._thread.is_alive():
                logger.warning("the API server did not stop within %s s", STOP_TIMEOUT_S)
            self._thread = None
