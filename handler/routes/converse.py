"""``GET /v1/models`` and ``POST /v1/converse`` (Kalpa error envelope).

``POST /v1/converse`` with ``"stream": true`` answers with Server-Sent Events
(sse-starlette): the request holds its admission slot until the last event;
failures before the first audio chunk are ordinary error responses, later
ones an ``error`` event in the Kalpa envelope. A client that disconnects
cancels the voicing, and with it the Triton calls still running; so does one
that stops reading (an event not taken within :data:`STALLED_CLIENT_S`, or by
the request's deadline if that comes first). A stream the server's shutdown
cuts short ends with a ``service_unavailable`` ``error`` event.
"""

from __future__ import annotations

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
from starlette.types import Message, Receive, Scope, Send

from handler.deps import (
    CatalogDep,
    ContextDep,
    DeadlineDep,
    SettingsDep,
    client_gone,
    parse_body,
    require_api_key,
    run_admitted,
    take_slot,
)
from handler.errors import (
    ApiError,
    ClientClosedRequest,
    ServiceUnavailable,
    internal_error,
    kalpa_body,
)
from handler.routes.openapi import converse_responses, json_body
from handler.schemas.converse import ConverseRequest, ConverseResponse, ModelCard, ModelList
from handler.services.context import RequestContext
from handler.services.converse import StreamedReply, begin_stream, converse
from handler.services.deadline import within_deadline

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
logger = logging.getLogger("converse.routes")
# Longest wait for a client to take one event (its connection's buffers full), seconds;
# the request's deadline ends the wait sooner. Past it the stream ends, so a client that
# stops reading without closing (a suspended app) cannot hold an admission slot until the
# connection dies. A constant, not a setting: the deadline (CONVERSE_TRITON_TIMEOUT_S,
# 20 s) is the bound that applies unless it is set above this.
STALLED_CLIENT_S = 30.0
# Seconds between the ``: ping`` comments that keep an idle stream open through proxies.
PING_S = 10.0


