"""Overload: 100 /v1/converse requests, 50 at a time, against the live local stack.

Measures, in one run: the sequential throughput (requests answered 200 per
second, one at a time), then the burst: how many were answered 200, 503 or 429
(each refusal must carry Retry-After), how many 504, the p50/p95 latency of the
accepted ones against the deadline, the throughput of accepted requests at
saturation (200s per second of the burst's wall time), and the Triton work
done after the last answer went out: model executions (Triton's statistics,
``/v2/models/stats``, summed over every model, BLS-inner calls included) from
the moment the burst's last response arrived until Triton stayed idle, and how
long that tail lasted.

    python benchmarks/overload.py [--requests 100] [--concurrency 50] [--sequential 10]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import statistics
import time

import httpx

from benchmarks.isolated import isolate
from devtools import REPOSITORY
from devtools.local_stack import LocalStack

BODY = {"conversation": [{"speaker": "0", "text": "Hello there, how are you today?"}]}


async def one(client: httpx.AsyncClient, key: str) -> tuple[int, float, bool]:
    started = time.monotonic()
    response = await client.post("/v1/converse", json=BODY,
                                 headers={"Authorization": f"Bearer {key}"})
    return response.status_code, time.monotonic() - started, "retry-after" in response.headers


async def executions(triton_url: str) -> dict[str, int]:
    """Executions so far of every model Triton has statistics for, by name."""
    async with httpx.AsyncClient(timeout=30) as client:
        stats = (await client.get(f"http://{triton_url}/v2/models/stats")).json()
    return {m["name"]: int(m["execution_count"]) for m in stats["model_stats"]}


async def work_after(triton_url: str, answered: dict[str, int], quiet_s: float = 2.0,
                     limit_s: float = 120.0) -> tuple[dict[str, int], float]:
    """Executions per model since ``answered``, once none ran for ``quiet_s``; the tail, s."""
    started = last_change = time.monotonic()
    last = answered
    while time.monotonic() - last_change < quiet_s and time.monotonic() - started < limit_s:
        await asyncio.sleep(0.25)
        now = await executions(triton_url)
        if now != last:
            last, last_change = now, time.monotonic()
    after = {name: count - answered.get(name, 0) for name, count in last.items()}
    return {name: n for name, n in after.items() if n}, max(0.0, last_change - started)


async def run(base_url: str, triton_url: str, key: str, total: int, concurrency: int,
              sequential: int) -> dict:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        await one(client, key)  # warm-up
        started = time.monotonic()
        baseline = [await one(client, key) for _ in range(sequential)]
        sequential_rps = sum(s == 200 for s, _, _ in baseline) / (time.monotonic() - started)
        gate = asyncio.Semaphore(concurrency)

        async def limited() -> tuple[int, float, bool]:
            async with gate:
                return await one(client, key)

        started = time.monotonic()
        results = await asyncio.gather(*(limited() for _ in range(total)))
        wall = time.monotonic() - started
        after, tail_s = await work_after(triton_url, await executions(triton_url))
    accepted = sorted(latency for status, latency, _ in results if status == 200)
    return {
        "sequential_rps": sequential_rps,
        "statuses": collections.Counter(status for status, _, _ in results),
        "refusals_without_retry_after": sum(
            status in (429, 503) and not retry for status, _, retry in results),
        "p50": statistics.median(accepted) if accepted else None,
        "p95": accepted[max(0, round(0.95 * len(accepted)) - 1)] if accepted else None,
        "burst_wall_s": wall,
        "saturated_rps": len(accepted) / wall,
        "work_after": after,
        "work_after_tail_s": tail_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--sequential", type=int, default=10)
    args = parser.parse_args()
    isolate("converse-overload-")
    with LocalStack(REPOSITORY) as stack:
        result = asyncio.run(run(stack.base_url, stack.triton.http_url, stack.api_key,
                                 args.requests, args.concurrency, args.sequential))
    deadline = float(os.environ.get("CONVERSE_TRITON_TIMEOUT_S", "20"))
    print(f"sequential throughput: {result['sequential_rps']:.3f} req/s")
    print(f"statuses: {dict(sorted(result['statuses'].items()))}")
    print(f"refusals without Retry-After: {result['refusals_without_retry_after']}")
    if result["p50"] is not None:
        print(f"accepted latency p50 {result['p50']:.2f} s, p95 {result['p95']:.2f} s "
              f"(deadline {deadline:g} s)")
    print(f"burst wall time {result['burst_wall_s']:.1f} s; accepted throughput "
          f"{result['saturated_rps']:.3f} req/s = "
          f"{result['saturated_rps'] / result['sequential_rps']:.2f} x sequential")
    after = result["work_after"]
    print(f"Triton work after the last answer: {sum(after.values())} model executions "
          f"{dict(sorted(after.items()))} over {result['work_after_tail_s']:.1f} s")


if __name__ == "__main__":
    main()
