"""A semaphore whose waiters are served round-robin by owner, not first come, first served.

The API process keeps at most ``triton_max_inflight`` Triton calls in flight.
With a first-come queue one request that starts many calls at once (a 64-turn
dialogue voices its turns concurrently) puts all of them ahead of the calls of
every request admitted beside it, which then wait for the whole dialogue. Here
a freed slot goes to the next *owner* in turn (each request is one owner), so
a lone request still gets every slot, and requests side by side share them.

Written here because asyncio's ``Semaphore`` has one FIFO queue and neither
anyio nor the standard library offers a per-owner fair one.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager


class FairSlots:
    """``size`` slots; waiters take freed slots round-robin by owner, FIFO within one.

    Args:
        size: slots, >= 1.

    One instance belongs to one event loop (its waiters are that loop's futures).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = size
        self._waiting: OrderedDict[Hashable, deque[asyncio.Future[None]]] = OrderedDict()

    @property
    def held(self) -> int:
        """Slots held now."""
        return self.size - self._free

    @asynccontextmanager
    async def slot(self, owner: Hashable) -> AsyncIterator[None]:
        """Hold a slot for the body of the ``async with`` block.

        A cancelled waiter leaves its place (a slot it was handed meanwhile goes
        to the next owner in turn).
        """
        await self._acquire(owner)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, owner: Hashable) -> None:
        if self._free and not self._waiting:
            self._free -= 1
            return
        handed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(owner, deque()).append(handed)
        try:
            await handed
        except asyncio.CancelledError:
            if handed.done() and not handed.cancelled():
                self._release()  # handed a slot in the same pass as the cancel: pass it on
            else:
                queue = self._waiting.get(owner)
                if queue is not None and handed in queue:
                    queue.remove(handed)
                    if not queue:
                        del self._waiting[owner]
            raise

    def _release(self) -> None:
        """Hand the freed slot to the oldest waiter of the next owner in turn, or free it."""
        while self._waiting:
            owner, queue = next(iter(self._waiting.items()))
            handed = queue.popleft()
            if queue:
                self._waiting.move_to_end(owner)  # its next waiter waits for the others' turn
            else:
                del self._waiting[owner]
            if not handed.done():
                handed.set_result(None)
                return
        self._free += 1
