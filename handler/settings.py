"""Service settings: one pydantic-settings class; every field is also an env var.

Each field ``name`` is read from ``CONVERSE_<NAME>`` (case-insensitive). The
README's configuration table is checked against this class by a test.
"""

from __future__ import annotations

import hashlib
from functools import cached_property

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1 << 20


class Settings(BaseSettings):
    """Configuration of the API service (see the README table)."""

    model_config = SettingsConfigDict(env_prefix="CONVERSE_", extra="ignore")

    triton_url: str = Field(
        "127.0.0.1:8000", description="Triton HTTP endpoint as host:port (no scheme)."
    )
    api_keys: str = Field(
        "",
        description="Comma-separated API keys; hashed with SHA-256 at startup, plaintext dropped.",
    )
    api_key_sha256: str = Field(
        "", description="Comma-separated hex SHA-256 digests of accepted API keys."
    )
    default_model: str = Field("kokoro", description="Model used when a request names none.")
    kokoro_speaker_voices: str = Field(
        "jf_alpha,jm_kumo",
        description="Kokoro voice (or blend) bound to speaker labels 0, 1, ... in order.",
    )
    triton_timeout_s: float = Field(
        20.0, gt=0, description="Deadline for all Triton work of one request, seconds."
    )
    lambda_timeout_s: float = Field(
        25.0, gt=0, description="Lambda function timeout, seconds (must exceed triton_timeout_s)."
    )
    gateway_timeout_s: float = Field(
        29.0, gt=0, description="API gateway integration timeout, seconds (must exceed lambda's)."
    )
    triton_max_inflight: int = Field(
        8, ge=1, description="Most Triton inference calls one API process keeps in flight."
    )
    retry_after_s: int = Field(
        5, ge=1, description="Retry-After seconds sent with 503 when Triton is unreachable."
    )
    models_cache_s: float = Field(
        30.0, ge=0, description="How long the model list read from Triton is reused, seconds."
    )
    max_request_bytes: int = Field(
        64 * MIB, ge=1024, description="Largest accepted request body, bytes."
    )
    sentence_pause_ms: int = Field(
        250, ge=0, description="Silence between the sentences of one turn, milliseconds."
    )

    @model_validator(mode="after")
    def _deadlines_ordered(self) -> Settings:
        if not self.triton_timeout_s < self.lambda_timeout_s < self.gateway_timeout_s:
            raise ValueError(
                "deadlines must be ordered triton_timeout_s < lambda_timeout_s < "
                f"gateway_timeout_s, got {self.triton_timeout_s} / {self.lambda_timeout_s} / "
                f"{self.gateway_timeout_s}"
            )
        return self

    @cached_property
    def key_digests(self) -> frozenset[str]:
        """Hex SHA-256 digests of every accepted API key (plaintext keys hashed here)."""
        digests = {d.strip().lower() for d in self.api_key_sha256.split(",") if d.strip()}
        digests |= {
            hashlib.sha256(key.strip().encode()).hexdigest()
            for key in self.api_keys.split(",")
            if key.strip()
        }
        return frozenset(digests)

    @property
    def speaker_voices(self) -> list[str]:
        """Kokoro voice specs for speaker labels "0", "1", ... in order."""
        return [v.strip() for v in self.kokoro_speaker_voices.split(",") if v.strip()]
