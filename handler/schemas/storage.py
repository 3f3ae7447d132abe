"""Shapes of the storage-backed routes: saved voices, usage, uploads."""

from __future__ import annotations

from pydantic import BaseModel, Field

from handler.schemas import REQUEST_CONFIG


class VoiceCreate(BaseModel):
    """``POST /v1/voices``: a bundled voice or blend, or a reference clip + transcript."""

    model_config = REQUEST_CONFIG

    name: str = Field(min_length=1, max_length=100)
    model: str | None = Field(None, description="Model id; the default model when absent.")
    voice: str | None = Field(None, min_length=1, max_length=256, description="Voice or blend.")
    reference_audio_id: str | None = Field(
        None, min_length=1, max_length=64, description="Uploaded clip id (codec models)."
    )
    transcript: str | None = Field(None, min_length=1, max_length=8000)


class Voice(BaseModel):
    """A saved voice."""

    id: str
    name: str
    model: str
    voice: str | None
    reference_audio_id: str | None
    transcript: str | None
    created_at: float = Field(description="Unix seconds.")


class VoiceList(BaseModel):
    """``GET /v1/voices``: one page, oldest first."""

    data: list[Voice]
    next_cursor: str | None
    has_more: bool


class KeyUsage(BaseModel):
    """``GET /v1/usage``: totals of the calling key."""

    key_id: str
    requests: int
    input_chars: int
    input_audio_seconds: float
    output_audio_seconds: float
    last_request_ts: float | None


class Upload(BaseModel):
    """``POST /v1/uploads``: where to PUT a WAV clip, and the id that references it."""

    id: str
    upload_url: str
    method: str = "PUT"
    expires_in: int = Field(description="Seconds the URL stays valid.")
    max_bytes: int
