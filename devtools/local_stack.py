"""Triton + the API on loopback, for ``make demo``, ``make serve`` and the benchmarks.

``LocalStack`` starts the local tritonserver on the repository, then the
FastAPI app under uvicorn in a background thread on a free port, with a fresh
API key; leaving the context stops both. With ``supervise=True`` (``make
serve``) a watcher thread restarts a tritonserver that died (see
:class:`Supervisor`).
"""

from __future__ import annotations

import secrets
import sys
import threading
from pathlib import Path
from typing import Literal

from devtools.api_server import ApiServer
from devtools.local_triton import LocalTriton, TritonStartError, free_port
from devtools.service import Service
from handler.app import create_app
from handler.settings import Settings


class Supervisor:
    """Restart a dead tritonserver with exponential backoff, on its old ports.

    Every ``poll_s`` seconds the watcher thread checks that the server process
    is alive. When it is not, :meth:`LocalTriton.restart` kills what is left of
    its process tree (python-backend stubs included) and starts a new server;
    a start that fails is retried after ``first_backoff_s``, doubling up to
    ``max_backoff_s``. Meanwhile the API answers 503 with ``Retry-After`` and
    ``/ready`` says not ready, because Triton refuses connections. The backoff
    keeps a server that cannot start (a broken repository, a port taken) from
    spinning; the first restart is immediate, so a crash costs one server start
    (about 10 s for the tiny test repository on 2 cores).

    Args:
        triton: the started server to watch.
        poll_s: seconds between liveness checks.
        first_backoff_s: wait after the first failed restart, seconds.
        max_backoff_s: longest wait between restarts, seconds.
    """

    def __init__(
        self,
        triton: LocalTriton,
        poll_s: float = 0.2,
        first_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.triton = triton
        self.poll_s = poll_s
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self.restarts = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="triton-supervisor", daemon=True)

    def start(self) -> None:
        """Start watching."""
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; a restart in progress gives up and kills what it started."""
        self._stopping.set()
        if self._thread.is_alive():
            self.triton.abort_start()
            self._thread.join()

    def _watch(self) -> None:
        while not self._stopping.wait(self.poll_s):
            if not self.triton.is_alive():
                self._restart()

    def _restart(self) -> None:
        print(f"tritonserver (pid {self.triton.pid}) died; restarting", file=sys.stderr,
              flush=True)
        backoff = self.first_backoff_s
        while not self._stopping.is_set():
            try:
                self.triton.restart()
            except TritonStartError as error:
                if self._stopping.is_set():
                    return
                print(f"tritonserver restart failed, next try in {backoff:.0f} s: {error}",
                      file=sys.stderr, flush=True)
                if self._stopping.wait(backoff):
                    return
                backoff = min(2 * backoff, self.max_backoff_s)
                continue
            self.restarts += 1
            print(f"tritonserver restarted (pid {self.triton.pid})", file=sys.stderr, flush=True)
            return


class LocalStack(Service):
    """Local Triton plus the API server; ``base_url`` and ``api_key`` once entered.

    Args:
        repository: model repository root.
        port: API port on 127.0.0.1 (a free one if None).
        supervise: restart tritonserver when it dies (:class:`Supervisor`).
        triton_protocol: the API's ``triton_protocol``: ``grpc`` (inference calls of a
            client that disconnects stop inside Triton) or ``http``.
    """

    def __init__(self, repository: Path, port: int | None = None, supervise: bool = False,
                 triton_protocol: Literal["http", "grpc"] = "grpc") -> None:
        self.triton = LocalTriton(repository)
        self.triton_protocol = triton_protocol
        self.port = port or free_port()
        self.api_key = f"sk-local-{secrets.token_hex(12)}"
        self.supervisor = Supervisor(self.triton) if supervise else None
        self._api: ApiServer | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalStack:
        """Start Triton, then the API (and the supervisor); return once both answer.

        Anything raised on the way (a signal turned into ``KeyboardInterrupt``
        included) stops what was started before it propagates.
        """
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.triton.start()
        settings = Settings(
            triton_url=self.triton.http_url,
            triton_grpc_url=self.triton.grpc_url,
            triton_protocol=self.triton_protocol,
            api_keys=self.api_key,
        )
        self._api = ApiServer(create_app(settings), self.port).start()
        if self.supervisor is not None:
            self.supervisor.start()

    def stop(self) -> None:
        """Stop the supervisor, the API server thread, then Triton's whole process tree."""
        if self.supervisor is not None:
            self.supervisor.stop()
        if self._api is not None:
            self._api.stop()
        self.triton.stop()
