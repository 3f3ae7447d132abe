"""Clients that go away: Triton work done after they left, API over HTTP vs over gRPC.

For each ``CONVERSE_TRITON_PROTOCOL`` (``http``, then ``grpc``) a fresh live
local stack gets one warm-up request, then ``--clients`` authoring requests
(``/v1/converse`` with a speaker-only open turn: the ``author`` token loop, then
Kokoro) at once, each client giving up after ``--patience`` seconds (httpx
closes its connection). Reported: how many gave up, and the Triton model
executions (``/v2/models/stats``, every model and BLS-inner call summed) from
the moment the last client left until Triton stayed idle for 2 s, with that
tail's length. Over HTTP Triton never learns a client left, so that work runs
to its end; over gRPC the API cancels its calls and the BLS loops stop.

    python -m benchmarks.disconnect [--clients 4] [--patience 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Literal

import httpx

from benchmarks.isolated import isolate
from benchmarks.overload import executions, work_after
from devtools import REPOSITORY
from devtools.local_stack import LocalStack

BODY = {
    "conversation": [{"speaker": "0", "text": "So, how was the trip to the coast?"},
                     {"speaker": "1"}],
    "params": {"max_new_tokens": 128},
}


async def give_up(base_url: str, key: str, patience_s: float) -> bool:
    """One authoring request abandoned after ``patience_s`` s; True if it was abandoned."""
    async with httpx.AsyncClient(base_url=base_url, timeout=patience_s) as client:
        try:
            await client.post("/v1/converse", json=BODY,
                              headers={"Authorization": f"Bearer {key}"})
        except httpx.TimeoutException:
            return True
    return False


async def run(stack: LocalStack, clients: int, patience_s: float) -> dict:
    """Warm up, abandon ``clients`` requests at once, then count Triton's work after."""
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=120) as client:
        warm = await client.post("/v1/converse", json=BODY,
                                 headers={"Authorization": f"Bearer {stack.api_key}"})
        warm.raise_for_status()
    abandoned = await asyncio.gather(
        *(give_up(stack.base_url, stack.api_key, patience_s) for _ in range(clients)))
    after, tail_s = await work_after(stack.triton.http_url, await executions(stack.triton.http_url))
    return {"abandoned": sum(abandoned), "work_after": after, "tail_s": tail_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--patience", type=float, default=0.5, help="seconds")
    args = parser.parse_args()
    isolate("converse-disconnect-")
    protocols: tuple[Literal["http", "grpc"], ...] = ("http", "grpc")
    for protocol in protocols:
        with LocalStack(REPOSITORY, triton_protocol=protocol) as stack:
            result = asyncio.run(run(stack, args.clients, args.patience))
        after = result["work_after"]
        print(f"{protocol}: {result['abandoned']} of {args.clients} clients left after "
              f"{args.patience:g} s; Triton work after they left: {sum(after.values())} "
              f"model executions {dict(sorted(after.items()))} over {result['tail_s']:.1f} s")


if __name__ == "__main__":
    main()
