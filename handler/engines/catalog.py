"""The model catalogue: which API models exist, read from what Triton serves.

A Triton model whose config carries ``parameters.family`` is an API model; its
family picks the voice engine (one builder per family in
``_FAMILIES``). The list is cached for ``models_cache_s`` seconds so
that requests do not each ask Triton for its repository index.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from handler.engines.base import VoiceEngine
from handler.engines.csm import CsmEngine
from handler.engines.kokoro import KokoroEngine, VoiceSpecError, parse_voice_spec
from handler.errors import ApiError, InvalidRequest, ValidationItem
from handler.settings import Settings
from handler.triton import TritonClient


class ConfigurationError(ApiError):
    """500: the service's own configuration does not fit what Triton serves."""


@dataclass(frozen=True)
class ServedModel:
    """One entry of ``GET /v1/models``: its id, modes and the engine that voices it.

    ``transcribes`` says whether the Whisper ASR model is served next to it
    (spoken history then gets transcripts).
    """

    id: str
    display_name: str
    modes: list[str]
    engine: VoiceEngine
    default: bool = False
    transcribes: bool = False

    def public(self) -> dict[str, Any]:
        """The JSON object ``GET /v1/models`` lists (codebooks under the spec's name)."""
        return {
            "id": self.id,
            "display_name": self.display_name,
            "description": self.engine.description,
            "modes": self.modes,
            "speakers": self.engine.speakers,
            "default": self.default,
            "sample_rate": self.engine.sample_rate,
            "num_quantizers": self.engine.num_codebooks,
            "voices": self.engine.voices,
        }


def _parameter(config: dict[str, Any], key: str) -> str:
    return str(config.get("parameters", {}).get(key, {}).get("string_value", ""))


def _kokoro_engine(name: str, config: dict[str, Any], settings: Settings) -> KokoroEngine:
    voices = frozenset(v for v in _parameter(config, "voices").split(",") if v)
    low, high = (float(x) for x in _parameter(config, "speed_range").split(","))
    try:
        speaker_voices = tuple(parse_voice_spec(v, voices) for v in settings.speaker_voices)
    except VoiceSpecError as error:
        raise ConfigurationError(f"CONVERSE_KOKORO_SPEAKER_VOICES: {error}") from error
    return KokoroEngine(
        model_id=name,
        voice_names=voices,
        sample_rate=int(_parameter(config, "sample_rate")),
        speed_range=(low, high),
        speaker_voices=speaker_voices,
        pause_ms=settings.sentence_pause_ms,
    )


def _csm_engine(name: str, config: dict[str, Any], settings: Settings) -> CsmEngine:
    return CsmEngine(
        model_id=name,
        sample_rate=int(_parameter(config, "sample_rate")),
        num_codebooks=int(_parameter(config, "num_quantizers")),
        speakers=_parameter(config, "speakers").split(","),
        max_seq_len=int(_parameter(config, "max_seq_len")),
    )


# The author LM writes turns that a voice model then speaks; ASR transcribes
# spoken history for its prompt.
_AUTHORING = {"author", "asr"}
_FAMILIES: dict[str, Callable[[str, dict[str, Any], Settings], VoiceEngine]] = {
    "kokoro": _kokoro_engine,
    "csm": _csm_engine,
}


@dataclass
class ModelCatalog:
    """Cached view of the API models Triton serves."""

    settings: Settings
    triton: TritonClient
    _models: dict[str, ServedModel] = field(default_factory=dict)
    _fetched_at: float = -1.0

    async def models(self) -> dict[str, ServedModel]:
        """API models by id, refreshed from Triton after ``models_cache_s``.

        Raises:
            ServiceUnavailable: Triton unreachable.
            ConfigurationError: a speaker voice setting names an unknown voice.
        """
        now = time.monotonic()
        if self._fetched_at < 0 or now - self._fetched_at > self.settings.models_cache_s:
            configs = await self.triton.ready_models()
            families = {_parameter(config, "family") for config in configs.values()}
            models = {}
            for name, config in configs.items():
                family = _parameter(config, "family")
                build = _FAMILIES.get(family)
                if build is None:
                    continue
                engine = build(name, config, self.settings)
                authors = engine.voices_authored_turns and families >= _AUTHORING
                models[name] = ServedModel(
                    id=name,
                    display_name=_parameter(config, "display_name") or name,
                    modes=[*engine.modes, "author"] if authors else list(engine.modes),
                    engine=engine,
                    default=name == self.settings.default_model,
                    transcribes="asr" in families,
                )
            self._models, self._fetched_at = models, now
        return self._models

    async def resolve(
        self, model_id: str | None, path: list[str], turn_index: int | None = None
    ) -> ServedModel:
        """The served model named ``model_id`` (the default model when None).

        Raises:
            InvalidRequest: unknown model id (code ``unknown_model``), naming ``path``.
            ServiceUnavailable: Triton unreachable.
        """
        models = await self.models()
        wanted = model_id or self.settings.default_model
        if wanted not in models:
            message = f"unknown model {wanted!r}; available: {', '.join(sorted(models)) or 'none'}"
            raise InvalidRequest(
                message,
                code="unknown_model",
                turn_index=turn_index,
                validation=[ValidationItem(path, message)],
            )
        return models[wanted]

    async def resolve_named_voices(
        self, model_id: str | None, path: list[str], turn_index: int | None = None
    ) -> tuple[ServedModel, KokoroEngine]:
        """The served model named ``model_id`` and its engine, which must have named voices.

        Raises:
            InvalidRequest: unknown model, or one that voices turns only in context (CSM),
                naming ``path``.
            ServiceUnavailable: Triton unreachable.
        """
        model = await self.resolve(model_id, path, turn_index)
        if isinstance(model.engine, KokoroEngine):
            return model, model.engine
        message = (
            f"model {model.id!r} has no named voices; it voices turns in context through "
            "POST /v1/converse"
        )
        raise InvalidRequest(
            message, turn_index=turn_index, validation=[ValidationItem(path, message)]
        )
