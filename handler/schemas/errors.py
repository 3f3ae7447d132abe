"""Error bodies as the OpenAPI document describes them (rendered by :mod:`handler.errors`).

Three shapes: the Kalpa envelope (``/v1/converse`` and every other non-audio
route), RFC 7807 problem+json (``/v1/audio/*``), and speechbase's moderation
body (422 ``content_moderation_blocked`` on ``/v1/audio/*``).
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class KalpaErrorDetail(BaseModel):
    """What went wrong, in kalpa-converse's terms."""

    type: str = Field(
        description="invalid_request, authentication_error, not_found, method_not_allowed, "
        "rate_limit_exceeded, internal_error, inference_error, service_unavailable, "
        "timeout_error."
    )
    message: str = Field(description="Human-readable; names no internal host, port or path.")
    request_id: str = Field(description="Same as the X-Request-ID response header.")


class KalpaError(BaseModel):
    """Kalpa error envelope."""

    error: KalpaErrorDetail


class ValidationEntry(BaseModel):
    """One invalid field: its JSON path and what is wrong with it."""

    path: list[str]
    message: str


class Problem(BaseModel):
    """RFC 7807 problem details with speechbase's extension members."""

    type: str = Field(description="URI reference of the problem type, /problems/<code>.")
    title: str
    status: int
    detail: str = Field(description="Human-readable; names no internal host, port or path.")
    code: str = Field(
        description="validation_error, unknown_model, unknown_voice, voice_not_found, "
        "payload_too_large, unprocessable, unauthorized, not_found, rate_limited, "
        "concurrency_limited, internal_error, inference_error, service_unavailable, "
        "overloaded, timestamps_unavailable, timeout."
    )
    request_id: str
    validation: list[ValidationEntry] | None = None
    turn_index: int | None = Field(None, description="Index of the turn at fault.")
    provider: str | None = Field(None, description='Upstream that failed ("triton").')
    upstream_code: str | None = Field(
        None, description="The upstream's error code (Triton: INVALID_ARG, INTERNAL, ...)."
    )
    upstream_status: int | None = Field(None, description="The upstream's HTTP status.")


class ModerationReason(BaseModel):
    """Why moderation blocked the turn."""

    type: str = Field(
        description="blocklist (a blocked term), pattern (a blocked regular expression), "
        "a custom policy's own type, or error_fail_closed (the policy failed and fails "
        "closed: status 503 with Retry-After)."
    )
    detail: str = Field(
        description="A generic sentence; what matched and the policy's own error text are "
        "only in the request's log line."
    )


class ModerationErrorDetail(BaseModel):
    """Speechbase's moderation error."""

    code: str = Field(description="content_moderation_blocked.")
    message: str
    reason: ModerationReason
    turn_index: int
    request_id: str


class ModerationError(BaseModel):
    """Speechbase's own moderation body: 422 when a turn is blocked, 503 when moderation failed."""

    error: ModerationErrorDetail


class Liveness(BaseModel):
    """``GET /health``: the process is running."""

    status: str = Field(description='Always "ok".')


class Readiness(BaseModel):
    """``GET /ready`` when the service can take traffic."""

    status: str = Field(description='"ready".')
    models: list[str] = Field(description="API model ids the catalogue loaded.")
