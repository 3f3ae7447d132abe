"""Run the ``tritonserver`` binary shipped in the ``nvidia-pytriton`` wheel on CPU.

Quirks of that binary (tritonserver 2.51) handled here:
  * its python backend needs ``triton_python_backend_stub`` next to
    ``libtriton_python.so``, so the backend folder is copied into a private
    directory with the stub for this interpreter's Python version;
  * the stub links ``libcudart`` from ``nvidia_pytriton.libs`` through a
    relative rpath that the copy breaks, and takes its Python prefix from the
    ``libpython`` it loads: both directories go on ``LD_LIBRARY_PATH``;
  * the stub ignores ``PYTHONPATH``: the python models read this project's
    site-packages from ``CONVERSE_SITE_PACKAGES`` instead (and so get numpy
    1.26; with numpy 2 the stub returns empty tensors);
  * a server that is killed (SIGKILL) leaves its python backend's shared-memory
    regions in ``/dev/shm``, which is RAM: each server gets its own region
    prefix, and the regions of a killed one are removed;
  * a server outlives a parent that is killed: it gets SIGTERM when its
    parent dies (``parent_death_signal``), and shuts down as on ``stop``.

Usage::

    with LocalTriton(Path("build/model_repository")) as triton:
        print(triton.http_url)   # e.g. "127.0.0.1:40123"

or ``python -m devtools.local_triton [--repository DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from devtools import REPOSITORY
from devtools.service import Service
from devtools.signals import parent_death_signal, stop_on_signals

# Where POSIX shared memory (shm_open(3)) lives on Linux.
SHARED_MEMORY_DIR = Path("/dev/shm")


class TritonStartError(RuntimeError):
    """tritonserver exited or did not become ready in time; carries its log tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pytriton_dir() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent


