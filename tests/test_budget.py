"""When the python models' loops stop: ``converse_backend.Budget`` and the deadline the API sends.

Unit tests with stand-in requests; the last test sends a real request through
the tiny repository's Triton to show the parameter reaches the loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np
import pytest
import tritonclient.http.aio as triton_http
from tritonclient.utils import InferenceServerException

from handler.triton import (
    DEADLINE_PARAMETER,
    TritonClient,
    bind_deadline,
    infer_inputs,
    unbind_deadline,
)
from tests.helpers import TinyTriton


class Request:
    """Stands in for ``pb_utils.InferenceRequest``: its timeout (µs) and parameters (JSON)."""

    def __init__(self, timeout_us: int = 0, parameters: dict[str, Any] | None = None) -> None:
        self._timeout_us = timeout_us
        self._parameters = json.dumps(parameters or {})

    def timeout(self) -> int:
        return self._timeout_us

    def parameters(self) -> str:
        return self._parameters

    def is_cancelled(self) -> bool:
        return False


def unix_us(from_now_s: float) -> int:
    return int((time.time() + from_now_s) * 1e6)


def test_a_deadline_spent_in_the_queue_stops_the_loop_at_once(backend: Any) -> None:
    """The ``timeout`` alone would give the loop 10 s more from ``execute``."""
    request = Request(timeout_us=10_000_000, parameters={DEADLINE_PARAMETER: unix_us(-0.5)})
    with pytest.raises(backend.Cancelled, match="ran past its timeout"):
        backend.Budget(request).check()


def test_the_deadline_parameter_is_preferred_to_the_timeout(backend: Any) -> None:
    budget = backend.Budget(Request(timeout_us=1, parameters={DEADLINE_PARAMETER: unix_us(60)}))
    time.sleep(0.01)
    budget.check()  # the 1 µs timeout has passed; the deadline has not
    assert budget.ends == pytest.approx(time.monotonic() + 60, abs=1.0)


@pytest.mark.parametrize("parameters", [{}, {DEADLINE_PARAMETER: "soon"},
                                        {DEADLINE_PARAMETER: True}])
def test_without_a_usable_deadline_the_timeout_counts_from_execute(
    backend: Any, parameters: dict[str, Any],
) -> None:
    budget = backend.Budget(Request(timeout_us=2_000_000, parameters=parameters))
    assert budget.ends == pytest.approx(time.monotonic() + 2.0, abs=0.5)
    assert backend.Budget(Request(parameters=parameters)).ends is None


def test_the_api_sends_its_deadline_as_unix_microseconds(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: dict[str, Any] = {}

    async def infer(self: Any, model: str, inputs: Any, **kwargs: Any) -> Any:
        sent.update(kwargs)
        raise asyncio.CancelledError  # nothing to answer; the call's arguments are the point

    monkeypatch.setattr(triton_http.InferenceServerClient, "infer", infer)

    async def call() -> float:
        client = TritonClient("127.0.0.1:1")
        token = bind_deadline(asyncio.get_running_loop().time() + 5.0)
        expected = time.time() + 5.0
        try:
            with pytest.raises(asyncio.CancelledError):
                await client.infer("author", {"SEED": np.array([1], np.int64)}, ["TEXT"])
        finally:
            unbind_deadline(token)
            await client.close()
        return expected

    expected = asyncio.run(call())
    assert sent["parameters"][DEADLINE_PARAMETER] / 1e6 == pytest.approx(expected, abs=0.2)
    assert sent["timeout"] == pytest.approx(5e6, abs=2e5)


@pytest.mark.triton
def test_the_deadline_parameter_reaches_the_loop_inside_triton(tiny_triton: TinyTriton) -> None:
    """A generous ``timeout`` with a deadline already past: the author loop refuses to run."""
    inputs = infer_inputs(triton_http.InferInput, {
        "PROMPT": np.array([b"Hello there"], np.object_),
        "TEMPERATURE": np.array([0.0], np.float32),
        "TOP_K": np.array([0], np.int32),
        "MAX_NEW_TOKENS": np.array([64], np.int32),
        "SEED": np.array([1], np.int64),
    })

    async def call() -> None:
        client = triton_http.InferenceServerClient(tiny_triton.server.http_url)
        try:
            await client.infer("author", inputs, timeout=30_000_000,
                               parameters={DEADLINE_PARAMETER: unix_us(-1.0)})
        finally:
            await client.close()

    with pytest.raises(InferenceServerException, match="ran past its timeout"):
        asyncio.run(call())
