"""The one deadline of a request: set on arrival, covering every stage of its work.

A request's deadline is ``triton_timeout_s`` seconds after it arrived, on the
event loop's monotonic clock. Its work (catalog lookup, transcription,
authoring, synthesis, alignment) runs as one task under that deadline; when the
deadline passes or the client goes away the task is cancelled, and with it the
Triton calls it was awaiting; each of those calls also tells Triton the time
left (``handler.triton.bind_deadline``), so the work inside Triton stops too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from handler.errors import ClientClosedRequest, DeadlineExceeded
from handler.triton import bind_deadline, unbind_deadline

T = TypeVar("T")


async def within_deadline(
    work: Awaitable[T],
    deadline: float,
    client_gone: Callable[[], Awaitable[None]] | None = None,
) -> T:
    """Run ``work`` until it ends, ``deadline`` passes, or ``client_gone`` returns.

    Args:
        work: the request's work, not yet started (a coroutine or another awaitable).
        deadline: ``time.monotonic()`` seconds (the event loop's clock).
        client_gone: awaitable factory that returns once the client has disconnected.

    Returns:
        What ``work`` returned, also when it succeeded just as the deadline passed.

    Raises:
        DeadlineExceeded: the deadline passed first (504); ``work`` was cancelled,
            or failed in the loop pass the deadline fired in.
        ClientClosedRequest: the client went away first (499, for the log);
            ``work`` was cancelled.
    """
    token = bind_deadline(deadline)
    try:
        task = asyncio.ensure_future(work)  # the task copies the context, deadline included
    finally:
        unbind_deadline(token)
    watcher = asyncio.ensure_future(client_gone()) if client_gone is not None else None
    try:
        async with asyncio.timeout_at(deadline):
            waited = {task} if watcher is None else {task, watcher}
            await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
    except TimeoutError as error:
        # Work that succeeded in the loop pass the deadline fired in is not thrown
        # away: its result (a streamed reply's open generator, too) goes to the caller.
        # Work that failed then (Triton stopping at the same deadline) is a 504.
        if not task.done() or task.cancelled() or task.exception() is not None:
            raise DeadlineExceeded("the request did not finish before its deadline") from error
    finally:
        for pending in (task, watcher):
            if pending is not None and not pending.done():
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
    if not task.done() or task.cancelled():
        raise ClientClosedRequest("the client closed the connection")
    return task.result()
