"""CSM engine: voice the open turn in the context of the conversation so far.

The served ``<name>`` ensemble (``python -m export csm``) takes the
conversation as segments (text, speaker label, 24 kHz audio) and returns the
Mimi decoder's audio for the generated frames; docs/csm.md has the tensors.
Sampling defaults follow the kalpa-converse ``params`` contract.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass

import anyio
import numpy as np

from handler.audio import resample
from handler.engines.base import (
    ParamRule,
    ParamValue,
    TurnInContext,
    VoiceStream,
    model_audio,
)
from handler.errors import InferenceError, InvalidRequest
from handler.triton import TritonClient

# The prompt builder's error for an open turn that cannot fit on its own.
PROMPT_TOO_LONG = "prompt_too_long:"


@dataclass(frozen=True)
class CsmParams:
    """Sampling parameters of one request (temperature 0 = greedy).

    ``max_new_frames`` counts Mimi frames (80 ms each at 12.5 Hz);
    ``num_codebooks`` is how many of the Mimi codebooks decode the audio;
    ``penalty_window`` is in frames of codebook 0; ``seed`` None draws one.
    Defaults are those of :meth:`CsmEngine.param_rules`.
    """

    temperature: float
    depth_temperature: float | None
    top_k: int
    repetition_penalty: float
    penalty_window: int
    max_new_frames: int
    num_codebooks: int
    seed: int | None


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
class CsmEngine:
    """A served CSM ensemble, described by its Triton config parameters.

    Implements :class:`handler.engines.base.VoiceEngine`.

    Attributes:
        model_id: the ensemble's model name (the API model id).
        sample_rate: Mimi's sample rate, Hz (24000).
        num_codebooks: Mimi codebooks (32).
        speakers: speaker labels the checkpoint was trained on ("0", "1").
        max_seq_len: frames the backbone attends to (prompt + generated).
    """

    model_id: str
    sample_rate: int
    num_codebooks: int
    speakers: list[str]
    max_seq_len: int
    uses_history: bool = True
    modes: tuple[str, ...] = ("converse", "tts")
    voices_authored_turns: bool = False
    description: str = (
        "Conversational speech model (Sesame CSM architecture): voices the open turn "
        "conditioned on every earlier turn's text and audio, so it continues the "
        "voices and rhythm of the conversation; a clip in an earlier turn sets a "
        "speaker's voice."
    )

    @property
    def voices(self) -> list[str]:
        """None: CSM voices turns in context, not by name."""
        return []

    def param_rules(self) -> Sequence[ParamRule]:
        """The kalpa-converse sampling ``params`` with the reference CSM defaults.

        Defaults: temperature 0.7, top-k 50, repetition penalty 3.0 over a
        20-frame window of codebook 0, 512 new frames, every codebook.
        """
        return (
            ParamRule("temperature", "temperature", float, 0.0, 2.0, 0.7),
            ParamRule("depth_temperature", "depth_temperature", float, 0.0, 2.0, None),
            ParamRule("top_k", "top_k", int, 1, 2051, 50),
            ParamRule("repetition_penalty", "repetition_penalty", float, 1.0, 10.0, 3.0),
            ParamRule("penalty_window", "penalty_window", int, 1, 2048, 20, "frames"),
            ParamRule("max_new_frames", "max_new_tokens", int, 16, 2048, 512, "frames"),
            ParamRule(
                "num_codebooks", "quantizers", int, 1, self.num_codebooks, self.num_codebooks
            ),
            ParamRule("seed", "seed", int, 0, 2**63 - 1, None),
        )

    def check_params(self, values: Mapping[str, ParamValue]) -> CsmParams:
        """:class:`CsmParams` from checked values.

        Raises:
            InvalidRequest: ``max_new_frames`` leaves no room for a prompt in ``max_seq_len``.
        """
        params = CsmParams(**values)  # type: ignore[arg-type]
        if params.max_new_frames >= self.max_seq_len:
            raise InvalidRequest(
                f"params.max_new_tokens must be below {self.model_id!r}'s sequence length "
                f"{self.max_seq_len} frames"
            )
        return params

    def stream(
        self,
        triton: TritonClient,
        history: Sequence[TurnInContext],
        open_turn: TurnInContext,
        params: CsmParams,
    ) -> VoiceStream:
        """Voice the open turn with every history turn a prompt segment; one chunk.

        The generator runs the whole turn in one Triton call, so the stream has
        a single chunk. History audio is resampled to ``sample_rate``; a warning
        says how many of the oldest turns were left out when the conversation
        does not fit.

        Iterating raises InvalidRequest (the open turn alone does not fit),
        ServiceUnavailable or InferenceError (from Triton, or audio with NaN or
        infinite samples).
        """
        warnings: list[str] = []

        def segments() -> list[Segment]:
            return [
                Segment(
                    turn.speaker,
                    " ".join(turn.text.split()),
                    None
                    if turn.audio is None
                    else resample(turn.audio, turn.sample_rate, self.sample_rate),
                )
                for turn in [*history, open_turn]
            ]

        async def chunks() -> AsyncGenerator[np.ndarray, None]:
            # Resampling minutes of history audio takes a while: off the event loop.
            result = await self.generate(
                triton, await anyio.to_thread.run_sync(segments), params
            )
            if result.dropped_turns:
                warnings.append(
                    f"the conversation is longer than {self.model_id!r} can attend to "
                    f"({self.max_seq_len} frames with max_new_tokens {params.max_new_frames}): "
                    f"the {result.dropped_turns} oldest turn(s) were left out of the prompt"
                )
            yield result.audio

        return VoiceStream(chunks(), params.num_codebooks, warnings)

    async def generate(
        self, triton: TritonClient, segments: list[Segment], params: CsmParams
    ) -> CsmResult:
        """Voice the last segment's text conditioned on every earlier segment.

        Raises:
            InvalidRequest: the open turn alone does not fit in ``max_seq_len``
                with ``params.max_new_frames`` frames left for generation.
            ServiceUnavailable, InferenceError: from Triton.
            InferenceError: NaN or infinite samples (:func:`model_audio`).
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
            "MAX_NEW_FRAMES": np.array([params.max_new_frames], np.int32),
            "TEMPERATURE": np.array([params.temperature], np.float32),
            "DEPTH_TEMPERATURE": np.array([depth_temperature], np.float32),
            "TOP_K": np.array([params.top_k], np.int32),
            "REPETITION_PENALTY": np.array([params.repetition_penalty], np.float32),
            "PENALTY_WINDOW": np.array([params.penalty_window], np.int32),
            "SEED": np.array([seed], np.int64),
            "NUM_QUANTIZERS": np.array([params.num_codebooks], np.int64),
        }
        try:
            outputs = await triton.infer(
                self.model_id, inputs, ["AUDIO", "AUDIO_CODES", "DROPPED_SEGMENTS"]
            )
        except InferenceError as error:
            message = error.detail
            if PROMPT_TOO_LONG in message:
                detail = message.split(PROMPT_TOO_LONG, 1)[1].strip()
                raise InvalidRequest(
                    f"the open turn does not fit: {detail}", turn_index=len(segments) - 1
                ) from error
            raise
        return CsmResult(
            audio=model_audio(self.model_id, outputs["AUDIO"]),
            frames=int(outputs["AUDIO_CODES"].shape[-1]),
            dropped_turns=int(outputs["DROPPED_SEGMENTS"].reshape(-1)[0]),
        )
