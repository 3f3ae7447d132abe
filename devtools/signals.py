"""Stop a foreground process cleanly on the signals that end it from outside.

tritonserver runs in its own session (``LocalTriton`` starts it with
``start_new_session=True`` so it can kill its whole tree), so it never gets the
terminal's signals itself: only the parent's cleanup stops it, or, when the
parent is killed outright, the signal ``parent_death_signal`` asks the kernel
to send.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable
from types import FrameType

# prctl option that sets the signal a process gets when its parent thread dies
# (<linux/prctl.h>; prctl(2)).
PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)

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


def parent_death_signal(signum: signal.Signals) -> Callable[[], None]:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``signum`` when its parent dies.

    Covers what no ``with`` block can: a parent killed with SIGKILL (the OOM
    killer, ``kill -9``, a CI runner cleaning up). Linux only (``prctl(2)``,
    ``PR_SET_PDEATHSIG``). The kernel sends the signal when the *thread* that
    started the child ends, so start long-lived children from a thread that
    lives as long as they should. A parent that died between ``fork`` and the
    ``prctl`` call is caught by comparing ``getppid`` with the parent's pid.

    Raises (in the child, so ``Popen`` raises ``SubprocessError``):
        OSError: ``prctl`` failed.
    """
    parent_pid = os.getpid()
    prctl = _LIBC.prctl  # looked up before the fork: the child only calls it

    def set_in_child() -> None:
        if prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent_pid:
            os._exit(1)

    return set_in_child
