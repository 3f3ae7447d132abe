"""``GET /v1/models`` and ``POST /v1/converse`` (Kalpa error envelope).

``POST /v1/converse`` with ``"stream": true`` answers with Server-Sent Events
(sse-starlette): the request holds its admission slot until the last event;
failures before the first audio chunk are ordinary error responses, later
ones an ``error`` event in the Kalpa envelope. A client that disconnects
cancels the voicing, and with it the Triton calls still running; so does one
that stops reading (no event taken for :data:`STALLED_CLIENT_S`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from functools import partial

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from handler.deps import (
    CatalogDep,
    ContextDep,
    DeadlineDep,
    SettingsDep,
    client_gone,
    parse_body,
    require_api_key,
    run_admitted,
)
from handler.errors import ApiError, kalpa_body
from handler.routes.openapi import converse_responses, json_body
from handler.schemas.converse import ConverseRequest, ConverseResponse, ModelCard, ModelList
from handler.services.admission import Admission
from handler.services.context import RequestContext
from handler.services.converse import StreamedReply, begin_stream, converse
from handler.services.deadline import within_deadline

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
logger = logging.getLogger("converse.routes")
# Longest wait for a client to take one event (its connection's buffers full), seconds.
# Past it the stream ends, so a client that stops reading without closing (a suspended
# app) cannot hold an admission slot until the connection dies.
STALLED_CLIENT_S = 30.0


class _ReplyEvents(EventSourceResponse):
    """Server-Sent Events whose client, once stalled past :data:`STALLED_CLIENT_S`, is let go.

    The stream ends without its last events (the voicing is cancelled and the
    slot released by ``_events``' cleanup); it is logged, not raised as a
    server error.
    """

    def __init__(self, content: AsyncIterator[ServerSentEvent]) -> None:
        super().__init__(content, ping=10, send_timeout=STALLED_CLIENT_S)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            logger.info("a streamed reply ended: its client took no event for %s s",
                        STALLED_CLIENT_S)


@router.get("/models", response_model=ModelList)
async def list_models(catalog: CatalogDep, deadline: DeadlineDep) -> ModelList:
    """Models Triton serves, with modes, speaker labels and voices."""
    models = await within_deadline(catalog.models(), deadline)
    return ModelList(data=[ModelCard(**m.public()) for m in models.values()])


@router.post(
    "/converse",
    response_model=ConverseResponse,
    responses=converse_responses(),
    openapi_extra=json_body(ConverseRequest),
)
async def post_converse(
    request: Request, settings: SettingsDep, ctx: ContextDep
) -> ConverseResponse | Response:
    """Complete the open (last) turn of a conversation (as events with ``"stream": true``)."""
    body = await parse_body(request, ConverseRequest, settings.max_request_bytes)
    if body.stream:
        return await _stream(request, ctx, body)
    return await run_admitted(request, ctx, lambda: converse(body, ctx))


async def _stream(request: Request, ctx: RequestContext, body: ConverseRequest) -> Response:
    """Admit, validate and voice up to the first chunk; then the rest as events."""
    admission: Admission = request.app.state.admission
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(admission.slot(ctx.key_id, ctx.deadline))
        streamed = await within_deadline(
            begin_stream(body, ctx), ctx.deadline, partial(client_gone, request)
        )
        stack.push_async_callback(streamed.close)
        held = stack.pop_all()
    return _ReplyEvents(_events(streamed, ctx, held))


async def _events(
    streamed: StreamedReply, ctx: RequestContext, held: AsyncExitStack
) -> AsyncIterator[ServerSentEvent]:
    """The reply's events; an ApiError becomes an ``error`` event; always releases ``held``."""
    try:
        async for name, payload in streamed.events(ctx):
            yield ServerSentEvent(payload.model_dump_json(), event=name)
    except ApiError as error:
        ctx.record.error_code = error.code
        ctx.record.error_detail = error.detail
        yield ServerSentEvent(json.dumps(kalpa_body(error, ctx.request_id)), event="error")
    except asyncio.CancelledError:
        ctx.record.error_code = "client_closed_request"
        raise
    finally:
        # The voicing is cancelled and the slot released even while this task
        # is being cancelled (client gone): anyio re-cancels every await otherwise.
        with anyio.CancelScope(shield=True):
            await held.aclose()
