"""Running and stopping asyncio tasks so that none outlives the work that started it.

Two gaps in the standard library that this service kept falling into:
``asyncio.gather`` leaves the other awaitables running when one fails (their
Triton calls go on for a request that has already failed), and
``contextlib.suppress(asyncio.CancelledError)`` around the wait for a cancelled
task also swallows a cancel of the waiting task itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")


async def _in_group(coroutines: tuple[Coroutine[Any, Any, T], ...]) -> list[T]:
    """Run ``coroutines`` in one ``asyncio.TaskGroup``; their results in order."""
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(coroutine) for coroutine in coroutines]
    return [task.result() for task in tasks]


async def gather_or_cancel(*coroutines: Coroutine[Any, Any, T]) -> list[T]:
    """Run ``coroutines`` concurrently; their results in order.

    On the first failure the others are cancelled and waited for (an
    ``asyncio.TaskGroup``), then that failure is raised as itself, not inside
    an ``ExceptionGroup``, so an ``ApiError`` still becomes its HTTP answer.

    A cancel of the caller wins over failures of the coroutines: a coroutine
    that fails while it is being cancelled (its cleanup raised), or in the same
    moment, would otherwise turn the caller's cancel into that failure, and a
    client that left would be answered as if the model had failed. Those
    failures are logged. The group runs in a task of its own because a
    TaskGroup cancels its parent task to stop it, and on Python 3.11 that
    cancel still counts in the parent's ``cancelling()`` afterwards: counted
    on the caller, it could not be told from the caller's own cancel.

    Raises:
        Exception: the first exception a coroutine raised.
        asyncio.CancelledError: the caller was cancelled (the coroutines are too).
    """
    current = asyncio.current_task()
    cancellations = current.cancelling() if current is not None else 0
    try:
        return await asyncio.create_task(_in_group(coroutines))
    except ExceptionGroup as failures:
        if current is not None and current.cancelling() > cancellations:
            logger.warning("tasks failed while their caller was cancelled", exc_info=failures)
            raise asyncio.CancelledError from None
        raise failures.exceptions[0] from None


async def stop(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has ended; a failure it ends with is logged.

    The caller's own cancellation still propagates. ``contextlib.suppress(
    asyncio.CancelledError)`` around the wait would swallow it too (it cannot
    tell the two apart), and a cancelled caller would go on running: a live
    session's VAD task, cancelled while it waited for an early start to stop,
    went back to waiting for audio that never came, and the session's close
    with it.

    A caller already being cancelled (cleaning up in an ``except
    CancelledError``) can stop its tasks: only a cancellation requested during
    the wait counts.

    Raises:
        asyncio.CancelledError: the calling task was cancelled meanwhile.
    """
    current = asyncio.current_task()
    cancellations = current.cancelling() if current is not None else 0
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if current is not None and current.cancelling() > cancellations:
            raise
    except Exception:
        logger.warning("a task stopped with an error", exc_info=True)
