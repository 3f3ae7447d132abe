"""A scriptable stand-in for the Triton client, for failure cases a real server cannot stage.

Each model's behaviour is an async function ``(inputs) -> outputs``; the
default Kokoro voices every piece as ``PIECE_SAMPLES`` samples at 0.5 (no edge
silence to trim), so durations are exact.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from handler.app import create_app
from handler.engines.catalog import ModelCatalog
from handler.errors import InferenceError, ServiceUnavailable
from tests.helpers import make_settings

PIECE_SAMPLES = 2400  # 100 ms at 24 kHz
Behaviour = Callable[[dict[str, np.ndarray]], Awaitable[dict[str, np.ndarray]]]


def kokoro_config(sample_rate: int = 24_000) -> dict[str, Any]:
    def parameter(value: str) -> dict[str, str]:
        return {"string_value": value}

    return {"parameters": {"family": parameter("kokoro"),
                           "voices": parameter("jf_alpha,jm_kumo"),
                           "speed_range": parameter("0.5,2.0"),
                           "sample_rate": parameter(str(sample_rate))}}


async def constant_voice(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"AUDIO": np.full(PIECE_SAMPLES, 0.5, np.float32)}


async def never(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def failing(message: str, status: int = 500) -> Behaviour:
    async def fail(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from tritonclient.utils import InferenceServerException

        from handler.triton import _inference_error

        raise _inference_error("model", InferenceServerException(message, status=str(status)))

    return fail


async def words(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    payload = json.dumps([{"word": "hi", "start": 0.0, "end": 0.05}]).encode()
    return {"WORDS": np.array([payload], dtype=np.object_),
            "TEXT": np.array([b"hi"], dtype=np.object_)}


class FakeTriton:
    """Implements the TritonClient methods the API uses, with per-model behaviours."""

    def __init__(self, sample_rate: int = 24_000, extra_models: tuple[str, ...] = ()) -> None:
        self.configs: dict[str, dict[str, Any]] = {"kokoro": kokoro_config(sample_rate)}
        for name in extra_models:
            family = {"whisper_asr": "asr", "aligner": "aligner"}.get(name, name)
            self.configs[name] = {"parameters": {"family": {"string_value": family}}}
        self.behaviours: dict[str, Behaviour] = {"kokoro": constant_voice, "aligner": words,
                                                 "whisper_asr": words}
        self.catalog_behaviour: Callable[[], Awaitable[None]] | None = None
        self.calls: list[str] = []
        self.cancelled: list[str] = []
        self.ready = True

    async def is_ready(self) -> bool:
        return self.ready

    async def ready_models(self) -> dict[str, dict[str, Any]]:
        if self.catalog_behaviour is not None:
            await self.catalog_behaviour()
        if not self.ready:
            raise ServiceUnavailable("the inference server is unreachable; retry later")
        return self.configs

    async def infer(self, model: str, inputs: dict[str, np.ndarray],
                    outputs: list[str]) -> dict[str, np.ndarray]:
        self.calls.append(model)
        try:
            return await self.behaviours[model](inputs)
        except asyncio.CancelledError:
            self.cancelled.append(model)
            raise
        except KeyError as error:
            raise InferenceError(f"no model {model}") from error

    async def close(self) -> None:
        return None


@contextmanager
def fake_client(fake: FakeTriton, **overrides: Any) -> Iterator[TestClient]:
    """A TestClient over an app whose Triton client is ``fake``."""
    settings = make_settings(**overrides)
    app = create_app(settings)
    app.state.triton = fake
    app.state.catalog = ModelCatalog(settings, fake)  # type: ignore[arg-type]
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client
