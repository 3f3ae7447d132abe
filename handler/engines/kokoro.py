"""Kokoro-82M engine: voice specs, text splitting and synthesis through its Triton ensemble.

Kokoro has no codec (``num_codebooks`` is None), no sampling parameters and no
context: each turn is voiced on its own with the voice bound to its speaker
label, and history audio (spoken turns, reference clips) is not heard, which
the answer's ``warnings`` say. Text is split into sentences, and a sentence
longer than ``MAX_PIECE_CHARS`` characters into pieces, so each ensemble call
stays inside the model's 510 phoneme-token window. Pieces stream out in order,
each as soon as it is voiced, with ``lookahead`` pieces synthesised at a time
(the non-streaming answer is the same stream concatenated). With ``pause_ms``
> 0 every sentence is voiced on its own and sentences are joined with that
much silence; with 0, consecutive sentences share one call while they fit
(Kokoro's own sentence prosody, which Whisper reads back better: 8.8 % against
12.3 % WER for jf_alpha on the spec sentences).
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from decimal import Decimal

import numpy as np

from handler.audio import ms_to_samples, silence, trim_silence
from handler.engines.base import (
    ParamRule,
    ParamValue,
    TurnInContext,
    VoiceStream,
    is_speakable,
    model_audio,
)
from handler.errors import InferenceError
from handler.triton import TritonClient

# English phoneme strings run close to one symbol per letter; 240 characters
# leaves headroom under 510 tokens for digits and abbreviations, which expand.
MAX_PIECE_CHARS = 240
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")
_CLAUSE_END = re.compile(r"(?<=[,;:—–])\s+")
_WORD_GAP = re.compile(r"\s+")
# The frontend's error for a piece whose phonemes exceed the network's 510 tokens.
TOO_MANY_TOKENS = "too_many_tokens:"
_VOICE_TERM = re.compile(r"^\s*([A-Za-z0-9_]+)\s*(?:\*\s*([0-9]*\.?[0-9]+)\s*)?$")


class VoiceSpecError(ValueError):
    """A voice or blend spec that names unknown voices or has bad weights."""


def _weight_text(weight: float) -> str:
    """``weight`` to 6 significant digits in plain decimal notation (``1e-07`` -> ``0.0000001``).

    A canonical spec is parsed again on every use, and ``_VOICE_TERM`` has no exponents.
    """
    return format(Decimal(f"{weight:.6g}"), "f")


def parse_voice_spec(spec: str, voices: frozenset[str]) -> str:
    """Validate a voice or blend and return its canonical form for the frontend.

    ``"jf_alpha"`` -> ``"jf_alpha*1"``; ``"jf_alpha*0.5+jm_kumo*1.5"`` ->
    ``"jf_alpha*0.25+jm_kumo*0.75"`` (weights normalised to sum to 1, as in
    kokoro-onnx's blends, so a blend keeps the level of a single voice; each
    written to 6 significant digits without an exponent, so the canonical form
    is itself a valid spec).

    Raises:
        VoiceSpecError: empty spec, unknown voice, repeated voice, a weight <= 0
            or too large for a float, or a weight whose share of the blend is
            too small to represent.
    """
    terms = spec.split("+")
    weights: dict[str, float] = {}
    for term in terms:
        match = _VOICE_TERM.match(term)
        if match is None:
            raise VoiceSpecError(f"bad voice term {term!r}; use name or name*weight")
        name, weight_text = match.group(1), match.group(2)
        if name not in voices:
            raise VoiceSpecError(f"unknown voice {name!r}; available: {', '.join(sorted(voices))}")
        if name in weights:
            raise VoiceSpecError(f"voice {name!r} appears twice in the blend")
        weight = float(weight_text) if weight_text is not None else 1.0
        if weight <= 0:
            raise VoiceSpecError(f"weight of {name!r} must be > 0")
        if not math.isfinite(weight):
            raise VoiceSpecError(f"weight of {name!r} is too large")
        weights[name] = weight
    total = sum(weights.values())
    if not math.isfinite(total):
        raise VoiceSpecError("blend weights are too large")
    shares = {name: weight / total for name, weight in weights.items()}
    for name, share in shares.items():
        # Underflow: a saved 0 would be refused (weight <= 0) on every later use.
        if share == 0.0:
            raise VoiceSpecError(f"weight of {name!r} is too small next to the others")
    return "+".join(f"{name}*{_weight_text(share)}" for name, share in shares.items())


def _split_long(piece: str, limit: int) -> list[str]:
    if len(piece) <= limit:
        return [piece]
    parts: list[str] = []
    current = ""
    for clause in _CLAUSE_END.split(piece):
        for word in clause.split(" ") if len(clause) > limit else [clause]:
            candidate = f"{current} {word}".strip()
            if len(candidate) <= limit:
                current = candidate
                continue
            if current:
                parts.append(current)
            # A single word longer than the limit is cut; real words never are.
            while len(word) > limit:
                parts.append(word[:limit])
                word = word[limit:]
            current = word
    if current:
        parts.append(current)
    return parts


def halves(text: str) -> tuple[str, str] | None:
    """``text`` cut in two at the boundary nearest its middle, None for a single word.

    A sentence end is preferred, then a clause end, then any space; both parts
    are stripped and non-empty.
    """
    stripped = text.strip()
    for boundary in (_SENTENCE_END, _CLAUSE_END, _WORD_GAP):
        cuts = list(boundary.finditer(stripped))
        if cuts:
            cut = min(cuts, key=lambda match: abs(match.start() - len(stripped) / 2))
            return stripped[: cut.start()], stripped[cut.end() :]
    return None


def sentence_pieces(text: str, limit: int = MAX_PIECE_CHARS) -> list[list[str]]:
    """The text's sentences, each as the pieces of at most ``limit`` chars it is voiced in.

    A sentence ends at ``.``, ``!``, ``?`` or ``…`` followed by whitespace; a
    sentence longer than ``limit`` is split at clause punctuation, then between
    words. Whitespace-only input gives ``[]``.
    """
    sentences = (sentence.strip() for sentence in _SENTENCE_END.split(text.strip()))
    return [_split_long(sentence, limit) for sentence in sentences if sentence]


def packed_pieces(sentences: list[list[str]], limit: int = MAX_PIECE_CHARS) -> list[str]:
    """Consecutive pieces of :func:`sentence_pieces` merged while they fit in ``limit`` chars."""
    packed: list[str] = []
    current = ""
    for piece in (piece for pieces in sentences for piece in pieces):
        candidate = f"{current} {piece}".strip()
        if len(candidate) <= limit:
            current = candidate
        else:
            packed.append(current)
            current = piece
    if current:
        packed.append(current)
    return [piece for piece in packed if piece]


@dataclass(frozen=True)
class KokoroParams:
    """Voicing parameters of one request: ``speed`` is a speaking-rate multiplier."""

    speed: float = 1.0


@dataclass(frozen=True)
class KokoroEngine:
    """A served Kokoro ensemble, described by its Triton config parameters.

    Implements :class:`handler.engines.base.VoiceEngine`.

    Attributes:
        model_id: the ensemble's Triton model name (the API model id).
        voice_names: voice pack names the frontend holds.
        sample_rate: output sample rate, Hz (24000).
        speed_range: inclusive (min, max) speaking-rate multiplier.
        speaker_voices: canonical voice spec per speaker label "0", "1", ...
        pause_ms: silence between the sentences of one turn, milliseconds.
        lookahead: pieces synthesised at a time by one stream (the one being
            delivered included): 2 keeps both ``kokoro_network`` instances of the
            local repository busy without running ahead of a listener or a
            cancellation (docs/PERFORMANCE.md).
    """

    model_id: str
    voice_names: frozenset[str]
    sample_rate: int
    speed_range: tuple[float, float]
    speaker_voices: tuple[str, ...]
    pause_ms: int
    lookahead: int = 2
    num_codebooks: None = None
    uses_history: bool = False
    modes: tuple[str, ...] = ("tts", "converse")
    voices_authored_turns: bool = True
    description: str = (
        "Neural TTS with style-vector voices and voice blends (name*weight+...). "
        "Voices each turn on its own: no context, no voice cloning; the bundled "
        "voices were trained on Japanese and speak English with an accent."
    )

    @property
    def speakers(self) -> list[str]:
        """Advertised speaker labels."""
        return [str(i) for i in range(len(self.speaker_voices))]

    @property
    def voices(self) -> list[str]:
        """Voice pack names, sorted."""
        return sorted(self.voice_names)

    def param_rules(self) -> Sequence[ParamRule]:
        """``speed`` within the served model's ``speed_range`` (default 1.0)."""
        low, high = self.speed_range
        return (ParamRule("speed", "speed", float, low, high, 1.0),)

    def check_params(self, values: Mapping[str, ParamValue]) -> KokoroParams:
        """:class:`KokoroParams` from checked values."""
        return KokoroParams(**values)  # type: ignore[arg-type]

    def parse_voice(self, spec: str) -> str:
        """The canonical form of a voice or blend of this model's voices.

        Raises:
            VoiceSpecError: see :func:`parse_voice_spec`.
        """
        return parse_voice_spec(spec, self.voice_names)

    def stream(
        self,
        triton: TritonClient,
        history: Sequence[TurnInContext],
        open_turn: TurnInContext,
        params: KokoroParams,
    ) -> VoiceStream:
        """Voice the open turn on its own with the voice bound to its speaker label.

        History does not change the voice (Kokoro has no context); history turns
        that carry audio get a warning saying their audio was not used. Chunks
        are those of :meth:`stream_texts`.
        """
        voice = self.speaker_voices[int(open_turn.speaker)]
        unheard = [str(index) for index, turn in enumerate(history) if turn.audio is not None]
        warnings = []
        if unheard:
            warnings.append(
                f"model {self.model_id!r} voices each turn on its own: the audio of conversation "
                f"turn(s) {', '.join(unheard)} (spoken history or a reference voice) was not "
                f"used; the reply has speaker {open_turn.speaker!r}'s bundled voice"
            )
        chunks = self.stream_texts(triton, [open_turn.text], voice, params.speed)
        return VoiceStream(chunks, None, warnings)

    async def synthesize(
        self, triton: TritonClient, text: str, voice: str, speed: float
    ) -> np.ndarray:
        """Voice ``text`` with a canonical voice spec; float32 mono at ``sample_rate``.

        The chunks of :meth:`stream_texts` for ``[text]``, concatenated: 0
        samples when the text has nothing to say (no letter or digit).

        Raises:
            ServiceUnavailable, InferenceError: from the Triton client, or
                InferenceError for audio with NaN or infinite samples.
        """
        chunks = [chunk async for chunk in self.stream_texts(triton, [text], voice, speed)]
        return np.concatenate(chunks) if chunks else silence(0)

    def _units(self, text: str) -> list[list[str]]:
        """The pieces of ``text`` grouped by sentence (one group when ``pause_ms`` is 0).

        Pieces with nothing to say (:func:`is_speakable`: "**", "-", an emoji
        alone), which the model fails on, are left out.
        """
        split = (
            [piece for piece in pieces if is_speakable(piece)] for pieces in sentence_pieces(text)
        )
        sentences = [pieces for pieces in split if pieces]
        return [packed_pieces(sentences)] if sentences and not self.pause_ms else sentences

    async def stream_texts(
        self,
        triton: TritonClient,
        texts: Iterable[str] | AsyncIterable[str],
        voice: str,
        speed: float,
    ) -> AsyncGenerator[np.ndarray, None]:
        """Voice text pieces as they come (e.g. clauses an LM is writing), in order.

        Each text is split as :func:`sentence_pieces` does (with ``pause_ms`` 0
        its sentences are packed into shared calls, :func:`packed_pieces`), and
        pieces with nothing to say are left out, so such a text yields no chunk;
        every piece is one Triton call and one chunk: float32 mono at ``sample_rate``,
        trimmed of edge silence (threshold 0.01, 30 ms kept), preceded by
        ``pause_ms`` of silence when it starts a sentence other than the first
        (each text starts a new sentence). At most :attr:`lookahead` pieces are
        synthesised or waiting to be taken at a time; a piece is submitted as
        soon as its text has arrived and a place is free.

        Closing the iterator (``aclose()``, or cancelling the task iterating it)
        cancels every call still running and stops reading ``texts``.

        Raises:
            ServiceUnavailable, InferenceError: from the Triton client, or
                InferenceError for a piece whose audio has NaN or infinite samples.
            Exception: whatever iterating ``texts`` raised.
        """
        places = asyncio.Semaphore(self.lookahead)
        ready: asyncio.Queue[tuple[bool, asyncio.Task[np.ndarray]] | BaseException | None] = (
            asyncio.Queue()
        )
        started: list[asyncio.Task[np.ndarray]] = []

        async def submit() -> None:
            first = True
            try:
                async for text in _each(texts):
                    for sentence in self._units(text):
                        for position, piece in enumerate(sentence):
                            await places.acquire()
                            call = self._synthesize_piece(triton, piece, voice, speed)
                            started.append(asyncio.ensure_future(call))
                            ready.put_nowait((position == 0 and not first, started[-1]))
                            first = False
            except Exception as error:  # handed to the reader, which raises it
                ready.put_nowait(error)
            else:
                ready.put_nowait(None)

        submitter = asyncio.ensure_future(submit())
        gap = silence(ms_to_samples(self.pause_ms, self.sample_rate))
        try:
            while (item := await ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                starts_sentence, call = item
                audio = trim_silence(await call, self.sample_rate)
                places.release()
                yield np.concatenate([gap, audio]) if starts_sentence else audio
        finally:
            for task in (submitter, *started):
                task.cancel()
            await asyncio.gather(submitter, *started, return_exceptions=True)

    async def _synthesize_piece(
        self, triton: TritonClient, text: str, voice: str, speed: float
    ) -> np.ndarray:
        """One Triton call: float32 mono [n] at ``sample_rate``, every sample finite.

        Digits, amounts and abbreviations expand to several phonemes per
        character, so a piece within :data:`MAX_PIECE_CHARS` can still exceed the
        network's 510 tokens; the frontend then refuses it (``too_many_tokens:``)
        and the piece is voiced in two calls, cut by :func:`halves` (again if
        needed), their audio joined.

        Raises:
            ServiceUnavailable, InferenceError: from the Triton client (a single
                word over the token limit included).
            InferenceError: NaN or infinite samples (:func:`model_audio`).
        """
        try:
            outputs = await triton.infer(
                self.model_id,
                {
                    "TEXT": np.array([text.encode("utf-8")], dtype=np.object_),
                    "VOICE": np.array([voice.encode("utf-8")], dtype=np.object_),
                    "SPEED": np.array([speed], dtype=np.float32),
                },
                ["AUDIO"],
            )
        except InferenceError as error:
            parts = halves(text) if TOO_MANY_TOKENS in error.detail else None
            if parts is None:
                raise
            voiced = [
                await self._synthesize_piece(triton, part, voice, speed)
                for part in parts
                if is_speakable(part)
            ]
            return np.concatenate(voiced) if voiced else silence(0)
        return model_audio(self.model_id, outputs["AUDIO"])


async def _each(texts: Iterable[str] | AsyncIterable[str]) -> AsyncIterator[str]:
    """``texts`` as an async iterator, whichever kind it is."""
    if isinstance(texts, AsyncIterable):
        async for text in texts:
            yield text
    else:
        for text in texts:
            yield text
