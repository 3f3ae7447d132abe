"""Admission control and the one deadline: refusals at once, cancellation, every stage timed."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from handler.app import create_app
from handler.engines.catalog import ModelCatalog
from handler.errors import ClientClosedRequest, KeyOverShare, Overloaded
from handler.services.admission import Admission
from handler.services.deadline import within_deadline
from tests.helpers import API_KEY, AUTH, asgi_post, make_settings
from tests.robust_fakes import FakeTriton, constant_voice, fake_client, never

CONVERSE = {"conversation": [{"speaker": "0", "text": "Hello there."}]}
DIALOGUE = {"turns": [{"voice": "jf_alpha", "text": "Hello there."}]}
OTHER_KEY = "second-key-456"


def gated(fake: FakeTriton) -> threading.Event:
    """Make Kokoro wait until the returned event is set."""
    gate = threading.Event()

    async def voice(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        while not gate.is_set():
            await asyncio.sleep(0.01)
        return await constant_voice(inputs)

    fake.behaviours["kokoro"] = voice
    return gate


def wait_for_calls(fake: FakeTriton, count: int) -> None:
    for _ in range(1000):
        if len(fake.calls) >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"only {len(fake.calls)} Triton calls started")


def post(client: TestClient, path: str, body: Any, key: str = API_KEY) -> Any:
    return client.post(path, json=body, headers={"Authorization": f"Bearer {key}"})


def test_busy_service_answers_503_at_once_in_each_envelope() -> None:
    fake = FakeTriton()
    gate = gated(fake)
    with fake_client(fake, admission_max_active=1, admission_max_queued=0) as client, \
            ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, client, "/v1/converse", CONVERSE)
        wait_for_calls(fake, 1)
        kalpa = post(client, "/v1/converse", CONVERSE)
        problem = post(client, "/v1/audio/conversation", DIALOGUE)
        gate.set()
        assert running.result().status_code == 200
    assert kalpa.status_code == 503 and int(kalpa.headers["retry-after"]) >= 1
    assert kalpa.json()["error"]["type"] == "service_unavailable"
    assert problem.status_code == 503 and int(problem.headers["retry-after"]) >= 1
    assert problem.headers["content-type"] == "application/problem+json"
    assert problem.json()["code"] == "overloaded"
    assert fake.calls == ["kokoro"]  # the refused requests never reached Triton


def test_key_over_its_share_is_429_while_other_keys_wait() -> None:
    fake = FakeTriton()
    gate = gated(fake)
    settings = {"api_keys": f"{API_KEY},{OTHER_KEY}", "admission_max_active": 1,
                "admission_max_queued": 2, "admission_key_share": 0.34}
    with fake_client(fake, **settings) as client, ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, client, "/v1/converse", CONVERSE)
        wait_for_calls(fake, 1)
        over_share = post(client, "/v1/audio/conversation", DIALOGUE)
        queued = pool.submit(post, client, "/v1/converse", CONVERSE, OTHER_KEY)
        for _ in range(1000):
            if client.app.state.admission.waiting == 1:  # type: ignore[attr-defined]
                break
            time.sleep(0.01)
        gate.set()
        assert running.result().status_code == 200
        assert queued.result().status_code == 200
    assert over_share.status_code == 429 and int(over_share.headers["retry-after"]) >= 1
    assert over_share.json()["code"] == "concurrency_limited"


def test_waiter_that_cannot_start_before_its_deadline_gets_503_not_504() -> None:
    fake = FakeTriton()
    gate = gated(fake)
    settings = {"admission_max_active": 1, "admission_max_queued": 1,
                "admission_key_share": 1.0, "triton_timeout_s": 1.0}
    with fake_client(fake, **settings) as client, ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, client, "/v1/converse", CONVERSE)
        wait_for_calls(fake, 1)
        waited = post(client, "/v1/converse", CONVERSE)
        gate.set()
        assert running.result().status_code == 504
    assert waited.status_code == 503 and "retry-after" in waited.headers
    assert waited.json()["error"]["type"] == "service_unavailable"


def test_deadline_cancels_the_triton_calls_and_frees_the_slot() -> None:
    fake = FakeTriton()
    fake.behaviours["kokoro"] = never
    with fake_client(fake, triton_timeout_s=0.5, admission_max_active=1,
                     admission_max_queued=0) as client:
        response = post(client, "/v1/converse", CONVERSE)
        admission = client.app.state.admission  # type: ignore[attr-defined]
        assert (admission.active, admission.waiting) == (0, 0)
    assert response.status_code == 504
    assert fake.cancelled == ["kokoro"]


@pytest.mark.parametrize("path,body", [("/v1/converse", CONVERSE),
                                       ("/v1/audio/conversation", DIALOGUE),
                                       ("/v1/models", None)])
def test_catalog_lookup_runs_inside_the_deadline(path: str, body: Any) -> None:
    fake = FakeTriton()
    fake.catalog_behaviour = asyncio.Event().wait  # Triton never lists its models
    with fake_client(fake, triton_timeout_s=0.5) as client:
        response = client.get(path, headers=AUTH) if body is None else post(client, path, body)
    assert response.status_code == 504


def test_with_timestamps_spends_one_deadline_across_synthesis_and_alignment() -> None:
    fake = FakeTriton(extra_models=("aligner", "whisper_asr"))

    def slow(behaviour: Any) -> Any:
        async def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            await asyncio.sleep(2.0)
            return await behaviour(inputs)
        return run

    fake.behaviours = {name: slow(b) for name, b in fake.behaviours.items()}
    with fake_client(fake, triton_timeout_s=3.0) as client:
        response = post(client, "/v1/audio/conversation/with-timestamps", DIALOGUE)
    # Each stage alone fits in 3 s (1 s to spare for the rest of the request); both
    # together do not.
    assert response.status_code == 504
    assert response.json()["code"] == "timeout"
    assert "aligner" in fake.cancelled


def test_client_going_away_cancels_the_work() -> None:
    cancelled = []

    async def scenario() -> None:
        started = asyncio.Event()

        async def work() -> None:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        async def client_gone() -> None:
            await started.wait()

        admission = Admission(1, 0, 1.0, 5)
        deadline = time.monotonic() + 60
        with pytest.raises(ClientClosedRequest):
            async with admission.slot("key", deadline):
                await within_deadline(work(), deadline, client_gone)
        assert admission.active == 0

    asyncio.run(scenario())
    assert cancelled == [True]


def test_admission_refuses_a_queue_it_cannot_serve_in_time() -> None:
    async def scenario() -> None:
        now = [0.0]
        admission = Admission(1, 10, 1.0, 5, clock=lambda: now[0])
        async with admission.slot("a", 100.0):
            now[0] = 4.0  # one request took 4 s
        gate = asyncio.Event()

        async def hold(key: str) -> None:
            async with admission.slot(key, 100.0):
                await gate.wait()

        holder = asyncio.create_task(hold("a"))
        await asyncio.sleep(0)
        # Expected: 1.25 * 4 s * (1 + 1/1) = 10 s from now, past a deadline 8 s away.
        with pytest.raises(Overloaded) as refused:
            async with admission.slot("b", now[0] + 8.0):
                pass
        assert refused.value.headers["Retry-After"] == "4"
        with pytest.raises(KeyOverShare):
            admission.key_limit = 1
            async with admission.slot("a", 1000.0):
                pass
        gate.set()
        await holder
        assert (admission.active, admission.waiting) == (0, 0)

    asyncio.run(scenario())


def test_a_client_that_leaves_while_queued_leaves_the_queue_at_once() -> None:
    """Its place and its key's share are free again while the request ahead still runs."""
    fake = FakeTriton()
    gate = gated(fake)
    settings = make_settings(api_keys=f"{API_KEY},{OTHER_KEY}", admission_max_active=1,
                             admission_max_queued=2, admission_key_share=0.34)
    app = create_app(settings)
    app.state.triton = fake
    app.state.catalog = ModelCatalog(settings, fake)  # type: ignore[arg-type]
    admission = app.state.admission
    payload = json.dumps(CONVERSE).encode()

    async def converse(key: str, gone: asyncio.Event) -> None:
        scope = asgi_post("/v1/converse", payload)
        scope["headers"][0] = (b"authorization", f"Bearer {key}".encode())
        requests = [{"type": "http.request", "body": payload, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if requests:
                return requests.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            pass

        await app(scope, receive, send)

    async def scenario() -> tuple[int, int]:
        running = asyncio.create_task(converse(API_KEY, asyncio.Event()))
        while not fake.calls:
            await asyncio.sleep(0.01)
        leaving = asyncio.Event()
        queued = asyncio.create_task(converse(OTHER_KEY, leaving))
        while admission.waiting < 1:
            await asyncio.sleep(0.01)
        leaving.set()
        for _ in range(200):  # the running request holds its slot throughout
            if admission.waiting == 0:
                break
            await asyncio.sleep(0.01)
        left = (admission.waiting, admission.active)
        gate.set()
        await asyncio.gather(running, queued)
        return left

    assert asyncio.run(scenario()) == (0, 1)
    assert admission.active == 0
