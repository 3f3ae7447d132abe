"""Triton's in-flight places are shared round-robin by request (``handler.fair_slots``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Hashable

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from handler.fair_slots import FairSlots
from handler.services.deadline import within_deadline
from handler.triton import TritonClient


async def _hold(slots: FairSlots, owner: Hashable, order: list[Hashable],
                release: asyncio.Event) -> None:
    async with slots.slot(owner):
        order.append(owner)
        await release.wait()


def test_a_lone_owner_gets_every_slot_at_once() -> None:
    async def run() -> list[Hashable]:
        slots, order, release = FairSlots(3), [], asyncio.Event()
        holders = [asyncio.create_task(_hold(slots, "a", order, release)) for _ in range(3)]
        await asyncio.sleep(0)
        taken = list(order)
        release.set()
        await asyncio.gather(*holders)
        return taken

    assert asyncio.run(run()) == ["a", "a", "a"]


def test_freed_slots_go_to_the_owners_in_turn() -> None:
    """Owner a queues five waiters, then b one and c one: b and c do not wait for all of a's."""

    async def run() -> list[Hashable]:
        slots, order = FairSlots(1), []
        holding: list[asyncio.Event] = []  # the release of each holder, in the order served

        async def hold(owner: str) -> None:
            async with slots.slot(owner):
                order.append(owner)
                holding.append(asyncio.Event())
                await holding[-1].wait()

        tasks = []
        for owner in ["a"] * 6 + ["b", "c"]:
            tasks.append(asyncio.create_task(hold(owner)))
            await asyncio.sleep(0)
        for served in range(len(tasks)):  # each holder leaves; the next is handed the slot
            async with asyncio.timeout(5):
                while len(holding) <= served:
                    await asyncio.sleep(0)
            holding[served].set()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(run()) == ["a", "a", "b", "c", "a", "a", "a", "a"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.booleans()), min_size=1, max_size=12),
       st.integers(min_value=1, max_value=3))
def test_cancelled_waiters_never_leak_or_overfill_a_slot(
    waiters: list[tuple[str, bool]], size: int
) -> None:
    """Some waiters are cancelled while they wait (or just as they are handed a slot)."""

    async def run() -> tuple[int, int]:
        slots, most = FairSlots(size), 0

        async def hold(owner: str) -> None:
            nonlocal most
            async with slots.slot(owner):
                most = max(most, slots.held)
                await asyncio.sleep(0.001)

        tasks = [asyncio.create_task(hold(owner)) for owner, _ in waiters]
        await asyncio.sleep(0)
        for task, (_, cancelled) in zip(tasks, waiters, strict=True):
            if cancelled:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return most, slots.held

    most, held = asyncio.run(run())
    assert most <= size
    assert held == 0


async def _slow_triton(order: list[str]) -> asyncio.Server:
    """Answers each infer call after 20 ms; ``order`` gets the model names in arrival order."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            lines = head.decode().split("\r\n")
            length = next(int(line.split(":")[1]) for line in lines
                          if line.lower().startswith("content-length"))
            await reader.readexactly(length)
            model = lines[0].split("/")[3]
            order.append(model)
            await asyncio.sleep(0.02)
            body = json.dumps({"model_name": model, "outputs": [
                {"name": "AUDIO", "datatype": "FP32", "shape": [1], "data": [0.0]}]}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


def test_a_request_beside_one_with_many_calls_does_not_wait_for_all_of_them() -> None:
    """Request "long" starts 12 calls at once; request "short" one call just after.

    With two places in flight, the short request's call is among the next
    calls Triton gets, not after the long request's twelve.
    """

    async def run() -> list[str]:
        order: list[str] = []
        server = await _slow_triton(order)
        client = TritonClient(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", max_inflight=2)
        inputs = {"SPEED": np.array([1.0], np.float32)}

        async def request(model: str, calls: int) -> None:
            await asyncio.gather(*(client.infer(model, inputs, ["AUDIO"]) for _ in range(calls)))

        deadline = asyncio.get_running_loop().time() + 30
        try:
            long = asyncio.create_task(within_deadline(request("long", 12), deadline))
            while not order:
                await asyncio.sleep(0.001)
            await within_deadline(request("short", 1), deadline)
            await long
        finally:
            await client.close()
            server.close()
        return order

    order = asyncio.run(run())
    assert order.count("long") == 12
    assert order.index("short") <= 4, order
