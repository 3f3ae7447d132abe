"""A test double of an external OpenAI-compatible chat endpoint (``POST /v1/chat/completions``).

It streams Server-Sent Events the way the chat-completions API does. Used by
the chat adapter tests (in their own event loop, :func:`endpoint`) and by the
live-session tests (in a thread beside the API server, :class:`ScriptedChatEndpoint`).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def sse(payload: dict[str, Any]) -> bytes:
    """One Server-Sent Event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload)}\n\n".encode()


def chunk(delta: dict[str, Any]) -> dict[str, Any]:
    """A ``chat.completion.chunk`` with one choice's ``delta``."""
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def tool_call_chunk(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A chunk whose delta is one complete tool call."""
    return chunk({"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                  "function": {"name": name, "arguments": json.dumps(arguments)}}]})


async def stream_chunks(request: web.Request, chunks: list[dict[str, Any]]) -> web.StreamResponse:
    """Answer ``request`` with ``chunks`` as SSE, then ``[DONE]``."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for item in chunks:
        await response.write(sse(item))
    await response.write(b"data: [DONE]\n\n")
    return response


@asynccontextmanager
async def endpoint(handler: Handler) -> AsyncIterator[str]:
    """Serve ``POST /v1/chat/completions`` with ``handler`` on loopback; yields the base URL."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


class ScriptedChatEndpoint:
    """Answers the n-th request with the n-th script (a list of chunks), in its own thread.

    ``requests`` holds the JSON bodies received, in order.
    """

    def __init__(self, scripts: list[list[dict[str, Any]]]) -> None:
        self.scripts = scripts
        self.requests: list[dict[str, Any]] = []
        self.base_url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),),
                                        daemon=True)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        script = self.scripts[min(len(self.requests), len(self.scripts)) - 1]
        return await stream_chunks(request, script)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with endpoint(self._handle) as base_url:
            self.base_url = base_url
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> ScriptedChatEndpoint:
        self._thread.start()
        assert self._ready.wait(10), "the chat endpoint double did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)
        self._loop.close()
