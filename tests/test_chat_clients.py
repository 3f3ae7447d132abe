"""Chat adapters without Triton: the tool-call parser and the OpenAI-compatible client.

The OpenAI-compatible endpoint is a small aiohttp server on loopback: a test
double of an external service, streaming Server-Sent Events the way the
chat-completions API does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from handler.engines.chat import (
    ChatDelta,
    ChatMessage,
    OpenAIChatModel,
    ToolCall,
    ToolCallParser,
    TritonChatModel,
    chat_model,
)
from handler.errors import InferenceError, ServiceUnavailable
from tests.helpers import make_settings

CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}}


def parse(pieces: list[str]) -> list[ChatDelta]:
    parser = ToolCallParser()
    deltas = [delta for piece in pieces for delta in parser.feed(piece)]
    return deltas + parser.finish()


@pytest.mark.parametrize("size", [1, 2, 7, 1000])
def test_parser_splits_text_and_a_call_however_the_text_arrives(size: int) -> None:
    reply = f"Let me check. {CALL} Done."
    deltas = parse([reply[i:i + size] for i in range(0, len(reply), size)])
    calls = [d.tool_call for d in deltas if d.tool_call]
    assert "".join(d.text for d in deltas) == "Let me check.  Done."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert calls[0].id.startswith("call_")


def test_parser_passes_text_on_before_the_reply_ends() -> None:
    parser = ToolCallParser()
    assert parser.feed("Hello <to") == [ChatDelta(text="Hello ")]
    assert parser.feed("day") == [ChatDelta(text="<today")]


@pytest.mark.parametrize("reply", [
    "<tool_call>not json</tool_call> ok",
    '<tool_call>{"arguments": {}}</tool_call>',
    '<tool_call>{"name": "x", "arguments": {',
])
def test_parser_gives_malformed_or_unclosed_calls_back_as_text(reply: str) -> None:
    deltas = parse([reply])
    assert all(d.tool_call is None for d in deltas)
    assert "".join(d.text for d in deltas) == reply


def sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def chunk(delta: dict[str, Any]) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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


def test_openai_stream_gives_text_then_the_assembled_tool_call() -> None:
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        seen["body"] = await request.json()
        seen["auth"] = request.headers.get("Authorization")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in (
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Let me "}),
            chunk({"content": "check."}),
            chunk({"tool_calls": [{"index": 0, "id": "call_abc", "type": "function",
                                   "function": {"name": "get_", "arguments": ""}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"name": "weather",
                                                            "arguments": '{"city": '}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        ):
            await response.write(sse(event))
        await response.write(b"data: [DONE]\n\n")
        return response

    async def run() -> list[ChatDelta]:
        async with endpoint(handler) as base_url:
            model = OpenAIChatModel(base_url, "sk-test", "strong-model")
            messages = [
                ChatMessage("system", "Be brief."),
                ChatMessage("user", "Weather?"),
                ChatMessage("assistant", "", tool_calls=(ToolCall("call_0", "f", "{}"),)),
                ChatMessage("tool", "{}", tool_call_id="call_0"),
            ]
            return [d async for d in model.stream(messages, [TOOL], max_new_tokens=50,
                                                  temperature=0.5, seed=7)]

    deltas = asyncio.run(run())
    assert [d.text for d in deltas if d.text] == ["Let me ", "check."]
    assert [d.tool_call for d in deltas if d.tool_call] == [
        ToolCall("call_abc", "get_weather", '{"city": "Paris"}')
    ]
    body = seen["body"]
    assert seen["auth"] == "Bearer sk-test"
    assert body["model"] == "strong-model" and body["stream"] is True
    assert body["max_tokens"] == 50 and body["temperature"] == 0.5 and body["seed"] == 7
    assert body["tools"] == [TOOL]
    assert body["messages"][2]["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}
    assert body["messages"][3] == {"role": "tool", "content": "{}", "tool_call_id": "call_0"}


def test_closing_the_openai_stream_closes_the_connection() -> None:
    disconnected = asyncio.Event()

    async def run() -> list[str]:
        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            try:
                for index in range(10_000):
                    await response.write(sse(chunk({"content": f"{index} "})))
                    await asyncio.sleep(0.01)
            except (ConnectionResetError, asyncio.CancelledError):
                disconnected.set()
                raise
            return response

        async with endpoint(handler) as base_url:
            model = OpenAIChatModel(base_url, "", "m")
            stream = model.stream([ChatMessage("user", "count")], [], max_new_tokens=10,
                                  temperature=0.0, seed=None)
            texts = [(await anext(stream)).text for _ in range(3)]
            await stream.aclose()  # type: ignore[attr-defined]
            await asyncio.wait_for(disconnected.wait(), timeout=30)
            return texts

    assert asyncio.run(run()) == ["0 ", "1 ", "2 "]
    assert disconnected.is_set()


def test_openai_error_status_is_an_inference_error() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "bad key"}}, status=401)

    async def run() -> None:
        async with endpoint(handler) as base_url:
            model = OpenAIChatModel(base_url, "wrong", "m")
            async for _ in model.stream([ChatMessage("user", "hi")], [], max_new_tokens=5,
                                        temperature=0.0, seed=None):
                pass

    with pytest.raises(InferenceError) as raised:
        asyncio.run(run())
    assert raised.value.upstream is not None and raised.value.upstream.status == 401
    assert "bad key" in (raised.value.detail or "")


def test_unreachable_endpoints_are_service_unavailable() -> None:
    async def drain(model: Any) -> None:
        async for _ in model.stream([ChatMessage("user", "hi")], [], max_new_tokens=5,
                                    temperature=0.0, seed=1):
            pass

    for model in (OpenAIChatModel("http://127.0.0.1:9/v1", "", "m"),
                  TritonChatModel("127.0.0.1:9")):
        with pytest.raises(ServiceUnavailable):
            asyncio.run(drain(model))


def test_settings_choose_the_chat_model() -> None:
    assert isinstance(chat_model(make_settings()), TritonChatModel)
    chosen = chat_model(make_settings(chat_base_url="http://llm.example/v1", chat_model="x"))
    assert isinstance(chosen, OpenAIChatModel)
    assert chosen.url == "http://llm.example/v1/chat/completions"
