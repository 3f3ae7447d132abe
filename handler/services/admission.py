"""Admission control: how many inference requests run at once, how many wait, who is refused.

One :class:`Admission` per API process. A request that finds a free slot
starts at once. Otherwise it may wait in a FIFO queue, but only when it can
still start and finish before its deadline: the expected latency of a request
that joins ``a`` running and ``q`` waiting ones is ``c * (a + q + 1)``, where
``c`` is a moving average of the service time one request costs (its run time
divided by the requests running beside it: Triton serves the work of all slots
with the same hardware, so more slots do not mean proportionally more
throughput). A request that
cannot make it is refused at once with 503 and ``Retry-After``; a key that
already holds its share of the running + waiting slots while others wait is
refused with 429. A waiter whose deadline comes before a slot frees leaves
with 503 too, so a busy service answers "retry later" rather than timing out.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from handler.errors import DeadlineExceeded, KeyOverShare, Overloaded

# Expected latencies are multiplied by this before they are compared with the
# time left, so that requests slower than the average still finish in time.
SAFETY = 1.25
# Weight of the newest completed request in the moving average of run time.
EWMA_WEIGHT = 0.2


@dataclass
class _Waiter:
    key_id: str
    started: asyncio.Future[None]


class Admission:
    """Slots for inference requests, a bounded queue, and a per-key share of both.

    Args:
        max_active: requests running at once (slots), >= 1.
        max_queued: requests that may wait for a slot, >= 0.
        key_share: fraction (0, 1] of ``max_active + max_queued`` one key may
            hold once requests have to wait.
        retry_after_s: ``Retry-After`` seconds when no estimate exists yet.
        clock: monotonic seconds (the clock of request deadlines).
    """

    def __init__(
        self,
        max_active: int,
        max_queued: int,
        key_share: float,
        retry_after_s: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_active = max_active
        self.max_queued = max_queued
        self.key_limit = max(1, math.floor(key_share * (max_active + max_queued)))
        self.retry_after_s = retry_after_s
        self._clock = clock
        self._active = 0
        self._waiting: deque[_Waiter] = deque()
        self._held: Counter[str] = Counter()
        self._run_s: float | None = None

    @property
    def active(self) -> int:
        """Requests running now."""
        return self._active

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot now."""
        return len(self._waiting)

    @property
    def run_s(self) -> float | None:
        """Moving average of one request's service cost, seconds (None before the first)."""
        return self._run_s

    def _expected_s(self, ahead: int) -> float | None:
        """Expected seconds from now to the end of a request with ``ahead`` others before it."""
        if self._run_s is None:
            return None
        return SAFETY * self._run_s * (ahead + 1)

    def _retry_after(self) -> dict[str, str]:
        if self._run_s is None:
            seconds = self.retry_after_s
        else:
            seconds = math.ceil((self._active + len(self._waiting)) * self._run_s)
        return {"Retry-After": str(max(1, seconds))}

    def _refuse_or_queue(self, key_id: str, deadline: float) -> _Waiter:
        if len(self._waiting) >= self.max_queued:
            raise Overloaded(
                "the service is at capacity; retry later", headers=self._retry_after()
            )
        if self._held[key_id] >= self.key_limit:
            raise KeyOverShare(
                f"this key already has {self._held[key_id]} requests running or waiting, its "
                "share of the service while it is busy; retry later",
                headers=self._retry_after(),
            )
        expected = self._expected_s(self._active + len(self._waiting))
        if expected is not None and self._clock() + expected > deadline:
            raise Overloaded(
                "the service cannot finish this request before its deadline; retry later",
                headers=self._retry_after(),
            )
        waiter = _Waiter(key_id, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        self._held[key_id] += 1
        return waiter

    def _hand_over(self) -> None:
        """Give a freed slot to the first live waiter, or free it."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.started.done():
                waiter.started.set_result(None)
                return
        self._active -= 1

    def _leave(self, waiter: _Waiter) -> None:
        """Take a waiter out: pass on the slot it was handed, or drop it from the queue."""
        if waiter.started.done() and not waiter.started.cancelled():
            self._hand_over()
        else:
            waiter.started.cancel()
            self._waiting.remove(waiter)
        self._held[waiter.key_id] -= 1

    async def _wait(self, waiter: _Waiter, deadline: float) -> None:
        """Wait for a slot until it is too late to start; the slot is held on return.

        Raises:
            Overloaded: no slot freed in time (503).
        """
        try:
            latest_start = deadline - SAFETY * (self._run_s or 0.0) * self._active
            async with asyncio.timeout_at(latest_start):
                await asyncio.shield(waiter.started)
        except TimeoutError:
            self._leave(waiter)
            raise Overloaded(
                "the service could not start this request before its deadline; retry later",
                headers=self._retry_after(),
            ) from None
        except asyncio.CancelledError:
            self._leave(waiter)
            raise
        expected = self._expected_s(self._active - 1)
        if expected is not None and self._clock() + expected > deadline:
            self._leave(waiter)
            raise Overloaded(
                "the service could not start this request in time to finish it; retry later",
                headers=self._retry_after(),
            )

    @asynccontextmanager
    async def slot(self, key_id: str, deadline: float) -> AsyncIterator[None]:
        """Hold a slot for the body of the ``async with`` block.

        The time the body takes feeds the run-time estimate when it succeeds or
        runs out of time (not when it fails early, e.g. on validation).

        Args:
            key_id: the caller's key id (for its share).
            deadline: the request's deadline on ``clock``, seconds.

        Raises:
            KeyOverShare: the key holds its share while requests wait (429, ``Retry-After``).
            Overloaded: the request cannot start and finish in time (503, ``Retry-After``).
        """
        if self._active < self.max_active and not self._waiting:
            self._active += 1
            self._held[key_id] += 1
        else:
            await self._wait(self._refuse_or_queue(key_id, deadline), deadline)
        started = self._clock()
        beside = self._active
        completed = False
        try:
            yield
            completed = True
        except DeadlineExceeded:
            completed = True
            raise
        finally:
            self._held[key_id] -= 1
            if completed:
                took = (self._clock() - started) / max(1, beside, self._active)
                self._run_s = (
                    took
                    if self._run_s is None
                    else (1 - EWMA_WEIGHT) * self._run_s + EWMA_WEIGHT * took
                )
            self._hand_over()
