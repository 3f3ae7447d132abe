"""The voice-engine interface, and the one place a generation parameter's rules live.

A voice engine turns the open turn of a conversation into audio; the converse
service only orchestrates (validate, transcribe, author, call the engine,
deliver). Adding an engine is one module that implements :class:`VoiceEngine`
and one line in :mod:`handler.engines.catalog`.

Parameters are named in the field's terms inside engines (``max_new_frames``,
``num_codebooks``) and carry the kalpa-converse ``params`` name they are sent
under (``max_new_tokens``, ``quantizers``) in :attr:`ParamRule.wire`; the
mapping happens only here, at the schema boundary.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from handler.audio import NonFiniteAudioError, require_finite
from handler.errors import InferenceError, InvalidRequest, ValidationItem
from handler.triton import TritonClient

ParamValue = float | int | None


def model_audio(model_id: str, audio: np.ndarray) -> np.ndarray:
    """A model's ``AUDIO`` output as float32 mono, shape [n_samples], every sample finite.

    Raises:
        InferenceError: a sample is NaN or infinite (it would level the whole turn
            to silence, and abort LAME inside the MP3 encoder).
    """
    samples = np.asarray(audio, dtype=np.float32).reshape(-1)
    try:
        require_finite(samples)
    except NonFiniteAudioError as error:
        raise InferenceError(
            f"model {model_id!r} returned invalid audio (NaN or infinite samples)",
            detail=f"model {model_id!r} AUDIO: {error}",
        ) from error
    return samples


def is_speakable(text: str) -> bool:
    """Whether ``text`` has something to say: a letter or digit in any script.

    Kokoro fails on some texts without one ("**", "-", an emoji): Triton
    answers INTERNAL.
    """
    return any(character.isalnum() for character in text)


@dataclass(frozen=True)
class ParamRule:
    """How one generation parameter is checked and defaulted by one engine.

    Attributes:
        name: the engine's own name for it, in the field's terms (e.g. ``max_new_frames``).
        wire: the kalpa-converse ``params`` key it arrives under (e.g. ``max_new_tokens``).
        kind: ``int`` or ``float``.
        low: smallest accepted value (inclusive).
        high: largest accepted value (inclusive).
        default: value used when the request leaves it unset (None: the engine decides).
        unit: what one unit of the value is, for error messages ("frames", "").
    """

    name: str
    wire: str
    kind: type[int] | type[float]
    low: float
    high: float
    default: ParamValue
    unit: str = ""

    def take(self, given: Mapping[str, Any], model_id: str) -> ParamValue:
        """The value for this parameter from the request's ``params`` (or the default).

        Raises:
            InvalidRequest: the value is outside ``[low, high]``, naming ``params.<wire>``.
        """
        value = given.get(self.wire, self.default)
        if value is None:
            return None
        value = self.kind(value)
        if not self.low <= value <= self.high:
            unit = f" {self.unit}" if self.unit else ""
            message = (
                f"params.{self.wire} must be within [{self.low:g}, {self.high:g}]{unit} "
                f"for {model_id!r}"
            )
            raise InvalidRequest(
                message, validation=[ValidationItem(["params", self.wire], message)]
            )
        return value


def take_params(
    rules: Sequence[ParamRule], given: Mapping[str, Any], model_id: str
) -> dict[str, ParamValue]:
    """Check the request's ``params`` (wire names) against ``rules``; values by engine name.

    Raises:
        InvalidRequest: a parameter no rule accepts (listing the supported ones), or
            one outside its rule's range.
    """
    supported = {rule.wire for rule in rules}
    unsupported = sorted(set(given) - supported)
    if unsupported:
        raise InvalidRequest(
            f"params {', '.join(unsupported)} not supported by model {model_id!r} for this "
            f"request (supported: {', '.join(sorted(supported))})"
        )
    return {rule.name: rule.take(given, model_id) for rule in rules}


@dataclass(frozen=True)
class TurnInContext:
    """One turn as an engine sees it.

    Attributes:
        speaker: the model's speaker label.
        text: the turn's text, or its transcript, or '' when neither is known.
        audio: float32 [n] mono samples in -1..1 at ``sample_rate`` Hz, or None.
        sample_rate: Hz of ``audio`` (0 when there is no audio).
    """

    speaker: str
    text: str
    audio: np.ndarray | None = None
    sample_rate: int = 0


@dataclass(frozen=True)
class VoicedTurn:
    """An engine's whole answer for the open turn (a :class:`VoiceStream` drained).

    Attributes:
        audio: float32 [n] mono samples in -1..1 at the engine's ``sample_rate``.
        num_codebooks: codec codebooks the audio was decoded from (None without a codec).
        warnings: what the caller should know (e.g. history left out of the prompt).
    """

    audio: np.ndarray
    num_codebooks: int | None
    warnings: list[str]


@dataclass(frozen=True)
class VoiceStream:
    """The open turn being voiced: its audio in order, each chunk as soon as it is ready.

    Nothing runs until ``chunks`` is iterated. Closing it (``aclose()``, or
    cancelling the task that iterates it) cancels the synthesis still running,
    and with it the Triton calls.

    Attributes:
        chunks: float32 [n] mono chunks in -1..1 at the engine's ``sample_rate``;
            concatenated they are exactly the turn's audio.
        num_codebooks: codec codebooks the audio is decoded from (None without a codec).
        warnings: what the caller should know; complete once ``chunks`` is
            exhausted (an engine may learn one while voicing).
    """

    chunks: AsyncGenerator[np.ndarray, None]
    num_codebooks: int | None
    warnings: list[str]

    async def drain(self) -> VoicedTurn:
        """Every chunk, concatenated: the whole turn (the non-streaming answer).

        Raises:
            InvalidRequest, ServiceUnavailable, InferenceError: from the engine.
        """
        chunks = [chunk async for chunk in self.chunks]
        audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        return VoicedTurn(audio, self.num_codebooks, self.warnings)


class VoiceEngine(Protocol):
    """What every served voice model implements (frozen dataclasses satisfy it)."""

    @property
    def model_id(self) -> str:
        """The API model id (the Triton model it calls)."""
        ...

    @property
    def sample_rate(self) -> int:
        """Output sample rate, Hz."""
        ...

    @property
    def speakers(self) -> list[str]:
        """Speaker labels the model was trained on ("0", "1", ...)."""
        ...

    @property
    def num_codebooks(self) -> int | None:
        """Codec codebooks (None for models without a codec)."""
        ...

    @property
    def voices(self) -> list[str]:
        """Named voices a dialogue turn may pick (empty: it voices only in context)."""
        ...

    @property
    def uses_history(self) -> bool:
        """Whether earlier turns condition the voicing (transcripts are then worth making)."""
        ...

    @property
    def modes(self) -> tuple[str, ...]:
        """kalpa-converse modes it serves on its own ("tts", "converse")."""
        ...

    @property
    def voices_authored_turns(self) -> bool:
        """Whether it is offered with the author LM (the catalogue adds the "author" mode)."""
        ...

    @property
    def description(self) -> str:
        """One paragraph for ``GET /v1/models``."""
        ...

    def param_rules(self) -> Sequence[ParamRule]:
        """The rules of every ``params`` key this engine takes when voicing."""
        ...

    def check_params(self, values: Mapping[str, ParamValue]) -> object:
        """Engine parameters from values already checked by :meth:`param_rules`.

        Raises:
            InvalidRequest: a combination the engine cannot serve.
        """
        ...

    def stream(
        self,
        triton: TritonClient,
        history: Sequence[TurnInContext],
        open_turn: TurnInContext,
        params: Any,
    ) -> VoiceStream:
        """Voice ``open_turn.text`` as ``open_turn.speaker`` after ``history``, chunk by chunk.

        ``params`` is what :meth:`check_params` returned. Iterating the chunks raises
        InvalidRequest (the turn cannot be voiced as asked, e.g. does not fit),
        ServiceUnavailable or InferenceError (from Triton).
        """
        ...
