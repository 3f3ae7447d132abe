"""Stop a foreground process cleanly on the signals that end it from outside.

tritonserver runs in its own session (``LocalTriton`` starts it with
``start_new_session=True`` so it can kill its whole tree), so it never gets the
terminal's signals itself: only the parent's cleanup stops it.
"""

from __future__ import annotations

import signal
from types import FrameType

# Ctrl-C; docker, systemd, CI and ``kill``; a closed terminal or SSH session.
STOPPING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """Turn the first stopping signal into KeyboardInterrupt; ignore repeats while stopping."""
    for stopping in STOPPING_SIGNALS:
        signal.signal(stopping, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def stop_on_signals() -> None:
    """Make SIGTERM and SIGHUP stop the process as Ctrl-C does.

    Python's default SIGTERM and SIGHUP end the process at once, skipping every
    ``with`` block: a ``LocalTriton`` or ``LocalStack`` entered then would leave
    its tritonserver and python stubs running. Raised as ``KeyboardInterrupt``,
    the signal unwinds the stack, which stops the whole process tree on the way
    out. Call it from the main thread.
    """
    for stopping in STOPPING_SIGNALS:
        signal.signal(stopping, _interrupt)
