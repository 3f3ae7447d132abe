"""Settings for a benchmark's local stack: its own storage, no rate limit, no request log."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from devtools.signals import stop_on_signals


def isolate(prefix: str, deadline_s: float | None = None) -> Path:
    """Point ``CONVERSE_*`` storage at a fresh temp dir, lift the rate and session limits; returns the dir.

    ``LocalStack`` reads its settings from the environment, so call this before entering it.
    SIGTERM then stops the benchmark as Ctrl-C does, so its Triton tree goes with it.

    Args:
        prefix: the temp dir's name prefix.
        deadline_s: when given, the request deadline (``CONVERSE_TRITON_TIMEOUT_S``),
            with the Lambda and gateway timeouts 5 and 10 s above it as the settings
            require: speed benchmarks measure a slow round on a busy machine
            instead of getting a 504.
    """
    stop_on_signals()
    state = Path(tempfile.mkdtemp(prefix=prefix))
    # The live-session limits are lifted too: benchmarks/sessions.py measures what ten
    # sessions at once get, past the default limit that would refuse six of them, and
    # their replies queue for the chat LM longer than a live model call may take.
    os.environ.update(CONVERSE_RATE_LIMIT_CAPACITY="100000000",
                      CONVERSE_SESSION_MAX_LIVE="1000",
                      CONVERSE_SESSION_MODEL_TIMEOUT_S="600",
                      CONVERSE_SQLITE_PATH=str(state / "converse.db"),
                      CONVERSE_BLOB_DIR=str(state / "blobs"),
                      CONVERSE_LOG_REQUESTS="false")
    if deadline_s is not None:
        os.environ.update(CONVERSE_TRITON_TIMEOUT_S=str(deadline_s),
                          CONVERSE_LAMBDA_TIMEOUT_S=str(deadline_s + 5),
                          CONVERSE_GATEWAY_TIMEOUT_S=str(deadline_s + 10))
    return state
