"""``make serve``: Triton and the API in the foreground on loopback until SIGINT or SIGTERM.

Triton is supervised: when tritonserver dies, what is left of its process tree
is killed and a new server starts on the same ports (``devtools.local_stack``).
SIGINT (Ctrl-C) and SIGTERM (docker, systemd, CI) both stop the API and the
whole Triton process tree before the script exits.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
from pathlib import Path

from devtools import REPOSITORY
from devtools.local_stack import LocalStack
from devtools.signals import stop_on_signals


def main() -> None:
    """Start the stack, print the URL, a working key and a curl to try, wait for a signal."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--repository", type=Path, default=REPOSITORY)
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    stop_on_signals()
    with contextlib.suppress(KeyboardInterrupt), LocalStack(
        args.repository, args.port, supervise=True
    ) as stack:
        print(f"converse API: {stack.base_url}  (Triton at http://{stack.triton.http_url})")
        print(f"API key:      {stack.api_key}")
        print(f"try:  export CONVERSE_URL={stack.base_url} CONVERSE_KEY={stack.api_key}")
        print('      curl -s "$CONVERSE_URL/v1/models" -H "Authorization: Bearer $CONVERSE_KEY"')
        print(f"talk to it: {stack.base_url}/playground  (paste the API key)")
        print("Ctrl-C stops both; a tritonserver that dies is restarted.", flush=True)
        while True:
            signal.pause()


if __name__ == "__main__":
    main()
