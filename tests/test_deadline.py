"""The request deadline: work that finishes in time is kept, work past it is cancelled."""

from __future__ import annotations

import asyncio

import pytest

from handler.errors import DeadlineExceeded
from handler.services.deadline import within_deadline


def test_work_that_finishes_as_the_deadline_fires_keeps_its_result() -> None:
    async def scenario() -> str:
        async def finished_at_once() -> str:
            return "reply"

        # A deadline already passed fires in the loop pass the work finishes in.
        return await within_deadline(finished_at_once(), asyncio.get_running_loop().time() - 1)

    assert asyncio.run(scenario()) == "reply"


def test_work_that_fails_as_the_deadline_fires_is_past_its_deadline() -> None:
    async def scenario() -> None:
        async def failed_at_once() -> str:
            raise RuntimeError("stopped at the deadline")

        with pytest.raises(DeadlineExceeded):
            await within_deadline(failed_at_once(), asyncio.get_running_loop().time() - 1)

    asyncio.run(scenario())


def test_work_past_the_deadline_is_cancelled_and_refused() -> None:
    cancelled = []

    async def scenario() -> None:
        async def slow() -> str:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise
            return "late"

        with pytest.raises(DeadlineExceeded):
            await within_deadline(slow(), asyncio.get_running_loop().time() + 0.05)

    asyncio.run(scenario())
    assert cancelled == [True]
