"""Work inside Triton stops when a request's deadline passes or its gRPC client cancels.

Evidence is Triton's own statistics: ``author_lm``'s execution count is the
number of prefill/decode steps the ``author`` BLS loop ran (for CSM,
``<name>_backbone``'s count is the generator's frames). The tiny author
(greedy, this prompt) generates all ``LONG`` tokens when nothing stops it, so
a loop that stopped early ran fewer than ``FULL_RUN`` steps, and a stopped
loop's count no longer grows.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_grpc
import tritonclient.http.aio as triton_http
from tritonclient.utils import InferenceServerException

from devtools.local_triton import LocalTriton
from handler.app import create_app
from handler.errors import InferenceError
from handler.triton import TritonClient, bind_deadline, infer_inputs, unbind_deadline
from tests.helpers import TINY_CSM, TinyTriton, make_settings, post_then_disconnect

pytestmark = pytest.mark.triton

LONG = 480  # tokens; the tiny author's max_context is 512
FULL_RUN = LONG  # steps: the prefill gives the first token, one decode per token after it
INPUTS = {
    "PROMPT": np.array([b"Hello there"], dtype=np.object_),
    "TEMPERATURE": np.array([0.0], np.float32),
    "TOP_K": np.array([0], np.int32),
    "MAX_NEW_TOKENS": np.array([LONG], np.int32),
    "SEED": np.array([1], np.int64),
}


def stats_url(server: LocalTriton, model: str) -> str:
    """Triton's statistics endpoint for ``model``."""
    return f"http://{server.http_url}/v2/models/{model}/stats"


def execution_count(response: httpx.Response) -> int:
    """The execution count in a ``/v2/models/<model>/stats`` response."""
    return int(response.json()["model_stats"][0]["execution_count"])


def lm_steps(server: LocalTriton, model: str = "author_lm") -> int:
    """``model``'s executions so far (Triton's ``/v2/models/<model>/stats``)."""
    return execution_count(httpx.get(stats_url(server, model)))


def settled_steps(server: LocalTriton, model: str = "author_lm", quiet_s: float = 1.0) -> int:
    """``lm_steps`` once it has not changed for ``quiet_s`` seconds (no loop running)."""
    last = lm_steps(server, model)
    while True:
        time.sleep(quiet_s)
        now = lm_steps(server, model)
        if now == last:
            return now
        last = now


async def steps_past(server: LocalTriton, count: int) -> None:
    """Return once ``author_lm`` has run more than ``count`` steps in all.

    Polled without blocking the event loop and without a pause: the tiny author
    runs all ``LONG`` steps in about 0.2 s, so a blocking or sleeping poll can
    first see the loop when it has already ended.
    """
    async with httpx.AsyncClient() as stats:
        while execution_count(await stats.get(stats_url(server, "author_lm"))) <= count:
            pass


def tensors(module: Any) -> list[Any]:
    """``INPUTS`` as ``module.InferInput``s (tritonclient http or grpc)."""
    return infer_inputs(module.InferInput, INPUTS)


@pytest.fixture(scope="module")
def server(tiny_triton: TinyTriton) -> LocalTriton:
    return tiny_triton.server


def test_an_unstopped_generation_runs_every_step(server: LocalTriton) -> None:
    async def call() -> dict[str, np.ndarray]:
        client = TritonClient(server.http_url)
        try:
            return await client.infer("author", INPUTS, ["TOKENS"])
        finally:
            await client.close()

    before = settled_steps(server)
    outputs = asyncio.run(call())
    assert outputs["TOKENS"].size == LONG
    assert settled_steps(server) - before == FULL_RUN