class LocalTriton(Service):
    """A tritonserver process on loopback serving a model repository.

    Args:
        repository: model repository root (written by ``python -m export``).
        ready_timeout_s: seconds to wait for ``/v2/health/ready``.
        log_path: file for the server's stdout/stderr; a temp file if None.

    Raises (from ``start``):
        TritonStartError: if the server exits or is not ready within the timeout.
    """

    def __init__(
        self, repository: Path, ready_timeout_s: float = 180.0, log_path: Path | None = None
    ) -> None:
        self.repository = repository.resolve()
        self.ready_timeout_s = ready_timeout_s
        self.log_path = log_path
        self.http_port = 0
        self.grpc_port = 0
        self.metrics_port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._backends: Path | None = None
        self._shm_prefix = ""
        self._abort = threading.Event()

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint (tritonclient's ``url`` form)."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint (streaming, decoupled models)."""
        return f"127.0.0.1:{self.grpc_port}"

    def _prepare_backends(self, workdir: Path) -> Path:
        server_dir = _pytriton_dir() / "tritonserver"
        backends = workdir / "backends"
        shutil.copytree(server_dir / "backends", backends)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
        shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
        return backends

    def _environment(self) -> dict[str, str]:
        env = os.environ.copy()
        libs = [
            str(sysconfig.get_config_var("LIBDIR")),
            str(_pytriton_dir().parent / "nvidia_pytriton.libs"),
        ]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        env["CONVERSE_SITE_PACKAGES"] = sysconfig.get_paths()["purelib"]
        return env

    def start(self) -> LocalTriton:
        """Start the server and block until it reports ready.

        Raises:
            TritonStartError: it exited or was not ready within ``ready_timeout_s``
                (the process tree and the private directory are gone by then).
        """
        self._abort.clear()
        self._workdir = tempfile.TemporaryDirectory(prefix="converse-triton-")
        workdir = Path(self._workdir.name)
        self._backends = self._prepare_backends(workdir)
        # The python backend names its regions <prefix><uuid>; the default prefix is
        # shared by every server on the machine, this one is not.
        self._shm_prefix = "converse_" + workdir.name.removeprefix("converse-triton-") + "_"
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log_path = self.log_path or workdir / "tritonserver.log"
        try:
            self._launch()
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self) -> None:
        """Kill what is left of the server's process tree, start a new one on the same ports.

        Blocks until the new server is ready. The ports stay the same so that
        clients (the API's ``triton_url``) need no new address.

        Raises:
            TritonStartError: the new server exited or was not ready in time
                (its process tree is gone by then; ``restart`` may be called again).
        """
        if self._workdir is None:
            raise RuntimeError("restart() before start()")
        self._kill_tree()
        self._launch()

    def abort_start(self) -> None:
        """Make a ``start``/``restart`` waiting in another thread give up (TritonStartError)."""
        self._abort.set()

    def is_alive(self) -> bool:
        """True while the tritonserver process started last has not exited."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the tritonserver started last (None when stopped)."""
        return None if self._process is None else self._process.pid

    def _launch(self) -> None:
        assert self._backends is not None and self.log_path is not None
        command = [
            str(_pytriton_dir() / "tritonserver" / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={self._backends}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=false",
            "--exit-on-error=true",
            "--log-verbose=0",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
        ]
        with self.log_path.open("ab") as log:
            # start_new_session: the server and its python stubs form one
            # process group (and session) that _kill_tree signals as a whole.
            # A restart runs on the Supervisor's thread, which lives until the stack stops.
            self._process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                cwd=self._backends.parent,
                start_new_session=True,
                preexec_fn=parent_death_signal(signal.SIGTERM),
            )
        self._wait_ready()

    def _log_tail(self, lines: int = 40) -> str:
        try:
            text = Path(str(self.log_path)).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def is_ready(self) -> bool:
        """True if ``GET /v2/health/ready`` answers 200."""
        url = f"http://{self.http_url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                tail = self._log_tail()
                self._kill_tree()
                raise TritonStartError(f"tritonserver exited during startup:\n{tail}")
            if self.is_ready():
                return
            if self._abort.wait(0.25):
                self._kill_tree()
                raise TritonStartError("tritonserver start aborted")
        tail = self._log_tail()
        self._kill_tree()
        raise TritonStartError(f"tritonserver not ready after {self.ready_timeout_s} s:\n{tail}")

    def processes(self) -> list[psutil.Process]:
        """Every live process of this server's tree: the server, its stubs, their children.

        Found three ways, because a killed server's python-backend stubs are
        reparented to PID 1 and no longer show up as its children: the server's
        descendants, members of its process group, and any process whose
        executable lies in this server's private backend directory (the stub
        copy of ``_prepare_backends``).
        """
        found: dict[int, psutil.Process] = {}
        group = self.pid
        # Only a server not yet reaped still owns its pid (a reaped one's may be reused).
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(psutil.Error):
                server = psutil.Process(self._process.pid)
                found.update((p.pid, p) for p in [server, *server.children(recursive=True)])
        backends = str(self._backends) + os.sep if self._backends is not None else None
        for process in psutil.process_iter(["exe"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                in_group = group is not None and os.getpgid(process.pid) == group
                exe = process.info["exe"] or ""
                if in_group or (backends is not None and exe.startswith(backends)):
                    found[process.pid] = process
        return [p for p in found.values() if p.is_running()]

    def _kill_tree(self, grace_s: float = 0.0) -> None:
        """SIGTERM the server's tree (when ``grace_s`` > 0), SIGKILL what is left, reap it."""
        process = self._process
        if process is not None and grace_s > 0 and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=grace_s)
        left = self.processes()
        for leftover in left:
            with contextlib.suppress(psutil.Error):
                leftover.kill()
        psutil.wait_procs(left, timeout=10)
        if process is not None:
            process.wait()
        self._process = None
        self._remove_shared_memory()

    def shared_memory_regions(self) -> list[Path]:
        """This server's python-backend shared-memory regions in ``/dev/shm``."""
        if not self._shm_prefix:
            return []
        return sorted(SHARED_MEMORY_DIR.glob(self._shm_prefix + "*"))

    def _remove_shared_memory(self) -> None:
        """Unlink the regions a killed tree left (a server that shut down removed its own)."""
        for region in self.shared_memory_regions():
            region.unlink(missing_ok=True)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the server's process group, SIGKILL its whole tree after ``grace_s``; idempotent.

        Afterwards no process of the tree is left (stubs included) and the
        private directory is removed.
        """
        self._kill_tree(grace_s)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
            self._backends = None


def main(argv: list[str] | None = None) -> int:
    """Serve a repository in the foreground until Ctrl-C, SIGTERM or SIGHUP."""
    parser = argparse.ArgumentParser(prog="python -m devtools.local_triton")
    parser.add_argument("--repository", type=Path, default=REPOSITORY)
    args = parser.parse_args(argv)
    stop_on_signals()
    with LocalTriton(args.repository) as triton:
        print(f"tritonserver ready at http://{triton.http_url} (Ctrl-C stops it)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
