"""``make serve``: Triton and the API in the foreground on loopback until Ctrl-C."""

from __future__ import annotations

import argparse
import contextlib
import signal
from pathlib import Path

from devtools import REPOSITORY
from devtools.local_stack import LocalStack


def main() -> None:
    """Start the stack, print the URL, a working key and a curl to try, wait for Ctrl-C."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--repository", type=Path, default=REPOSITORY)
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    with LocalStack(args.repository, args.port) as stack:
        print(f"converse API: {stack.base_url}  (Triton at http://{stack.triton.http_url})")
        print(f"API key:      {stack.api_key}")
        print(f"try:  export CONVERSE_URL={stack.base_url} CONVERSE_KEY={stack.api_key}")
        print('      curl -s "$CONVERSE_URL/v1/models" -H "Authorization: Bearer $CONVERSE_KEY"')
        print("Ctrl-C stops both.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
