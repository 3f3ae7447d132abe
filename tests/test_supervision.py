"""``make serve`` as a process: a killed tritonserver is replaced, signals stop everything.

Each test runs ``scripts/serve.py`` exactly as ``make serve`` does (the venv's
python, in the repository root) on the tiny repository, and counts processes
with psutil: the script's process tree, plus every process whose executable
names the server's private ``converse-triton-*`` directory (python-backend
stubs are reparented to PID 1 when their server dies, so they leave the tree),
and the python backend's shared-memory regions in ``/dev/shm`` (RAM that a
killed server does not give back by itself).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from devtools.local_triton import SHARED_MEMORY_DIR, free_port
from devtools.signals import parent_death_signal
from tests.helpers import TINY_CSM, TinyRepository

pytestmark = pytest.mark.triton

ROOT = Path(__file__).resolve().parents[1]
# Failure guards, not performance bounds (docs/PERFORMANCE.md has the measured restart time).
START_WAIT_S = 240.0
EXIT_WAIT_S = 60.0
STUB = "triton_python_backend_stub"
# The scripts under test stop their stack on SIGTERM: a pytest killed outright leaves none.
STOP_WITH_PYTEST = parent_death_signal(signal.SIGTERM)


@dataclass
class Served:
    """A running ``scripts/serve.py``: its process, API URL and key.

    ``workdirs`` collects the private server directories a test has seen, so
    that cleanup after a failure can find stubs that left the tree.
    """

    process: subprocess.Popen[str]
    url: str
    key: str
    workdirs: set[Path] = field(default_factory=set)

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


def _regions(processes: list[psutil.Process]) -> set[Path]:
    """Shared-memory regions the python-backend stubs among ``processes`` were started with."""
    stubs = [p for p in processes if p.name() == STUB]
    assert stubs, "no python-backend stub was running"
    named = {SHARED_MEMORY_DIR / argument for stub in stubs for argument in stub.cmdline()[1:]
             if "/" not in argument}
    regions = {path for path in named if path.is_file()}
    assert regions, "the stubs named no shared-memory region"
    return regions


def _workdirs(processes: list[psutil.Process]) -> set[Path]:
    """Private server directories of the stubs among ``processes``."""
    # .../converse-triton-XXXX/backends/python/triton_python_backend_stub
    return {Path(p.exe()).parents[2] for p in processes if p.name() == STUB}


def _kill_all(served: Served) -> None:
    """Kill what a failed test left: the script's tree and any process of its ``workdirs``."""
    if served.process.poll() is None:
        for leftover in served.tree():
            with contextlib.suppress(psutil.Error):
                leftover.kill()
        served.process.wait()
    for leftover in _leftovers(served.workdirs):
        with contextlib.suppress(psutil.Error):
            leftover.kill()


@pytest.fixture
def served(tiny_repository: TinyRepository) -> Iterator[Served]:
    """``scripts/serve.py`` on the tiny repository, ready; killed (group) if a test left it."""
    port = free_port()
    command = [str(ROOT / ".venv" / "bin" / "python"), "scripts/serve.py",
               "--repository", str(tiny_repository.repository), "--port", str(port)]
    if not Path(command[0]).exists():
        command[0] = sys.executable
    # PYTHONPATH: this checkout's packages, whichever checkout the venv was installed from.
    # The tiny repository serves no Kokoro: its CSM is the default model (else never ready).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CONVERSE_DEFAULT_MODEL": TINY_CSM}
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env,
                               start_new_session=True, preexec_fn=STOP_WITH_PYTEST)
    served = Served(process, f"http://127.0.0.1:{port}", "")
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("API key:"):
                break
        match = re.search(r"sk-local-\w+", "".join(lines))
        assert match, "".join(lines)
        served.key = match.group(0)
        yield served
    finally:
        _kill_all(served)


def _stop_and_count(served: Served, signum: signal.Signals) -> None:
    """Send ``signum``; the script exits 0; no process or region of its tree or Triton's is left."""
    tree = served.tree()
    workdirs = _workdirs(tree)
    served.workdirs.update(workdirs)
    regions = _regions(tree)
    served.process.send_signal(signum)
    assert served.process.wait(timeout=EXIT_WAIT_S) == 0
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert alive == []
    assert _leftovers(workdirs) == []
    assert {region for region in regions if region.exists()} == set()


def _speak(served: Served) -> httpx.Response:
    body = {"model": TINY_CSM, "conversation": [{"speaker": "0", "text": "Back again."}],
            "params": {"max_new_tokens": 16, "seed": 1}}
    headers = {"Authorization": f"Bearer {served.key}"}
    return httpx.post(f"{served.url}/v1/converse", json=body, headers=headers, timeout=120)


def test_killed_tritonserver_is_replaced_its_stubs_and_shared_memory_gone_and_sigterm_stops_all(
    served: Served,
) -> None:
    _wait(lambda: served.ready() == 200, "the stack is ready")
    old_server = served.tritonserver()
    old_tree = [p for p in served.tree() if p.pid != served.process.pid]
    served.workdirs.update(_workdirs(old_tree))
    old_regions = _regions(old_tree)

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
    assert {region for region in old_regions if region.exists()} == set()
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


@pytest.fixture
def foreground(tiny_repository: TinyRepository) -> Iterator[Served]:
    """``python -m devtools.local_triton`` on the tiny repository, ready; its server runs
    in a session of its own."""
    command = [str(ROOT / ".venv" / "bin" / "python"), "-m", "devtools.local_triton",
               "--repository", str(tiny_repository.repository)]
    if not Path(command[0]).exists():
        command[0] = sys.executable
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env,
                               start_new_session=True, preexec_fn=STOP_WITH_PYTEST)
    served = Served(process, "", "")
    try:
        assert process.stdout is not None
        started = next((line for line in process.stdout
                        if line.startswith("tritonserver ready")), None)
        assert started, "the server exited before it was ready"
        yield served
    finally:
        _kill_all(served)


def test_sigterm_stops_a_foreground_local_triton_and_its_stubs(foreground: Served) -> None:
    _stop_and_count(foreground, signal.SIGTERM)


def test_a_parent_killed_outright_takes_its_tritonserver_stubs_and_shared_memory_along(
    foreground: Served,
) -> None:
    """SIGKILL leaves the parent no cleanup: the server's parent-death signal must do it."""
    tree = foreground.tree()
    foreground.workdirs.update(_workdirs(tree))
    regions = _regions(tree)
    foreground.process.kill()
    foreground.process.wait()
    _, alive = psutil.wait_procs(tree, timeout=EXIT_WAIT_S)
    assert alive == [], "processes of the killed parent's server are still running"
    assert _leftovers(foreground.workdirs) == []
    assert {region for region in regions if region.exists()} == set()
