"""CSM adapter: voice the open turn in the context of the conversation so far.

The served ``<name>`` ensemble (``python -m export csm``) takes the
conversation as segments (text, speaker label, 24 kHz audio) and returns the
Mimi decoder's audio for the generated frames; docs/csm.md has the tensors.
Sampling defaults follow the kalpa-converse ``params`` contract.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np

from handler.errors import InferenceError, InvalidRequest
from handler.triton import TritonClient

# The prompt builder's error for an open turn that cannot fit on its own.
PROMPT_TOO_LONG = "prompt_too_long:"


@dataclass(frozen=True)
class CsmParams:
    """Sampling parameters of one request (temperature 0 = greedy).

    ``max_new_tokens`` counts frames (80 ms each at 12.5 Hz); ``quantizers`` is
    how many of the 32 Mimi codebooks decode the audio; ``penalty_window`` is in
    frames of codebook 0.
    """

    temperature: float = 0.7
    depth_temperature: float | None = None
    top_k: int = 50
    repetition_penalty: float = 3.0
    penalty_window: int = 20
    max_new_tokens: int = 512
    quantizers: int = 32
    seed: int | None = None


@dataclass(frozen=True)
class Segment:
    """One turn of the prompt: speaker label, text ('' when unknown) and audio.

    ``audio`` is float32 [n] samples, mono, -1..1, at the model's sample rate
    (24000 Hz), or None for a turn without audio.
    """

    speaker: str
    text: str
    audio: np.ndarray | None = None


@dataclass(frozen=True)
class CsmResult:
    """One generated reply.

    ``audio`` is float32 [frames * 1920] at 24000 Hz; ``frames`` counts Mimi
    frames (80 ms each); ``dropped_turns`` counts the oldest history turns left
    out of the prompt.
    """

    audio: np.ndarray
    frames: int
    dropped_turns: int


@dataclass(frozen=True)
class CsmModel:
    """A served CSM ensemble, described by its Triton config parameters.

    Attributes:
        name: the ensemble's model name (the API model id).
        sample_rate: Mimi's sample rate, Hz (24000).
        num_quantizers: Mimi codebooks (32).
        speakers: speaker labels the checkpoint was trained on ("0", "1").
        max_seq_len: frames the backbone attends to (prompt + generated).
    """

    name: str
    sample_rate: int
    num_quantizers: int
    speakers: list[str]
    max_seq_len: int

    async def generate(
        self, triton: TritonClient, segments: list[Segment], params: CsmParams
    ) -> CsmResult:
        """Voice the last segment's text conditioned on every earlier segment.

        Raises:
            InvalidRequest: the open turn alone does not fit in ``max_seq_len``
                with ``params.max_new_tokens`` frames left for generation.
            ServiceUnavailable, InferenceError: from Triton.
        """
        clips = [s.audio if s.audio is not None else np.zeros(0, np.float32) for s in segments]
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        depth_temperature = (
            params.temperature if params.depth_temperature is None else params.depth_temperature
        )
        inputs = {
            "SEGMENT_TEXT": np.array([s.text.encode() for s in segments], dtype=np.object_),
            "SEGMENT_SPEAKER": np.array([s.speaker.encode() for s in segments], dtype=np.object_),
            "SEGMENT_AUDIO": np.concatenate(clips).astype(np.float32),
            "SEGMENT_AUDIO_SAMPLES": np.array([len(c) for c in clips], np.int64),
            "MAX_NEW_FRAMES": np.array([params.max_new_tokens], np.int32),
            "TEMPERATURE": np.array([params.temperature], np.float32),
            "DEPTH_TEMPERATURE": np.array([depth_temperature], np.float32),
            "TOP_K": np.array([params.top_k], np.int32),
            "REPETITION_PENALTY": np.array([params.repetition_penalty], np.float32),
            "PENALTY_WINDOW": np.array([params.penalty_window], np.int32),
            "SEED": np.array([seed], np.int64),
            "NUM_QUANTIZERS": np.array([params.quantizers], np.int64),
        }
        try:
            outputs = await triton.infer(
                self.name, inputs, ["AUDIO", "AUDIO_CODES", "DROPPED_SEGMENTS"]
            )
        except InferenceError as error:
            message = str(error)
            if PROMPT_TOO_LONG in message:
                detail = message.split(PROMPT_TOO_LONG, 1)[1].strip()
                raise InvalidRequest(
                    f"the open turn does not fit: {detail}", turn_index=len(segments) - 1
                ) from error
            raise
        return CsmResult(
            audio=outputs["AUDIO"].reshape(-1).astype(np.float32),
            frames=int(outputs["AUDIO_CODES"].shape[-1]),
            dropped_turns=int(outputs["DROPPED_SEGMENTS"].reshape(-1)[0]),
        )
