"""The ASR guard against greedy repetition loops (``_transcribe``, model_repository/whisper_asr).

``_decode`` is replaced by a script of transcripts, so what is under test is
the rule: when a second decoding runs, with what, and which result is kept.
The guard on real speech through Triton is in tests/test_asr_window.py.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any

import numpy as np
import pytest

from export.repository import COMMON

RATE = 16_000


@pytest.fixture
def asr(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The whisper_asr python model's module, imported outside Triton."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils",
                        types.ModuleType("triton_python_backend_utils"))
    monkeypatch.syspath_prepend(str(COMMON))
    path = COMMON.parent / "whisper_asr" / "1" / "model.py"
    spec = importlib.util.spec_from_file_location("whisper_asr_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def transcribe(asr: Any, seconds: float, decodings: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """``_transcribe`` of ``seconds`` of silence whose decodings return ``decodings`` in turn."""
    model = asr.TritonPythonModel()
    model.min_window_s = 30.0  # the full window: no second pass for the padding
    calls: list[dict[str, Any]] = []

    def decode(budget: Any, audio: np.ndarray, language: str, window_frames: int,
               no_repeat_ngram_size: int = 0) -> tuple[str, list[Any]]:
        calls.append({"window": window_frames, "no_repeat": no_repeat_ngram_size})
        return decodings[len(calls) - 1], []

    model._decode = decode
    text, _ = model._transcribe(None, np.zeros(int(seconds * RATE), np.float32), "en")
    return text, calls


def test_a_transcript_longer_than_speech_is_decoded_again_without_repeats(asr: Any) -> None:
    limit = int(asr.MAX_CHARS_PER_S * 2 + asr.SLACK_CHARS)
    text, calls = transcribe(asr, 2.0, ["jo" * limit, "Ho ho."])
    assert text == "Ho ho."
    assert calls[1] == {"window": asr.FULL_WINDOW_FRAMES, "no_repeat": asr.LOOP_NGRAM}


def test_a_transcript_within_the_rate_is_kept_without_a_second_decoding(asr: Any) -> None:
    limit = int(asr.MAX_CHARS_PER_S * 2 + asr.SLACK_CHARS)
    text, calls = transcribe(asr, 2.0, ["a" * limit])
    assert text == "a" * limit and len(calls) == 1


@pytest.mark.parametrize("second", ["", "x" * 500])
def test_a_second_decoding_that_is_empty_or_no_shorter_is_not_kept(asr: Any, second: str) -> None:
    looped = "jo" * 200
    text, calls = transcribe(asr, 2.0, [looped, second])
    assert text == looped and len(calls) == 2


def test_decoding_stops_between_windows_once_the_request_is_cancelled(asr: Any) -> None:
    """faster-whisper yields a segment per window; a cancelled request stops the next one."""
    windows_decoded: list[int] = []

    def segments() -> Any:
        for window in range(10):
            windows_decoded.append(window)
            yield types.SimpleNamespace(text=f" word{window}", words=[])

    class CancelledAfterTwoChecks:
        """Stands in for ``converse_backend.Budget``: cancelled after the first window."""

        checks = 0

        def check(self) -> None:
            self.checks += 1
            if self.checks > 2:
                raise asr.backend.Cancelled("the request was cancelled")

    model = asr.TritonPythonModel()
    model.model = types.SimpleNamespace(window_frames=0,
                                        transcribe=lambda audio, **_: (segments(), None))
    with pytest.raises(asr.backend.Cancelled):
        model._decode(CancelledAfterTwoChecks(), np.zeros(RATE, np.float32), "en", 3000)
    assert windows_decoded == [0, 1]
