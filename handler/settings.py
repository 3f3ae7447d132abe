"""Service settings: one pydantic-settings class; every field is also an env var.

Each field ``name`` is read from ``CONVERSE_<NAME>`` (case-insensitive). The
README's configuration table is checked against this class by a test.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

logger = logging.getLogger(__name__)

MIB = 1 << 20


class Settings(BaseSettings):
    """Configuration of the API service (see the README table)."""

    model_config = SettingsConfigDict(env_prefix="CONVERSE_", extra="ignore")
    _key_digests: frozenset[str] | None = PrivateAttr(None)

    triton_url: str = Field(
        "127.0.0.1:8000", description="Triton HTTP endpoint as host:port (no scheme)."
    )
    triton_grpc_url: str = Field(
        "127.0.0.1:8001",
        description="Triton gRPC endpoint as host:port: the chat LM's token stream, and every "
        "inference call when triton_protocol is grpc.",
    )
    triton_protocol: Literal["http", "grpc"] = Field(
        "http",
        description="Protocol of inference calls: grpc stops a request's work inside Triton as "
        "soon as its client goes away; http stops it at the request's deadline.",
    )
    chat_base_url: str = Field(
        "",
        description="OpenAI-compatible API base (e.g. https://api.openai.com/v1) for session "
        "replies; empty: the bundled chat LM in Triton.",
    )
    chat_api_key: str = Field(
        "", description="Bearer key sent to chat_base_url (never logged)."
    )
    chat_model: str = Field("", description="Model name sent to chat_base_url.")
    api_keys: str = Field(
        "",
        description="Comma-separated API keys; hashed with SHA-256 at startup, plaintext dropped.",
    )
    api_key_sha256: str = Field(
        "", description="Comma-separated hex SHA-256 digests of accepted API keys."
    )
    api_keys_secret_arn: str = Field(
        "",
        description="Secrets Manager secret whose value is more comma-separated key digests.",
    )
    default_model: str = Field("kokoro", description="Model used when a request names none.")
    kokoro_speaker_voices: str = Field(
        "jf_alpha,jm_kumo",
        description="Kokoro voice (or blend) bound to speaker labels 0, 1, ... in order.",
    )
    triton_timeout_s: float = Field(
        20.0,
        gt=0,
        description="Deadline of one request from its arrival, every stage included, seconds.",
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
    admission_max_active: int = Field(
        4, ge=1, description="Inference requests one API process runs at once; more wait."
    )
    admission_max_queued: int = Field(
        32, ge=0, description="Inference requests that may wait for a slot; beyond it 503."
    )
    admission_key_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Share of running + waiting slots one key may hold once requests wait; "
        "beyond it 429.",
    )
    ready_timeout_s: float = Field(
        2.0, gt=0, description="How long /ready waits for Triton and the model list, seconds."
    )
    log_requests: bool = Field(
        True, description="Write one JSON line per request (with per-turn events) to stdout."
    )
    metrics_enabled: bool = Field(
        False, description="Serve Prometheus request metrics at /metrics (no key needed)."
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
        0,
        ge=0,
        description="Silence between the sentences of one turn, milliseconds "
        "(0: sentences share Kokoro calls).",
    )
    storage_backend: Literal["sqlite", "dynamodb"] = Field(
        "sqlite", description="Where voices, usage and rate-limit buckets live."
    )
    sqlite_path: Path = Field(
        Path(".converse/converse.db"), description="SQLite file of the sqlite backend."
    )
    dynamodb_voices_table: str = Field("converse-voices", description="DynamoDB voices table.")
    dynamodb_usage_table: str = Field("converse-usage", description="DynamoDB usage table.")
    dynamodb_rate_table: str = Field(
        "converse-rate-limits", description="DynamoDB rate-limit bucket table."
    )
    dynamodb_sessions_table: str = Field(
        "converse-sessions", description="DynamoDB sessions table (TTL on expires_at)."
    )
    public_stream_url: str = Field(
        "",
        description="Base wss:// URL of the sessions service; empty: the request's own host.",
    )
    session_idle_timeout_s: float = Field(
        120.0, gt=0, description="A live socket with no client message for this long closes, s."
    )
    session_max_duration_s: float = Field(
        3600.0, gt=0, description="A session ends this long after it was created, seconds."
    )
    session_max_message_bytes: int = Field(
        262_144, ge=1024, description="Largest WebSocket message a client may send, bytes."
    )
    session_check_s: float = Field(
        1.0,
        gt=0,
        description="How often a live socket rereads its session (ended or taken elsewhere), s.",
    )
    session_max_live: int = Field(
        4,
        ge=1,
        description="Live session sockets one API process serves at once; one more is closed "
        "with 4503 and a retry hint (the session stays active).",
    )
    session_send_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Longest a live socket waits for the client to take one message (its send "
        "buffer stays full while the client reads nothing); past it the socket is dropped and "
        "the session stays active, seconds.",
    )
    session_tool_timeout_s: float = Field(
        10.0, gt=0, description="How long a reply waits for the client's tool result, seconds."
    )
    session_model_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest one model call of a live session may take (VAD, transcription, "
        "a clause's voicing), and longest the chat LM may go without writing, seconds; past "
        "it the call is cancelled and fails with `timeout`.",
    )
    session_reply_seed: int | None = Field(
        None,
        ge=0,
        le=2**63 - 1,
        description="Sampling seed of every session reply (the same conversation then nearly "
        "always gets the same replies: tests, demos); unset: a fresh seed per reply.",
    )
    blob_backend: Literal["local", "s3"] = Field(
        "local", description="Where large responses and uploads live: a directory or S3."
    )
    blob_dir: Path = Field(Path(".converse/blobs"), description="Directory of the local blobs.")
    s3_bucket: str = Field("", description="S3 bucket of the s3 blob backend.")
    url_signing_secret: str = Field(
        "", description="HMAC secret for local file URLs; random per process when empty."
    )
    url_expires_s: int = Field(
        3600, ge=60, le=604_800, description="Lifetime of download and upload URLs, seconds."
    )
    inline_audio_max_bytes: int = Field(
        4_500_000,
        ge=0,
        description="Largest audio returned inline; larger comes back as a URL (Lambda: 6 MB).",
    )
    moderation_policy: str = Field(
        "blocklist", description="blocklist, or module:factory of a custom policy."
    )
    moderation_blocklist: str = Field(
        "", description="Comma-separated words the blocklist policy blocks (whole words)."
    )
    moderation_patterns: list[str] = Field(
        default_factory=list, description="JSON list of regular expressions the policy blocks."
    )
    moderation_fail_mode: Literal["open", "closed"] = Field(
        "closed", description="What a failing moderation policy does: let through or block."
    )
    rate_limit_capacity: int = Field(
        60, ge=1, description="Token-bucket burst per API key, requests."
    )
    rate_limit_per_minute: float = Field(
        60.0, gt=0, description="Token-bucket refill per API key, requests per minute."
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

    @model_validator(mode="after")
    def _hash_plain_keys(self) -> Settings:
        """Move ``api_keys`` into ``api_key_sha256`` as digests; the plaintext is dropped."""
        digests = [
            hashlib.sha256(key.strip().encode()).hexdigest()
            for key in self.api_keys.split(",")
            if key.strip()
        ]
        if digests:
            self.api_key_sha256 = ",".join(d for d in (self.api_key_sha256, *digests) if d)
            self.api_keys = ""
        return self

    @property
    def key_digests(self) -> frozenset[str]:
        """Hex SHA-256 digests of every accepted API key (``api_keys`` were hashed at load).

        The Secrets Manager secret is read once, on first use. A secret without a
        value (terraform creates it empty; docs/deploy.md puts the digests in
        later) adds no digest, so every key gets 401, and it is read again on the
        next use instead of being kept.

        Raises:
            botocore.exceptions.ClientError: Secrets Manager refused the read for
                another reason (permissions, throttling).
        """
        if self._key_digests is not None:
            return self._key_digests
        digests = {d.strip().lower() for d in self.api_key_sha256.split(",") if d.strip()}
        if self.api_keys_secret_arn:
            import boto3

            client = boto3.client("secretsmanager")
            try:
                secret = client.get_secret_value(SecretId=self.api_keys_secret_arn)
            except client.exceptions.ResourceNotFoundException:
                logger.warning("the API keys secret has no value yet: no key is accepted")
                return frozenset(digests)
            digests |= {d.strip().lower() for d in secret["SecretString"].split(",") if d.strip()}
        self._key_digests = frozenset(digests)
        return self._key_digests

    @cached_property
    def signing_secret(self) -> bytes:
        """Secret for local file URL signatures."""
        return self.url_signing_secret.encode() or secrets.token_bytes(32)

    @property
    def speaker_voices(self) -> list[str]:
        """Kokoro voice specs for speaker labels "0", "1", ... in order."""
        return [v.strip() for v in self.kokoro_speaker_voices.split(",") if v.strip()]
