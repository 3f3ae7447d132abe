"""One error hierarchy and the two renderers the specs require.

Services raise :class:`ApiError` subclasses; nothing else builds error bodies.
An error's ``message`` is what the client reads: it names no internal host,
port or path. What only operators need (the Triton address, the upstream's own
words) goes in ``detail``, which the app logs under the request id.
``/v1/audio/*`` errors render as RFC 7807 ``application/problem+json``
(speechbase-conversation-reference.md); every other path renders the Kalpa
envelope ``{"error": {"type", "message", "request_id"}}`` (kalpa-converse).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

PROBLEM_PATH_PREFIX = "/v1/audio/"


@dataclass
class ValidationItem:
    """One ``validation[]`` entry: JSON path of the bad field and what is wrong."""

    path: list[str]
    message: str


@dataclass(frozen=True)
class Upstream:
    """Who failed upstream, in speechbase's problem fields.

    Attributes:
        provider: the inference provider ("triton").
        code: the provider's error code (Triton's: ``INVALID_ARG``, ``INTERNAL``,
            ``UNAVAILABLE``, ...).
        status: the provider's HTTP status, or None when it never answered.
    """

    provider: str
    code: str
    status: int | None = None


class ApiError(Exception):
    """Base of every error the API answers with.

    Attributes:
        status: HTTP status.
        type: Kalpa envelope ``type``.
        code: problem+json ``code`` (machine-readable reason).
        title: problem+json ``title``.
        retryable: True if the same request may succeed later (Triton busy, timeout).
        detail: operator-only context, logged under the request id, never rendered.
        upstream: the failing inference server's answer (problem+json
            ``provider``, ``upstream_code``, ``upstream_status``), when one failed.
    """

    status = 500
    type = "internal_error"
    code = "internal_error"
    title = "Internal error"
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        turn_index: int | None = None,
        validation: list[ValidationItem] | None = None,
        headers: dict[str, str] | None = None,
        detail: str = "",
        upstream: Upstream | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.upstream = upstream
        if code is not None:
            self.code = code
        self.turn_index = turn_index
        self.validation = validation or []
        self.headers = headers or {}


class InvalidRequest(ApiError):
    """400: the request breaks a spec rule or cap."""

    status, type, code, title = 400, "invalid_request", "validation_error", "Invalid request"


class UnprocessableRequest(InvalidRequest):
    """422: well-formed and within caps, but the model cannot voice it."""

    status, code, title = 422, "unprocessable", "Unprocessable request"


class AuthenticationError(ApiError):
    """401: missing or unknown API key (or a bad file-URL signature).

    Carries ``WWW-Authenticate: Bearer``: a 401 must name the scheme it wants
    (RFC 9110, 11.6.1; the Bearer scheme is RFC 6750's).
    """

    status, type, code, title = 401, "authentication_error", "unauthorized", "Unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="converse"'})


class NotFound(ApiError):
    """404: unknown route or model."""

    status, type, code, title = 404, "not_found", "not_found", "Not found"


class MethodNotAllowed(ApiError):
    """405: the route exists but not for this method."""

    status, type, code = 405, "method_not_allowed", "method_not_allowed"
    title = "Method not allowed"


class UpgradeRequired(ApiError):
    """426: a WebSocket path requested over plain HTTP (``Upgrade: websocket`` set)."""

    status, type, code, title = 426, "invalid_request", "upgrade_required", "Upgrade required"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Upgrade": "websocket", "Connection": "Upgrade"})


class RateLimited(ApiError):
    """429: too many requests for this key."""

    status, type, code, title = 429, "rate_limit_exceeded", "rate_limited", "Too many requests"
    retryable = True


class PayloadTooLarge(InvalidRequest):
    """413: the request body is larger than ``max_request_bytes``."""

    status, code, title = 413, "payload_too_large", "Payload too large"


class InferenceError(ApiError):
    """502: Triton answered with an error."""

    status, type, code, title = 502, "inference_error", "inference_error", "Inference failed"


class ServiceUnavailable(ApiError):
    """503: Triton unreachable or not ready."""

    status, type, code, title = 503, "service_unavailable", "service_unavailable", "Unavailable"
    retryable = True


class Overloaded(ServiceUnavailable):
    """503: the service cannot start this request before its deadline (``Retry-After`` set)."""

    code = "overloaded"


class KeyOverShare(RateLimited):
    """429: under load, this key already holds its share of the service's capacity."""

    code = "concurrency_limited"


class ContentBlocked(ApiError):
    """422 ``content_moderation_blocked``, rendered as speechbase's moderation body.

    Body: ``{"error": {"code", "message", "reason": {"type", "detail"}}}``
    (speechbase-conversation-reference.md). ``reason_type`` and
    ``reason_detail`` are what the client reads (a generic sentence); what
    matched, or why the policy failed, is ``detail`` (logged only).
    """

    status, type, code, title = 422, "invalid_request", "content_moderation_blocked", "Blocked"

    def __init__(
        self,
        message: str,
        reason_type: str,
        reason_detail: str,
        turn_index: int,
        *,
        detail: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, turn_index=turn_index, detail=detail, headers=headers)
        self.reason_type = reason_type
        self.reason_detail = reason_detail


class ModerationUnavailable(ContentBlocked):
    """503 ``content_moderation_blocked``, reason ``error_fail_closed``: the policy failed.

    The moderation policy raised (its service is down) and
    ``CONVERSE_MODERATION_FAIL_MODE`` is ``closed``. The body is speechbase's
    moderation body with its ``error_fail_closed`` reason; the status is 503
    with ``Retry-After`` (not 422) because nothing is wrong with the text: the
    same request may pass once moderation is back.
    """

    status, type, title = 503, "service_unavailable", "Moderation unavailable"
    retryable = True

    def __init__(self, turn_index: int, retry_after_s: int, *, detail: str = "") -> None:
        super().__init__(
            f"turn {turn_index} could not be moderated: moderation is unavailable",
            "error_fail_closed",
            "moderation is unavailable; retry later",
            turn_index,
            detail=detail,
            headers={"Retry-After": str(retry_after_s)},
        )


class TimestampsUnavailable(ServiceUnavailable):
    """503: neither forced alignment nor speech recognition could time the words."""

    code = "timestamps_unavailable"


class DeadlineExceeded(ApiError):
    """504: the request did not finish by its deadline (``triton_timeout_s`` after arrival)."""

    status, type, code, title = 504, "timeout_error", "timeout", "Deadline exceeded"
    retryable = True


class ClientClosedRequest(ApiError):
    """499: the client went away before the answer; its work was cancelled (logged only)."""

    status, type, code, title = 499, "client_closed_request", "client_closed_request", "Closed"


def internal_error(error: Exception) -> ApiError:
    """The 500 ``internal_error`` a failure that is no :class:`ApiError` (a bug) is answered with.

    The client reads only "internal error"; ``repr(error)`` is the ``detail`` (logged).
    """
    return ApiError("internal error", detail=repr(error))


def uses_problem_json(path: str) -> bool:
    """True when errors on ``path`` render as problem+json (speechbase routes)."""
    return path.startswith(PROBLEM_PATH_PREFIX)


def kalpa_body(error: ApiError, request_id: str) -> dict[str, Any]:
    """The Kalpa envelope ``{"error": {"type", "message", "request_id"}}`` as a dict."""
    return {"error": {"type": error.type, "message": error.message, "request_id": request_id}}


def render_kalpa(error: ApiError, request_id: str) -> JSONResponse:
    """Kalpa envelope response: :func:`kalpa_body` with the error's status and headers."""
    return JSONResponse(
        kalpa_body(error, request_id), status_code=error.status, headers=error.headers
    )


def render_problem(error: ApiError, request_id: str) -> JSONResponse:
    """RFC 7807 body with speechbase's ``code``, ``validation`` and ``turn_index``."""
    body: dict[str, Any] = {
        "type": f"/problems/{error.code}",
        "title": error.title,
        "status": error.status,
        "detail": error.message,
        "code": error.code,
        "request_id": request_id,
    }
    if error.validation:
        body["validation"] = [{"path": v.path, "message": v.message} for v in error.validation]
    if error.turn_index is not None:
        body["turn_index"] = error.turn_index
    if error.upstream is not None:
        body["provider"] = error.upstream.provider
        body["upstream_code"] = error.upstream.code
        if error.upstream.status is not None:
            body["upstream_status"] = error.upstream.status
    return JSONResponse(
        body,
        status_code=error.status,
        headers=error.headers,
        media_type="application/problem+json",
    )


def render_moderation(error: ContentBlocked, request_id: str) -> JSONResponse:
    """Speechbase's moderation body (plus ``turn_index`` and ``request_id``).

    ``reason.detail`` is the error's generic ``reason_detail``, never its
    operator ``detail`` (the matched term or pattern, a policy's error text).
    """
    body = {
        "error": {
            "code": error.code,
            "message": error.message,
            "reason": {"type": error.reason_type, "detail": error.reason_detail},
            "turn_index": error.turn_index,
            "request_id": request_id,
        }
    }
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def render(error: ApiError, path: str, request_id: str) -> JSONResponse:
    """Render ``error`` in the style that ``path``'s spec requires."""
    if isinstance(error, ContentBlocked):
        return render_moderation(error, request_id)
    if uses_problem_json(path):
        return render_problem(error, request_id)
    return render_kalpa(error, request_id)
