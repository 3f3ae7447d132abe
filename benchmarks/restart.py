"""Supervision: how long ``make serve`` takes to serve again after tritonserver is killed.

Starts ``scripts/serve.py`` as ``make serve`` does, on the local repository,
then ``--kills`` times: SIGKILL the tritonserver child, time until ``/ready``
answers 200 again, count the killed server's processes still running (its
python-backend stubs included). Finally SIGTERM the script and count every
process of its tree left running.

    python -m benchmarks.restart [--kills 3] [--repository DIR]

A repository without Kokoro (the tests' tiny one) is ready only with its own
default model: ``CONVERSE_DEFAULT_MODEL=<its CSM name>`` in the environment.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from devtools import REPOSITORY
from devtools.local_triton import free_port
from devtools.signals import parent_death_signal

ROOT = Path(__file__).resolve().parents[1]


def wait_ready(url: str, limit_s: float = 600.0) -> float:
    """Seconds until ``GET url/ready`` answers 200."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {limit_s} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--repository", type=Path, default=REPOSITORY)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "scripts/serve.py", "--repository", str(args.repository),
               "--port", str(port)]
    # A benchmark killed outright still stops the stack: serve.py stops it on SIGTERM.
    serve = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                             env={**os.environ, "PYTHONPATH": str(ROOT)},
                             preexec_fn=parent_death_signal(signal.SIGTERM))
    root = psutil.Process(serve.pid)
    try:
        print(f"first start: ready after {wait_ready(url):.1f} s")
        times = []
        for _ in range(args.kills):
            tree = root.children(recursive=True)
            (server,) = [p for p in tree if p.name() == "tritonserver"]
            server.kill()
            times.append(wait_ready(url))
            left = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            print(f"killed tritonserver with {len(tree) - 1} stubs: ready again after "
                  f"{times[-1]:.1f} s; processes of the killed tree still running: {len(left)}")
        print(f"ready again after a kill: median {statistics.median(times):.1f} s, "
              f"max {max(times):.1f} s")
        tree = [root, *root.children(recursive=True)]
        serve.send_signal(signal.SIGTERM)
        status = serve.wait(timeout=120)
        _, alive = psutil.wait_procs(tree, timeout=10)
        print(f"SIGTERM: exit status {status}, {len(alive)} of {len(tree)} processes left")
    finally:
        if serve.poll() is None:
            serve.kill()


if __name__ == "__main__":
    main()
