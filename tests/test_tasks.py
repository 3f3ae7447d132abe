"""``handler.tasks``: concurrent work that stops together, and stopping a task without
losing the stopper's own cancel."""

from __future__ import annotations

import asyncio

import pytest

from handler.errors import InferenceError
from handler.tasks import gather_or_cancel, stop


class Sibling:
    """Waits ``seconds`` then answers ``value``; notes whether it was cancelled."""

    def __init__(self, value: int, seconds: float) -> None:
        self.value, self.seconds = value, seconds
        self.cancelled = False

    async def run(self) -> int:
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return self.value


async def failing(after_s: float) -> int:
    await asyncio.sleep(after_s)
    raise InferenceError("the voice model failed")


def test_results_come_in_the_order_given() -> None:
    slow, fast = Sibling(1, 0.05), Sibling(2, 0.0)
    assert asyncio.run(gather_or_cancel(slow.run(), fast.run())) == [1, 2]


def test_the_first_failure_is_raised_as_itself_and_the_others_stop() -> None:
    long_ones = [Sibling(n, 3600.0) for n in range(3)]

    async def run() -> set[asyncio.Task[object]]:
        with pytest.raises(InferenceError, match="voice model"):
            await gather_or_cancel(*(s.run() for s in long_ones), failing(0.01))
        return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}

    assert asyncio.run(run()) == set()
    assert all(s.cancelled for s in long_ones)


async def fails_when_cancelled() -> int:
    """Waits; its cleanup fails when it is cancelled."""
    try:
        await asyncio.sleep(3600.0)
    except asyncio.CancelledError:
        raise InferenceError("cleanup failed") from None
    return 0


@pytest.mark.parametrize("child", ["fails when cancelled", "fails at the same moment"])
def test_the_callers_cancel_wins_over_a_coroutine_failing_then(child: str) -> None:
    """The caller sees CancelledError (a client that left is a 499), not the failure (a 502)."""
    async def failing_now(started: asyncio.Event) -> int:
        started.set()
        await asyncio.sleep(0)
        raise InferenceError("the voice model failed")

    async def run() -> None:
        started = asyncio.Event()
        other = Sibling(1, 3600.0)
        first = fails_when_cancelled() if child == "fails when cancelled" else failing_now(started)
        caller = asyncio.create_task(gather_or_cancel(first, other.run()))
        if child == "fails when cancelled":
            await asyncio.sleep(0.01)
        else:
            await started.wait()  # the failure is raised at the next step, with the cancel
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert caller.cancelled() and other.cancelled

    asyncio.run(run())


def test_cancelling_the_caller_cancels_every_coroutine() -> None:
    long_ones = [Sibling(n, 3600.0) for n in range(2)]

    async def run() -> None:
        caller = asyncio.create_task(gather_or_cancel(*(s.run() for s in long_ones)))
        await asyncio.sleep(0.01)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller

    asyncio.run(run())
    assert all(s.cancelled for s in long_ones)


def slow_to_stop(seconds: float) -> asyncio.Task[None]:
    """A task that, once cancelled, takes ``seconds`` to end (a Triton cancel in flight)."""

    async def body() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(seconds)

    return asyncio.create_task(body())


def test_stop_ends_the_task_and_keeps_a_cancel_of_its_caller() -> None:
    async def run() -> tuple[bool, bool]:
        inner = slow_to_stop(0.2)
        await asyncio.sleep(0)
        stopper = asyncio.create_task(stop(inner))
        await asyncio.sleep(0.05)
        stopper.cancel()  # while it waits for inner to end
        await asyncio.wait({stopper})
        return stopper.cancelled(), inner.done()

    stopper_cancelled, inner_done = asyncio.run(run())
    assert stopper_cancelled and inner_done


def test_a_caller_already_being_cancelled_can_still_stop_its_tasks() -> None:
    """Cleanup inside ``except CancelledError`` waits for the task, then re-raises itself."""
    finished: list[bool] = []

    async def owner() -> None:
        inner = slow_to_stop(0.05)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await stop(inner)  # must not raise: the cancel it sees was inner's
            finished.append(inner.done())
            raise

    async def run() -> None:
        task = asyncio.create_task(owner())
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.wait({task})

    asyncio.run(run())
    assert finished == [True]
