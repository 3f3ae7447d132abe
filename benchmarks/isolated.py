"""Settings for a benchmark's local stack: its own storage, no rate limit, no request log."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def isolate(prefix: str) -> Path:
    """Point ``CONVERSE_*`` storage at a fresh temp dir and lift the rate limit; returns the dir.

    ``LocalStack`` reads its settings from the environment, so call this before entering it.
    """
    state = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ.update(CONVERSE_RATE_LIMIT_CAPACITY="100000000",
                      CONVERSE_SQLITE_PATH=str(state / "converse.db"),
                      CONVERSE_BLOB_DIR=str(state / "blobs"),
                      CONVERSE_LOG_REQUESTS="false")
    return state
