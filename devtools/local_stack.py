"""Triton + the API on loopback, for ``make demo``, ``make serve`` and the benchmarks.

``LocalStack`` starts the local tritonserver on the repository, then the
FastAPI app under uvicorn in a background thread on a free port, with a fresh
API key; leaving the context stops both.
"""

from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path

import uvicorn

from devtools.local_triton import LocalTriton, free_port
from devtools.service import Service
from handler.app import create_app
from handler.settings import Settings


class LocalStack(Service):
    """Local Triton plus the API server; ``base_url`` and ``api_key`` once entered."""

    def __init__(self, repository: Path, port: int | None = None) -> None:
        self.triton = LocalTriton(repository)
        self.port = port or free_port()
        self.api_key = f"sk-local-{secrets.token_hex(12)}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalStack:
        """Start Triton, then the API; return once both answer."""
        self.triton.start()
        settings = Settings(triton_url=self.triton.http_url, api_keys=self.api_key)
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                raise RuntimeError("the API server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stop the API server thread, then Triton."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=15)
        self.triton.stop()
