"""The one deadline every request's Triton work runs under."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from handler.errors import DeadlineExceeded

T = TypeVar("T")


async def within_deadline(work: Awaitable[T], seconds: float) -> T:
    """Await ``work``, cancelling it after ``seconds``.

    Raises:
        DeadlineExceeded: the deadline passed (504).
    """
    try:
        return await asyncio.wait_for(work, timeout=seconds)
    except TimeoutError as error:
        raise DeadlineExceeded(
            f"inference did not finish within {seconds:g} s",
        ) from error
