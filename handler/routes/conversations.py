"""``/v1/conversations``: create, read and end sessions; their WebSocket stream.

REST routes answer in the Kalpa error envelope, with the same auth and rate
limits as ``/v1/converse``. ``WS /v1/conversations/{id}/stream`` is accepted
first and then closed with a documented close code when something is wrong
(a browser sees close codes, not HTTP statuses); see docs/sessions.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re

from fastapi import APIRouter, Depends, Request, WebSocket
from starlette.websockets import WebSocketDisconnect

from handler.deps import ContextDep, SettingsDep, parse_body, require_api_key
from handler.errors import AuthenticationError, RateLimited, ServiceUnavailable, UpgradeRequired
from handler.routes.openapi import json_body
from handler.schemas.sessions import Conversation, ConversationCreate
from handler.services.deadline import within_deadline
from handler.sessions import service
from handler.sessions.base import SessionParams
from handler.sessions.protocol import ENCODINGS, SAMPLE_RATES, CloseCode
from handler.sessions.transport import LiveSocket, SessionHub
from handler.settings import Settings
from handler.storage import Storage

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
stream_router = APIRouter(prefix="/v1")
SUBPROTOCOL = "converse.v1"
logger = logging.getLogger("converse.sessions")


@router.post(
    "/conversations/create",
    status_code=201,
    response_model=Conversation,
    openapi_extra=json_body(ConversationCreate),
)
async def create_conversation(
    request: Request, settings: SettingsDep, ctx: ContextDep
) -> Conversation:
    """Create a session: persona, voice, language and tools; connect to its ``stream_url``."""
    limit = min(settings.max_request_bytes, service.MAX_CREATE_BODY_BYTES)
    body = await parse_body(request, ConversationCreate, limit)
    return await within_deadline(service.create(body, ctx), ctx.deadline)


@router.get("/conversations/{session_id}", response_model=Conversation)
async def get_conversation(session_id: str, ctx: ContextDep) -> Conversation:
    """The session's configuration, status and ordered turns (30 days after it ended)."""
    return await service.get(session_id, ctx)


@router.delete("/conversations/{session_id}", response_model=Conversation)
async def delete_conversation(request: Request, session_id: str, ctx: ContextDep) -> Conversation:
    """End the session and close its live socket now; its history stays 30 days."""
    ended = await service.end(session_id, ctx)
    hub: SessionHub = request.app.state.session_hub
    hub.end(session_id, "deleted")
    return ended


# A sample rate as the query gives it: a few ASCII digits.
_SAMPLE_RATE = re.compile(r"[0-9]{1,6}")


class ParamError(ValueError):
    """A stream query parameter out of range, with its close code."""

    def __init__(self, code: CloseCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def stream_params(query: dict[str, str]) -> SessionParams:
    """The stream's ``sample_rate``, ``encoding`` and ``vad_threshold`` (spec defaults).

    Raises:
        ParamError: with ``BAD_SAMPLE_RATE``, ``BAD_ENCODING`` or ``BAD_VAD_THRESHOLD``.
    """
    rate_text = query.get("sample_rate", "16000")
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    if _SAMPLE_RATE.fullmatch(rate_text) is None or int(rate_text) not in SAMPLE_RATES:
        raise ParamError(
            CloseCode.BAD_SAMPLE_RATE,
            f"sample_rate must be one of {', '.join(map(str, SAMPLE_RATES))}",
        )
    encoding = query.get("encoding", "pcm16")
    if encoding not in ENCODINGS:
        raise ParamError(CloseCode.BAD_ENCODING, f"encoding must be one of {', '.join(ENCODINGS)}")
    try:
        threshold = float(query.get("vad_threshold", "0.5"))
    except ValueError:
        threshold = math.nan
    if not 0.0 <= threshold <= 1.0:
        raise ParamError(CloseCode.BAD_VAD_THRESHOLD, "vad_threshold must be between 0.0 and 1.0")
    return SessionParams(int(rate_text), encoding, threshold)


@stream_router.websocket("/conversations/{session_id}/stream")
async def stream(websocket: WebSocket, session_id: str) -> None:
    """Audio in and out of one session (protocol: docs/sessions.md)."""
    offered = websocket.scope.get("subprotocols", [])
    await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    state = websocket.app.state
    try:
        socket = await _open(websocket, session_id)
    except (WebSocketDisconnect, OSError):  # the client left first
        return
    except Exception:  # storage failing (auth, rate limit, the session's record)
        logger.exception("session %s: the socket could not be opened", session_id)
        with contextlib.suppress(Exception):
            await websocket.close(CloseCode.INTERNAL_ERROR, "internal error")
        return
    if socket is not None:
        await socket.run(state.conversation_factory, state.session_hub)


async def _open(websocket: WebSocket, session_id: str) -> LiveSocket | None:
    """The accepted socket's session, checked: key, rate limit, parameters, session state.

    Returns None once the socket is closed with the failing check's code.

    Raises:
        Exception: whatever storage raises (the caller closes with ``INTERNAL_ERROR``).
    """
    settings: Settings = websocket.app.state.settings
    storage: Storage = websocket.app.state.storage
    try:
        await require_api_key(websocket, settings, storage)
    except AuthenticationError as error:
        await websocket.close(CloseCode.UNAUTHORIZED, error.message)
        return None
    except RateLimited as error:
        await websocket.close(CloseCode.RATE_LIMITED, error.message)
        return None
    except ServiceUnavailable as error:  # the API keys secret could not be read
        retry_s = settings.retry_after_s
        await websocket.close(CloseCode.SERVICE_BUSY, f"{error.message} (retry in {retry_s} s)")
        return None
    try:
        params = stream_params(dict(websocket.query_params))
    except ParamError as error:
        await websocket.close(error.code, str(error))
        return None
    key_id = str(websocket.state.key_id)
    record = await service.current(storage, key_id, session_id, settings.session_max_duration_s)
    if record is None:
        await websocket.close(CloseCode.SESSION_NOT_FOUND, "session not found")
        return None
    if record.status != "active":
        await websocket.close(CloseCode.SESSION_ENDED, f"session ended: {record.ended_reason}")
        return None
    return LiveSocket(websocket, record, params, storage, settings)


@stream_router.get("/conversations/{session_id}/stream", include_in_schema=False)
async def stream_over_http(session_id: str) -> None:
    """A plain HTTP request (or the Lambda, which cannot hold sockets) on the stream path."""
    raise UpgradeRequired(
        f"/v1/conversations/{session_id}/stream is a WebSocket: connect to the session's "
        "stream_url with a WebSocket client"
    )

