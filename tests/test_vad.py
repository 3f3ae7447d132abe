"""Silero VAD in Triton: window-by-window parity with onnxruntime in-process, state carried.

The window loop's budget checks run without Triton: the python model is
imported with stand-ins for Triton's module, its request and the network.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
import types
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from devtools.local_triton import LocalTriton
from export.repository import COMMON
from export.vad import silero_onnx
from handler.audio import resample
from handler.engines.vad import SileroVad
from handler.triton import TritonClient
from tests.helpers import speak

RATE = 16_000
WINDOW = SileroVad.WINDOW[RATE]
LEAD_WINDOWS, TAIL_WINDOWS = 20, 30


@pytest.fixture(scope="module")
def windows(real_client: TestClient) -> tuple[np.ndarray, slice]:
    """Silence, a spoken sentence, silence, as [N, 512] windows; the sentence's window span."""
    voice = speak(real_client, "0", "The weather was lovely, so we walked along the river.")
    speech = voice[: len(voice) // WINDOW * WINDOW]
    audio = np.concatenate([np.zeros(LEAD_WINDOWS * WINDOW, np.float32), speech,
                            np.zeros(TAIL_WINDOWS * WINDOW, np.float32)])
    return audio.reshape(-1, WINDOW), slice(LEAD_WINDOWS, LEAD_WINDOWS + len(speech) // WINDOW)


def reference(windows: np.ndarray, rate: int = RATE) -> np.ndarray:
    """silero-vad's own recipe (utils_vad.OnnxWrapper): 64 (32 at 8 kHz) samples of context,
    state carried."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(silero_onnx()), providers=["CPUExecutionProvider"])
    size = SileroVad.CONTEXT[rate]
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros(size, np.float32)
    probabilities = []
    for window in windows:
        feeds = {"input": np.concatenate([context, window])[None], "state": state,
                 "sr": np.array(rate, np.int64)}
        output, state = session.run(None, feeds)
        probabilities.append(float(output[0, 0]))
        context = window[-size:]
    return np.array(probabilities, np.float32)


def in_triton(server: LocalTriton, calls: list[np.ndarray], rate: int = RATE) -> np.ndarray:
    async def run() -> np.ndarray:
        client = TritonClient(server.http_url)
        vad = SileroVad(client)
        state, results = vad.initial_state(rate), []
        try:
            for windows in calls:
                probabilities, state = await vad.speech_probabilities(windows, state, rate)
                results.append(probabilities)
        finally:
            await client.close()
        return np.concatenate(results)

    return asyncio.run(run())


@pytest.mark.triton
def test_triton_matches_onnxruntime_window_by_window(
    triton: LocalTriton, windows: tuple[np.ndarray, slice]
) -> None:
    audio, _ = windows
    np.testing.assert_allclose(in_triton(triton, [audio]), reference(audio), atol=1e-5)


@pytest.mark.triton
def test_8_khz_windows_match_onnxruntime(
    triton: LocalTriton, windows: tuple[np.ndarray, slice]
) -> None:
    audio, speech = windows
    narrow = resample(audio.reshape(-1), RATE, 8_000)
    narrow = narrow[: len(narrow) // 256 * 256].reshape(-1, 256)
    probabilities = in_triton(triton, [narrow[:9], narrow[9:]], 8_000)
    np.testing.assert_allclose(probabilities, reference(narrow, 8_000), atol=1e-5)
    assert probabilities[speech.start * 2: speech.stop * 2].max() > 0.9


@pytest.mark.triton
def test_speech_is_likely_and_silence_is_not(
    triton: LocalTriton, windows: tuple[np.ndarray, slice]
) -> None:
    audio, speech = windows
    probabilities = in_triton(triton, [audio])
    assert probabilities[: speech.start].max() < 0.1
    assert probabilities[speech.stop + 10:].max() < 0.1
    assert np.mean(probabilities[speech] > 0.5) > 0.6
    assert probabilities[speech].max() > 0.9


@pytest.mark.triton
def test_state_carried_across_calls_equals_one_call(
    triton: LocalTriton, windows: tuple[np.ndarray, slice]
) -> None:
    audio, speech = windows
    middle = speech.start + 7
    split = in_triton(triton, [audio[:middle], audio[middle:middle + 1], audio[middle + 1:]])
    np.testing.assert_allclose(split, in_triton(triton, [audio]), atol=1e-6)


def test_bad_windows_are_refused_before_any_call() -> None:
    async def run() -> None:
        client = TritonClient("127.0.0.1:9")  # never reached
        vad = SileroVad(client)
        try:
            with pytest.raises(ValueError, match="windows must be"):
                await vad.speech_probabilities(np.zeros((2, 500), np.float32),
                                               vad.initial_state(), RATE)
            with pytest.raises(ValueError, match="sample rate"):
                await vad.speech_probabilities(np.zeros((2, 512), np.float32),
                                               vad.initial_state(), 44_100)
        finally:
            await client.close()

    asyncio.run(run())


class _TritonError:
    CANCELLED = "CANCELLED"

    def __init__(self, message: str, code: str | None = None) -> None:
        self.message, self.code = message, code


class _Response:
    def __init__(self, output_tensors: list[Any] | None = None,
                 error: _TritonError | None = None) -> None:
        self.outputs = dict(output_tensors or [])
        self.error = error


class _Request:
    """Stands in for ``pb_utils.InferenceRequest``: inputs, deadline, cancelled from a window on."""

    def __init__(self, windows: int, network: _Network, deadline_s: float = 60.0,
                 cancelled_after: int | None = None) -> None:
        self.inputs = {
            "WINDOWS": np.zeros((windows, WINDOW), np.float32),
            "STATE": np.zeros((2, 1, 128), np.float32),
            "CONTEXT": np.zeros(SileroVad.CONTEXT[RATE], np.float32),
            "SAMPLE_RATE": np.array([RATE], np.int64),
        }
        self.network, self.cancelled_after = network, cancelled_after
        self._parameters = json.dumps(
            {"converse_deadline_unix_us": int((time.time() + deadline_s) * 1e6)})

    def timeout(self) -> int:
        return 0

    def parameters(self) -> str:
        return self._parameters

    def is_cancelled(self) -> bool:
        return self.cancelled_after is not None and self.network.runs >= self.cancelled_after


class _Network:
    """Stands in for the onnxruntime session: counts the windows it runs."""

    def __init__(self) -> None:
        self.runs = 0

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        self.runs += 1
        return np.full((1, 1), 0.25, np.float32), feeds["state"]


@pytest.fixture
def vad_model(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``silero_vad``'s python model module, imported outside Triton."""
    stub = types.ModuleType("triton_python_backend_utils")
    stub.TritonError = _TritonError  # type: ignore[attr-defined]
    stub.InferenceResponse = _Response  # type: ignore[attr-defined]
    stub.Tensor = lambda name, value: (name, value)  # type: ignore[attr-defined]
    stub.get_input_tensor_by_name = (  # type: ignore[attr-defined]
        lambda request, name: types.SimpleNamespace(as_numpy=lambda: request.inputs[name]))
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stub)
    modules = {}
    for name, path in [("converse_backend", COMMON / "converse_backend.py"),
                       ("silero_vad_model", COMMON.parent / "silero_vad" / "1" / "model.py")]:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        modules[name] = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, modules[name])  # model.py imports the first
        spec.loader.exec_module(modules[name])
    return modules["silero_vad_model"]


def run_model(vad_model: Any, request: _Request) -> _Response:
    model = vad_model.TritonPythonModel()
    model.session = request.network
    [response] = model.execute([request])
    return response  # type: ignore[no-any-return]


def test_a_request_past_its_deadline_runs_no_window(vad_model: Any) -> None:
    """Its caller gave up while it waited in Triton's queue: the instance is not held."""
    network = _Network()
    response = run_model(vad_model, _Request(600, network, deadline_s=-1.0))
    assert response.error is not None and response.error.code == _TritonError.CANCELLED
    assert network.runs == 0


def test_a_cancelled_request_stops_within_one_check_of_windows(vad_model: Any) -> None:
    network = _Network()
    response = run_model(vad_model, _Request(600, network, cancelled_after=40))
    assert response.error is not None and response.error.code == _TritonError.CANCELLED
    assert 40 <= network.runs <= 40 + vad_model.BUDGET_CHECK_WINDOWS


def test_a_request_within_its_budget_gets_every_windows_probability(vad_model: Any) -> None:
    network = _Network()
    response = run_model(vad_model, _Request(600, network))
    assert response.error is None and network.runs == 600
    np.testing.assert_array_equal(response.outputs["PROBABILITIES"], np.full(600, 0.25))
