"""Silero VAD in Triton: window-by-window parity with onnxruntime in-process, state carried."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fastapi.testclient import TestClient

from devtools.local_triton import LocalTriton
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
