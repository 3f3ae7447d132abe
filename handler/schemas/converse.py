"""``POST /v1/converse`` and ``GET /v1/models`` shapes (kalpa-converse.md).

Field caps here are the spec's own (64 turns, 8,000 characters per turn); the
25 MiB decoded-audio cap is checked on the base64 length first (4 characters
per 3 bytes) and again after decoding, in the service.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from handler.schemas import REQUEST_CONFIG
from handler.settings import MIB

MAX_TURNS = 64
MAX_TURN_CHARS = 8000
MAX_TURN_AUDIO_BYTES = 25 * MIB
# base64 of 25 MiB wrapped into 76-character lines with CRLF (RFC 2045, section 6.8: what
# MIME encoders write), plus room for a "data:audio/wav;base64," prefix. The exact
# 25 MiB cap is checked on the decoded size (handler.services.turn_input).
MAX_AUDIO_B64_CHARS = (MAX_TURN_AUDIO_BYTES + 2) // 3 * 4 * 78 // 76 + 256


class Turn(BaseModel):
    """One turn: a speaker label with text and/or base64 16-bit PCM WAV audio."""

    model_config = REQUEST_CONFIG

    speaker: str = Field(min_length=1, max_length=32, description='Speaker label, e.g. "0".')
    text: str | None = Field(None, max_length=MAX_TURN_CHARS)
    audio_wav_b64: str | None = Field(
        None,
        max_length=MAX_AUDIO_B64_CHARS,
        description="Base64 WAV (data: URI prefix accepted), at most 25 MiB decoded.",
    )
    audio_id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Id of a WAV uploaded through POST /v1/uploads, instead of audio_wav_b64.",
    )


class ConverseParams(BaseModel):
    """Generation parameters; each model accepts the subset it supports.

    The bounds here are the API-wide caps; each engine's own ranges and defaults
    are its :class:`handler.engines.base.ParamRule` list (Kokoro: ``speed``; CSM:
    sampling, ``max_new_tokens`` as frames, ``quantizers`` as codebooks; the
    author LM: sampling, ``max_new_tokens`` as tokens).
    """

    model_config = REQUEST_CONFIG

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    depth_temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_k: int | None = Field(None, ge=1, le=2051)
    repetition_penalty: float | None = Field(None, ge=1.0, le=10.0)
    penalty_window: int | None = Field(None, ge=1, le=2048)
    max_new_tokens: int | None = Field(None, ge=16, le=2048)
    quantizers: int | None = Field(None, ge=1, le=32)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    speed: float | None = Field(None, gt=0.0, le=4.0, description="Speaking-rate multiplier.")


class ConverseRequest(BaseModel):
    """A conversation, oldest turn first; the last turn is the open turn to complete."""

    model_config = REQUEST_CONFIG

    model: str | None = Field(None, description="Model id from GET /v1/models; default if absent.")
    conversation: list[Turn] = Field(min_length=1, max_length=MAX_TURNS)
    params: ConverseParams | None = None
    stream: bool = Field(
        False,
        description="Extension (not in kalpa-converse): answer as Server-Sent Events "
        "(text/event-stream) with events metadata, audio (base64 pcm_s16le chunks as they are "
        "voiced), done, or error; see docs/api.md.",
    )


class ReplyAudio(BaseModel):
    """The reply's audio: always WAV, 16-bit PCM, mono."""

    format: str = "wav"
    sample_rate: int
    num_quantizers: int | None = Field(
        description="Codebooks used for codec models; null for models without a codec."
    )
    data_b64: str | None = Field(description="Base64 WAV; null when the audio comes as a url.")
    url: str | None = Field(None, description="Download URL when the audio is too big inline.")
    expires_in: int | None = Field(None, description="Seconds the url stays valid.")


class Reply(BaseModel):
    """The completed open turn."""

    speaker: str
    text: str
    audio: ReplyAudio


class RequestUsage(BaseModel):
    """Metering of one request (the ``usage`` object of a converse reply)."""

    input_chars: int
    input_audio_seconds: float
    output_audio_seconds: float


class ConverseResponse(BaseModel):
    """Answer of ``POST /v1/converse``."""

    request_id: str
    model: str
    reply: Reply
    usage: RequestUsage
    warnings: list[str] = Field(default_factory=list)


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    display_name: str
    description: str
    modes: list[str]
    speakers: list[str]
    default: bool
    sample_rate: int
    num_quantizers: int | None
    voices: list[str]


class ModelList(BaseModel):
    """Answer of ``GET /v1/models``."""

    data: list[ModelCard]


class StreamMetadata(BaseModel):
    """``event: metadata``, first event of a streamed reply."""

    request_id: str
    model: str
    speaker: str
    format: str = Field("pcm_s16le", description="Audio chunks: raw 16-bit little-endian mono.")
    sample_rate: int
    num_quantizers: int | None


class StreamAudio(BaseModel):
    """``event: audio``: the next chunk of the reply, in order; concatenated, the whole reply."""

    index: int = Field(description="0, 1, 2, ... in the order chunks are to be played.")
    data_b64: str = Field(description="Base64 pcm_s16le samples at the metadata's sample_rate.")


class StreamDone(BaseModel):
    """``event: done``, last event of a streamed reply that succeeded."""

    request_id: str
    text: str
    usage: RequestUsage
    warnings: list[str] = Field(default_factory=list)