def test_the_api_deadline_stops_the_loop_inside_triton(server: LocalTriton) -> None:
    async def call(deadline_s: float | None) -> None:
        client = TritonClient(server.http_url)
        now = asyncio.get_running_loop().time()
        token = bind_deadline(None if deadline_s is None else now + deadline_s)
        try:
            await client.infer("author", INPUTS, ["TOKENS"])
        finally:
            unbind_deadline(token)
            await client.close()

    # The deadline is a third of what an unstopped run takes on this machine (a fixed
    # one let a fast machine finish all the steps before it).
    unstopped_s = []
    for _ in range(2):  # the faster of two, should one be slowed by other work
        started = time.monotonic()
        asyncio.run(call(None))
        unstopped_s.append(time.monotonic() - started)
    # Measuring runs slowed by other work give a deadline a fast run can beat; such a
    # try is made again with half the deadline (a loop ignoring it finishes every try).
    deadline_s = min(unstopped_s) / 3
    for _ in range(4):
        before = settled_steps(server)
        try:
            asyncio.run(call(deadline_s))
        except InferenceError as failed:
            # Stopped in the loop, or (machine busy) rejected by the queue policy before it ran.
            assert re.search(r"ran past its timeout|Request timeout expired", failed.detail)
            break
        assert settled_steps(server) - before == FULL_RUN
        deadline_s /= 2
    else:
        pytest.fail("every try ran all its steps past the deadline")
    assert settled_steps(server) - before < FULL_RUN


def test_the_api_deadline_reaches_the_csm_frame_loop_inside_the_ensemble(
    server: LocalTriton,
) -> None:
    frames = 900  # the tiny CSM's max_seq_len is 1024; no seed ends it this early
    inputs = {
        "SEGMENT_TEXT": np.array([b"Hello there, how are you?"], np.object_),
        "SEGMENT_SPEAKER": np.array([b"0"], np.object_),
        "SEGMENT_AUDIO": np.zeros(0, np.float32),
        "SEGMENT_AUDIO_SAMPLES": np.array([0], np.int64),
        "MAX_NEW_FRAMES": np.array([frames], np.int32),
        "TEMPERATURE": np.array([0.9], np.float32),
        "DEPTH_TEMPERATURE": np.array([0.9], np.float32),
        "TOP_K": np.array([50], np.int32),
        "REPETITION_PENALTY": np.array([1.0], np.float32),
        "PENALTY_WINDOW": np.array([0], np.int32),
        "SEED": np.array([1], np.int64),
        "NUM_QUANTIZERS": np.array([32], np.int64),
    }

    async def call() -> None:
        client = TritonClient(server.http_url)
        token = bind_deadline(asyncio.get_running_loop().time() + 0.5)
        try:
            await client.infer(TINY_CSM, inputs, ["AUDIO", "AUDIO_CODES", "DROPPED_SEGMENTS"])
        finally:
            unbind_deadline(token)
            await client.close()

    backbone = f"{TINY_CSM}_backbone"
    before = settled_steps(server, backbone)
    with pytest.raises(InferenceError) as failed:
        asyncio.run(call())
    assert re.search(r"ran past its timeout|Request timeout expired", failed.value.detail)
    assert settled_steps(server, backbone) - before < frames


def test_the_api_deadline_stops_a_long_transcription_inside_triton(triton: LocalTriton) -> None:
    """Whisper decodes 30 s windows one at a time and stops between them at the deadline.

    Four minutes of noise take seconds to transcribe on this machine; the
    deadline is half a second.
    """
    rng = np.random.default_rng(0)
    clip = (0.1 * rng.standard_normal(240 * 16_000)).astype(np.float32)

    async def call() -> None:
        client = TritonClient(triton.http_url)
        token = bind_deadline(asyncio.get_running_loop().time() + 0.5)
        try:
            await client.infer("whisper_asr", {"AUDIO": clip}, ["TEXT", "WORDS"])
        finally:
            unbind_deadline(token)
            await client.close()

    with pytest.raises(InferenceError) as failed:
        asyncio.run(call())
    assert re.search(r"ran past its timeout|Request timeout expired", failed.value.detail)


