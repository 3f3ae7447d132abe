"""Silero VAD through Triton's ``silero_vad`` model: speech probability per window.

A session feeds its audio (16 kHz or 8 kHz mono float32) in consecutive
windows and carries the VAD's state from call to call, so one call may send
whatever whole windows it has. The state is one float32 array the caller
treats as opaque: silero's recurrent state [2, 1, 128] (flattened) followed by
the last ``CONTEXT`` samples seen, which silero-vad's own ``OnnxWrapper``
prepends to every window (silero_vad/utils_vad.py, v6.2); carrying both makes
the probabilities independent of how the stream is cut into calls.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from handler.triton import TritonClient

VAD_MODEL = "silero_vad"
_RECURRENT_SHAPE = (2, 1, 128)
_RECURRENT_SIZE = 2 * 1 * 128


class SileroVad:
    """Speech probabilities of consecutive audio windows from Triton's ``silero_vad``.

    Args:
        triton: the API's Triton client.
    """

    WINDOW: ClassVar[dict[int, int]] = {16000: 512, 8000: 256}
    CONTEXT: ClassVar[dict[int, int]] = {16000: 64, 8000: 32}

    def __init__(self, triton: TritonClient) -> None:
        self.triton = triton

    @staticmethod
    def initial_state(sample_rate: int = 16000) -> np.ndarray:
        """The state at the start of a stream: float32 [256 + CONTEXT[sample_rate]] zeros.

        Raises:
            ValueError: ``sample_rate`` is not 16000 or 8000.
        """
        if sample_rate not in SileroVad.CONTEXT:
            raise ValueError(f"sample rate must be one of {sorted(SileroVad.CONTEXT)} Hz")
        return np.zeros(_RECURRENT_SIZE + SileroVad.CONTEXT[sample_rate], dtype=np.float32)

    async def speech_probabilities(
        self, windows: np.ndarray, state: np.ndarray, sample_rate: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Speech probability of each window, in order, and the state after the last one.

        Args:
            windows: float32 [N, WINDOW[sample_rate]] consecutive windows, samples in [-1, 1].
            state: from :meth:`initial_state` or the previous call (same ``sample_rate``).
            sample_rate: 16000 or 8000 Hz.

        Returns:
            ``(probabilities, new_state)``: float32 [N] in [0, 1], and the state to pass next.

        Raises:
            ValueError: unsupported rate, windows of the wrong shape, or a state of another rate.
            ServiceUnavailable / InferenceError: Triton unreachable or failing.
        """
        if sample_rate not in self.WINDOW:
            raise ValueError(f"sample rate must be one of {sorted(self.WINDOW)} Hz")
        window = self.WINDOW[sample_rate]
        if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] != window:
            raise ValueError(f"windows must be [N >= 1, {window}], not {list(windows.shape)}")
        context = self.CONTEXT[sample_rate]
        if state.shape != (_RECURRENT_SIZE + context,):
            raise ValueError(f"state must come from initial_state({sample_rate})")
        windows = np.ascontiguousarray(windows, dtype=np.float32)
        outputs = await self.triton.infer(
            VAD_MODEL,
            {
                "WINDOWS": windows,
                "STATE": state[:_RECURRENT_SIZE].reshape(_RECURRENT_SHAPE).astype(np.float32),
                "CONTEXT": state[_RECURRENT_SIZE:].astype(np.float32),
                "SAMPLE_RATE": np.array([sample_rate], dtype=np.int64),
            },
            ["PROBABILITIES", "STATE_OUT"],
        )
        new_state = np.concatenate(
            [outputs["STATE_OUT"].reshape(-1), windows[-1, -context:]]
        ).astype(np.float32)
        return outputs["PROBABILITIES"].astype(np.float32), new_state
