"""``make serve`` as a process: a killed tritonserver is replaced, signals stop everything.

Each test runs ``scripts/serve.py`` exactly as ``make serve`` does (the venv's
python, in the repository root) on the tiny repository, and counts processes
with psutil: the script's process tree, plus every process whose executable
names the server's private ``converse-triton-*`` directory (python-backend
stubs are reparented to PID 1 when their server dies, so they leave the tree).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from devtools.local_triton import free_port
from tests.helpers import TINY_CSM, TinyRepository

pytestmark = pytest.mark.triton

ROOT = Path(__file__).resolve().parents[1]
# Failure guards, not performance bounds (docs/PERFORMANCE.md has the measured restart time).
START_WAIT_S = 240.0
EXIT_WAIT_S = 60.0
STUB = "triton_python_backend_stub"


@dataclass
class Served:
    """A running ``scripts/serve.py``: its process, API URL and key."""

    process: subprocess.Popen[str]
    url: str
    key: str

    def tree(self) -> list[psutil.Process]:
        """The script and its descendants (tritonserver, its stubs)."""
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def tritonserver(self) -> psutil.Process:
        """The live tritonserver child."""
        (server,) = [p for p in self.tree() if p.name() == "tritonserver"]
        return server

    def ready(self) -> int:
        """Status of ``GET /ready`` (0 when the API does not answer)."""
        try:
            return httpx.get(f"{self.url}/ready", timeout=5).status_code
        except httpx.HTTPError:
            return 0


def _wait(predicate: object, what: str, timeout_s: float = START_WAIT_S) -> None:
    assert callable(predicate)
    ends = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < ends, f"timed out waiting until {what}"
        time.sleep(0.2)


def _leftovers(workdirs: set[Path]) -> list[psutil.Process]:
    """Live processes whose executable or command line names one of ``workdirs``."""
    found = []
    for process in psutil.process_iter(["exe", "cmdline"]):
        text = " ".join([process.info["exe"] or "", *(process.info["cmdline"] or [])])
        if any(str(workdir) in text for workdir in workdirs):
            found.append(process)
    return found


@pytest.fixture
def served(tiny_repository: TinyRepository) -> Iterator[Served]:
    """``scripts/serve.py`` on the tiny repository, ready; killed (group) if a test left it."""
    port = free_port()
    command = [str(ROOT / ".venv" / "bin" / "python"), "scripts/serve.py",
               "--repository", str(tiny_repository.repository), "--port", str(port)]
    if not Path(command[0]).exists():
        command[0] = sys.executable
    # PYTHONPATH: this checkout's packages, whichever checkout the venv was installed from.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("API key:"):
                break
        match = re.search(r"sk-local-\w+", "".join(lines))
        assert match, "".join(lines)
        yield Served(process, f"http://127.0.0.1:{port}", match.group(0))
    finally:
        if process.poll() is None:
            for leftover in Served(process, "", "").tree():
                leftover.kill()
            process.wait()


def _stop_and_count(served: Served, signum: signal.Signals) -> None:
    """Send ``signum``; the script exits 0 and no process of its tree or Triton's is left."""
    tree = served.tree()
    stubs = [p for p in tree if p.name() == STUB]
    assert stubs, "no python-backend stub was running"
    # .../converse-triton-XXXX/backends/python/triton_python_backend_stub
    workdirs = {Path(p.exe()).parents[2] for p in stubs}
    served.process.send_signal(signum)
    assert served.process.wait(timeout=EXIT_WAIT_S) == 0
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert alive == []
    assert _leftovers(workdirs) == []


def _speak(served: Served) -> httpx.Response:
    body = {"model": TINY_CSM, "conversation": [{"speaker": "0", "text": "Back again."}],
            "params": {"max_new_tokens": 16, "seed": 1}}
    headers = {"Authorization": f"Bearer {served.key}"}
    return httpx.post(f"{served.url}/v1/converse", json=body, headers=headers, timeout=120)


def test_killed_tritonserver_is_replaced_its_stubs_killed_and_sigterm_stops_all(
    served: Served,
) -> None:
    _wait(lambda: served.ready() == 200, "the stack is ready")
    old_server = served.tritonserver()
    old_tree = [p for p in served.tree() if p.pid != served.process.pid]
    assert any(STUB in " ".join(p.cmdline()) for p in old_tree)

    old_server.kill()
    old_server.wait(timeout=10)
    # The new server takes seconds to load its models; until then Triton refuses connections.
    assert served.ready() == 503
    down = _speak(served)
    assert down.status_code == 503, down.text
    assert int(down.headers["Retry-After"]) > 0

    _wait(lambda: served.ready() == 200, "the restarted stack is ready")
    _, alive = psutil.wait_procs(old_tree, timeout=1)
    assert alive == [], "processes of the killed server are still running"
    assert served.tritonserver().pid != old_server.pid
    response = _speak(served)
    assert response.status_code == 200, response.text
    assert response.json()["reply"]["audio"]["data_b64"]
    _stop_and_count(served, signal.SIGTERM)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=["ctrl-c", "hangup"])
def test_sigint_or_hangup_stops_the_api_and_the_whole_triton_tree(
    served: Served, signum: signal.Signals,
) -> None:
    _wait(lambda: served.ready() == 200, "the stack is ready")
    _stop_and_count(served, signum)


def test_sigterm_stops_a_foreground_local_triton_and_its_stubs(
    tiny_repository: TinyRepository,
) -> None:
    """``python -m devtools.local_triton``: its server runs in a session of its own."""
    command = [str(ROOT / ".venv" / "bin" / "python"), "-m", "devtools.local_triton",
               "--repository", str(tiny_repository.repository)]
    if not Path(command[0]).exists():
        command[0] = sys.executable
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    foreground = Served(process, "", "")
    try:
        assert process.stdout is not None
        started = next((line for line in process.stdout
                        if line.startswith("tritonserver ready")), None)
        assert started, "the server exited before it was ready"
        _stop_and_count(foreground, signal.SIGTERM)
    finally:
        if process.poll() is None:
            for leftover in foreground.tree():
                leftover.kill()
            process.wait()