class _ReplyEvents(EventSourceResponse):
    """A streamed reply's events; the response owns what the request holds until it ends.

    ``held`` (the admission slot, then the voicing) is released as soon as the
    events end, and in any case when the response does: a response cancelled
    before its first event (its client gone while the headers went out) never
    runs the events' own cleanup. A reply that fails after its first chunk ends
    with an ``error`` event. A client that disconnects, or stops reading (an
    event, the headers or a ping not taken within :data:`STALLED_CLIENT_S`, or by
    the request's deadline if sooner), ends the stream without its last event;
    the voicing is cancelled, and the request is logged as
    ``client_closed_request``, not raised as a server error. A stream cut short
    by the server's shutdown (sse-starlette's ``shutdown_event``) is released
    the same way, then ends with a ``service_unavailable`` ``error`` event that
    says when to retry (``retry_after_s``).

    Args:
        streamed: the reply, its first chunk ready.
        ctx: the request's context (its log record).
        held: what the request holds (slot, voicing); closing it twice is safe.
    """

    def __init__(self, streamed: StreamedReply, ctx: RequestContext, held: AsyncExitStack) -> None:
        self._ctx = ctx
        self._held = held
        self._ended = False  # the last event (``done`` or ``error``) was sent
        self._started = False  # the headers were sent
        self._shutdown = anyio.Event()  # set by sse-starlette when the server shuts down
        # Every send is bounded by _send_in_time (the deadline too), not by send_timeout.
        super().__init__(self._events(streamed), ping=PING_S, shutdown_event=self._shutdown)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the events; release what is held and log a stream cut short, however it ends."""
        send_in_time = partial(self._send_in_time, send)
        try:
            await super().__call__(scope, receive, send_in_time)
            # Returned with the body open and the client there: cut by the server's shutdown
            # (a disconnect and the body's end both clear ``active``).
            if self._shutdown.is_set() and self.active:
                await self._say_shutting_down(send_in_time)
        except* SendTimeoutError as timeouts:
            # A group when a ping and an event both waited on the client until the deadline.
            if not self._ended:
                self._ctx.record.error_detail = str(timeouts.exceptions[0])
        finally:
            await self._release()
            if not self._ended:
                # Cut short by the client (gone, or not reading) or by the server stopping;
                # a failure of the reply's own keeps the code its error event was given.
                record = self._ctx.record
                record.error_code = record.error_code or ClientClosedRequest.code

    async def _events(self, streamed: StreamedReply) -> AsyncIterator[ServerSentEvent]:
        """The reply's events; any failure becomes an ``error`` event; then releases ``held``."""
        try:
            try:
                async for name, payload in streamed.events(self._ctx):
                    yield ServerSentEvent(payload.model_dump_json(), event=name)
            except ApiError as error:
                yield self._error_event(error)
            except Exception as error:
                # Unforeseen (an engine bug, an answer without its output, a failing usage
                # write): the client still gets the error event, as the JSON reply gets a 500.
                logger.exception("unhandled error in a streamed reply (request %s)",
                                 self._ctx.request_id)
                yield self._error_event(internal_error(error))
            self._ended = True  # resumed after the last yield: that event was sent
        finally:
            # At once, not when the response ends: its last send may still wait on the client.
            await self._release()

    async def _send_in_time(self, send: Send, message: Message) -> None:
        """Send one ASGI message, waiting for the client at most until its time is up.

        The wait ends :data:`STALLED_CLIENT_S` seconds after it began, or at the
        request's deadline if that is sooner. A message the connection takes
        without waiting goes out even past the deadline (the ``error`` event
        saying the deadline passed).

        Raises:
            SendTimeoutError: the client took nothing in time; its text says which
                limit ended the wait.
        """
        stalled_at = anyio.current_time() + STALLED_CLIENT_S  # the loop's monotonic clock
        with anyio.CancelScope(deadline=min(stalled_at, self._ctx.deadline)) as waiting:
            await send(message)
        if waiting.cancelled_caught:
            if stalled_at <= self._ctx.deadline:
                raise SendTimeoutError(f"the client took no event for {STALLED_CLIENT_S:g} s")
            raise SendTimeoutError("the client took no event before the request's deadline")
        self._started = self._started or message["type"] == "http.response.start"

    async def _say_shutting_down(self, send: Send) -> None:
        """End a stream the server's shutdown cut: ``service_unavailable``, then the body's end.

        What the request held is released first (cut short, as for a client gone).
        The ``error`` event carries the retry hint in its message and as the SSE
        ``retry`` field (milliseconds); a stream that had sent its last event
        only gets the body's end.

        Args:
            send: the bounded send (:meth:`_send_in_time`).

        Raises:
            SendTimeoutError: the client took nothing in time.
        """
        await self._release()
        if not self._started:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
        if not self._ended:
            retry_s = self._ctx.settings.retry_after_s
            event = self._error_event(ServiceUnavailable(
                f"the service is shutting down; retry in {retry_s} s",
                detail="the server shut down while the reply was streamed",
            ), retry_ms=retry_s * 1000)
            await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            self._ended = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _error_event(self, error: ApiError, retry_ms: int | None = None) -> ServerSentEvent:
        """``error`` in the Kalpa envelope, its code and detail on the request's log record.

        ``retry_ms`` is the SSE ``retry`` field (milliseconds), when given.
        """
        self._ctx.record.error_code = error.code
        self._ctx.record.error_detail = error.detail
        body = json.dumps(kalpa_body(error, self._ctx.request_id))
        return ServerSentEvent(body, event="error", retry=retry_ms)

    async def _release(self) -> None:
        """Release the slot and cancel the voicing (its Triton calls); a no-op the second time.

        A stream cut short is released as the client's failure: its time (up to
        the deadline waiting on a client that stopped reading) says nothing of
        the service's, and admission's run-time estimate leaves it out, as it
        does for a non-streamed request whose client went away; so is a stream
        the server's shutdown cut.
        """
        # Shielded: while this task is being cancelled (client gone) anyio re-cancels
        # every await, and the slot and the Triton calls would stay held.
        with anyio.CancelScope(shield=True):
            if self._ended:
                await self._held.aclose()
            else:
                gone = ClientClosedRequest("the client went away or stopped reading")
                await self._held.__aexit__(type(gone), gone, None)


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
    async with AsyncExitStack() as stack:
        await take_slot(stack, request, ctx)
        streamed = await within_deadline(
            begin_stream(body, ctx), ctx.deadline, partial(client_gone, request)
        )
        stack.push_async_callback(streamed.close)
        held = stack.pop_all()
    return _ReplyEvents(streamed, ctx, held)
