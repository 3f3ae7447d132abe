"""The model catalogue: which API models exist, read from what Triton serves.

A Triton model whose config carries ``parameters.family`` is an API model; its
family picks the adapter. The list is cached for ``models_cache_s`` seconds so
that requests do not each ask Triton for its repository index.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from handler.errors import ApiError
from handler.models.csm import CsmModel
from handler.models.kokoro import KokoroModel, VoiceSpecError, parse_voice_spec
from handler.settings import Settings
from handler.triton import TritonClient


class ConfigurationError(ApiError):
    """500: the service's own configuration does not fit what Triton serves."""


@dataclass(frozen=True)
class ServedModel:
    """One entry of ``GET /v1/models`` plus the adapter that serves it.

    ``num_quantizers`` is the codec's codebook count for codec models and None
    for models without a codec (Kokoro). ``transcribes`` says whether the
    Whisper ASR model is served next to it (spoken history gets transcripts).
    """

    id: str
    display_name: str
    description: str
    modes: list[str]
    speakers: list[str]
    sample_rate: int
    num_quantizers: int | None
    voices: list[str]
    adapter: KokoroModel | CsmModel
    default: bool = False
    transcribes: bool = False

    def public(self) -> dict[str, Any]:
        """The JSON object ``GET /v1/models`` lists."""
        return {
            "id": self.id,
            "display_name": self.display_name,
            "description": self.description,
            "modes": self.modes,
            "speakers": self.speakers,
            "default": self.default,
            "sample_rate": self.sample_rate,
            "num_quantizers": self.num_quantizers,
            "voices": self.voices,
        }


def _parameter(config: dict[str, Any], key: str) -> str:
    return str(config.get("parameters", {}).get(key, {}).get("string_value", ""))


def _kokoro_entry(
    name: str, config: dict[str, Any], settings: Settings, families: set[str]
) -> ServedModel:
    voices = frozenset(v for v in _parameter(config, "voices").split(",") if v)
    low, high = (float(x) for x in _parameter(config, "speed_range").split(","))
    try:
        speaker_voices = tuple(parse_voice_spec(v, voices) for v in settings.speaker_voices)
    except VoiceSpecError as error:
        raise ConfigurationError(f"CONVERSE_KOKORO_SPEAKER_VOICES: {error}") from error
    adapter = KokoroModel(
        voices=voices,
        sample_rate=int(_parameter(config, "sample_rate")),
        speed_range=(low, high),
        speaker_voices=speaker_voices,
    )
    return ServedModel(
        id=name,
        display_name=_parameter(config, "display_name") or name,
        description=(
            "Neural TTS with style-vector voices and voice blends (name*weight+...). "
            "Voices each turn on its own: no context, no voice cloning; the bundled "
            "voices were trained on Japanese and speak English with an accent."
        ),
        modes=["tts", "converse", "author"] if families >= _AUTHORING else ["tts", "converse"],
        speakers=adapter.speakers,
        sample_rate=adapter.sample_rate,
        num_quantizers=None,
        voices=sorted(voices),
        adapter=adapter,
        default=name == settings.default_model,
        transcribes="asr" in families,
    )


def _csm_entry(
    name: str, config: dict[str, Any], settings: Settings, families: set[str]
) -> ServedModel:
    adapter = CsmModel(
        name=name,
        sample_rate=int(_parameter(config, "sample_rate")),
        num_quantizers=int(_parameter(config, "num_quantizers")),
        speakers=_parameter(config, "speakers").split(","),
        max_seq_len=int(_parameter(config, "max_seq_len")),
    )
    return ServedModel(
        id=name,
        display_name=_parameter(config, "display_name") or name,
        description=(
            "Conversational speech model (Sesame CSM architecture): voices the open turn "
            "conditioned on every earlier turn's text and audio, so it continues the "
            "voices and rhythm of the conversation; a clip in an earlier turn sets a "
            "speaker's voice."
        ),
        modes=["converse", "tts"],
        speakers=adapter.speakers,
        sample_rate=adapter.sample_rate,
        num_quantizers=adapter.num_quantizers,
        voices=[],
        adapter=adapter,
        default=name == settings.default_model,
        transcribes="asr" in families,
    )


# The author LM writes turns that a voice model then speaks; ASR transcribes
# spoken history for its prompt.
_AUTHORING = {"author", "asr"}
_FAMILIES = {"kokoro": _kokoro_entry, "csm": _csm_entry}


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
                build = _FAMILIES.get(_parameter(config, "family"))
                if build is not None:
                    models[name] = build(name, config, self.settings, families)
            self._models, self._fetched_at = models, now
        return self._models
