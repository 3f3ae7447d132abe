"""Service settings: one pydantic-settings class; every field is also an env var.

Each field ``name`` is read from ``CONVERSE_<NAME>`` (case-insensitive). The
README's configuration table is checked against this class by a test.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.concurrency import run_in_threadpool

from handler.errors import ServiceUnavailable

logger = logging.getLogger(__name__)

MIB = 1 << 20


class Settings(BaseSettings):
    """Configuration of the API service (see the README table)."""

    model_config = SettingsConfigDict(env_prefix="CONVERSE_", extra="ignore")
    _key_digests: frozenset[str] | None = PrivateAttr(None)
    # One read of the API keys secret at a time (see load_key_digests): the reads
    # finished so far, and the last one's outcome (its digests, or why it failed).
    _secret_lock: asyncio.Lock = PrivateAttr(default_factory=asyncio.Lock)
    _secret_reads: int = PrivateAttr(0)
    _secret_outcome: frozenset[str] | str = PrivateAttr(frozenset())

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
        5,
        ge=1,
        description="Retry-After seconds of a 503 (Triton unreachable, overload before a run "
        "time is known, moderation or the API keys secret unavailable, a stream cut by "
        "shutdown) and of 4503 socket closes.",
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

    def _configured_digests(self) -> frozenset[str]:
        """Digests from ``api_key_sha256`` (``api_keys`` were hashed into it at load)."""
        return frozenset(d.strip().lower() for d in self.api_key_sha256.split(",") if d.strip())

    @property
    def key_digests(self) -> frozenset[str]:
        """Hex SHA-256 digests of the API keys accepted now, without I/O.

        ``api_keys`` (hashed at load) and ``api_key_sha256``, plus the Secrets
        Manager secret's digests once :meth:`load_key_digests` has read them.
        Requests authenticate with :meth:`load_key_digests`.
        """
        if self._key_digests is not None:
            return self._key_digests
        return self._configured_digests()

    async def load_key_digests(self) -> frozenset[str]:
        """Hex SHA-256 digests of every accepted API key, the secret's included.

        The Secrets Manager secret (``api_keys_secret_arn``) is read in a worker
        thread, never on the event loop, and one read at a time: requests that
        arrive while it is being read wait for that read and share its outcome.
        A value with digests is read once and kept for the process's life
        (docs/deploy.md, "Rotate API keys"). A secret without a value yet
        (terraform creates it empty; docs/deploy.md puts the digests in later),
        or whose value holds no digest, adds none, so only the configured keys
        are accepted; the next request that arrives after the read reads it again.

        Returns:
            Lowercase hex digests.

        Raises:
            ServiceUnavailable: Secrets Manager could not be read (throttled,
                unreachable, access denied): 503 with ``Retry-After``
                (``retry_after_s``), the error in ``detail``. Requests that
                waited on the failed read get it too; nothing is kept, so the
                next request reads again.
        """
        if self._key_digests is not None:
            return self._key_digests
        configured = self._configured_digests()
        if not self.api_keys_secret_arn:
            self._key_digests = configured
            return configured
        reads = self._secret_reads
        async with self._secret_lock:
            if self._secret_reads == reads:  # no read finished while this request waited
                try:
                    self._secret_outcome = await run_in_threadpool(self._read_secret)
                except ServiceUnavailable as error:
                    self._secret_outcome = error.detail
                self._secret_reads += 1
                if isinstance(self._secret_outcome, frozenset) and self._secret_outcome:
                    self._key_digests = configured | self._secret_outcome
            outcome = self._secret_outcome
        if isinstance(outcome, str):  # a fresh error per request, each with its own traceback
            raise self._secret_unavailable(outcome)
        return configured | outcome

    def _read_secret(self) -> frozenset[str]:
        """The digests in the API keys secret; empty while it has none. Blocking (seconds).

        Raises:
            ServiceUnavailable: botocore failed to read it (``detail``: its error).
        """
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            client = boto3.client("secretsmanager")
            secret = client.get_secret_value(SecretId=self.api_keys_secret_arn)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
                raise self._secret_unavailable(f"API keys secret: {error!r}") from error
            secret = {}  # the secret has no value yet
        except BotoCoreError as error:  # endpoint unreachable, no credentials, ...
            raise self._secret_unavailable(f"API keys secret: {error!r}") from error
        text = secret.get("SecretString") or ""
        digests = frozenset(d.strip().lower() for d in text.split(",") if d.strip())
        if not digests:
            logger.warning("the API keys secret has no value yet: no key of it is accepted")
        return digests

    def _secret_unavailable(self, detail: str) -> ServiceUnavailable:
        """The 503 of a failed secret read; ``detail`` (logged only) says why."""
        return ServiceUnavailable(
            "API keys cannot be checked right now; retry later",
            headers={"Retry-After": str(self.retry_after_s)},
            detail=detail,
        )

    @cached_property
    def signing_secret(self) -> bytes:
        """Secret for local file URL signatures."""
        return self.url_signing_secret.encode() or secrets.token_bytes(32)

    @property
    def speaker_voices(self) -> list[str]:
        """Kokoro voice specs for speaker labels "0", "1", ... in order."""
        return [v.strip() for v in self.kokoro_speaker_voices.split(",") if v.strip()]