def test_a_grpc_cancel_stops_the_loop_inside_triton(server: LocalTriton) -> None:
    """A cancel that reaches Triton while the loop runs stops it short of ``FULL_RUN``.

    The tiny author's whole loop takes about 0.2 s, and on a busy machine the
    cancel can reach Triton only after the loop has ended; such a try shows
    nothing either way. Up to five tries are made: a loop that ignored
    cancellation would run every step in all of them.
    """
    tries = 5

    async def call() -> None:
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        try:
            before = lm_steps(server)
            task = asyncio.create_task(client.infer("author", tensors(triton_grpc)))
            await steps_past(server, before)
            task.cancel()
            with pytest.raises((asyncio.CancelledError, InferenceServerException)):
                await task
        finally:
            await client.close()

    steps_run = []
    for _ in range(tries):
        before = settled_steps(server)
        asyncio.run(call())
        steps_run.append(settled_steps(server) - before)
        if steps_run[-1] < FULL_RUN:
            break
    assert all(0 < steps <= FULL_RUN for steps in steps_run), steps_run
    assert steps_run[-1] < FULL_RUN, steps_run


def test_closing_the_http_connection_does_not_stop_the_loop(server: LocalTriton) -> None:
    """Why the API sends its deadline: Triton 2.51 ignores a closed HTTP connection."""

    async def call() -> None:
        client = triton_http.InferenceServerClient(server.http_url)
        try:
            before = lm_steps(server)
            task = asyncio.create_task(client.infer("author", tensors(triton_http)))
            await steps_past(server, before)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            await client.close()

    before = settled_steps(server)
    asyncio.run(call())
    assert settled_steps(server) - before == FULL_RUN


def test_a_client_that_goes_away_stops_its_authoring_inside_triton(triton: LocalTriton) -> None:
    """``CONVERSE_TRITON_PROTOCOL=grpc``: a disconnect cancels the author call and its loop.

    The same greedy request is first run to its end for the step count it takes
    (18 here, under a second). The client leaves once two steps have run; on a
    busy machine its cancel can reach Triton only after the loop has ended, a try
    that shows nothing either way, so up to three tries are made: a loop that
    ignored the cancel would run every step in all of them.
    """
    app = create_app(make_settings(triton_url=triton.http_url, triton_grpc_url=triton.grpc_url,
                                   triton_protocol="grpc"))
    body = {"conversation": [{"speaker": "0", "text": "So, how was the trip to the coast?"},
                             {"speaker": "1"}],
            "params": {"temperature": 0.0, "max_new_tokens": 128}}
    before = 0

    async def never_gone(sent: list[dict[str, Any]]) -> None:
        await asyncio.Event().wait()

    async def once_authoring(sent: list[dict[str, Any]]) -> None:
        await steps_past(triton, before + 1)

    async def full_run() -> int:
        answered = await post_then_disconnect(app, "/v1/converse", body, never_gone)
        assert answered[0]["status"] == 200
        return await asyncio.to_thread(settled_steps, triton) - before

    async def gone_run() -> tuple[int, int, list[dict[str, Any]]]:
        voiced = lm_steps(triton, "kokoro_network")
        sent = await post_then_disconnect(app, "/v1/converse", body, once_authoring)
        steps = await asyncio.to_thread(settled_steps, triton) - before
        return steps, lm_steps(triton, "kokoro_network") - voiced, sent

    async def scenario() -> tuple[int, list[tuple[int, int, list[dict[str, Any]]]]]:
        nonlocal before
        try:
            before = settled_steps(triton)
            full_steps = await full_run()
            tries = []
            for _ in range(3):
                before = settled_steps(triton)
                tries.append(await gone_run())
                if tries[-1][0] < full_steps:
                    break
            return full_steps, tries
        finally:
            await app.state.triton.close()

    full_steps, tries = asyncio.run(scenario())
    assert full_steps > 2
    assert all(2 <= steps <= full_steps for steps, _, _ in tries), (tries, full_steps)
    steps, voiced, sent = tries[-1]
    assert steps < full_steps, [t[0] for t in tries]
    assert voiced == 0  # nothing voiced for the gone client
    assert not any(message.get("status") == 200 for message in sent)
    assert (app.state.admission.active, app.state.admission.waiting) == (0, 0)
