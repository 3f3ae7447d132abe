"""Chat LMs for live sessions: the bundled one in Triton, or any OpenAI-compatible endpoint.

Both stream a reply as :class:`ChatDelta` items (text pieces as they are
generated, and whole tool calls) through one protocol, :class:`ChatModel`.
Cancelling the consuming task, or ``aclose()`` on the iterator, ends the
generation where it runs: the gRPC stream to Triton is cancelled (the
decoupled ``chat`` model sees ``request.is_cancelled()`` and stops decoding),
or the HTTP response is closed.

Tools with the bundled SmolLM2: its chat template (ChatML) has no tool
format, so tools are described in the system prompt in the Hermes style
(``<tools>`` JSON, calls written as ``<tool_call>{"name": ..., "arguments":
{...}}</tool_call>``, results given back as ``<tool_response>``) and the
reply's text is parsed by :class:`ToolCallParser`. A 135M model follows that
format only now and then (docs/sessions-models.md); a strong endpoint through
:class:`OpenAIChatModel` uses the API's native ``tools``.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import httpx
import numpy as np
import tritonclient.grpc.aio as triton_grpc
from httpx_sse import SSEError, aconnect_sse

from handler.errors import InferenceError, ServiceUnavailable, Upstream
from handler.settings import Settings
from handler.triton import grpc_inference_error, infer_inputs

CHAT_MODEL = "chat"
# SmolLM2-135M-Instruct loops on one sentence when decoding greedily; a CTRL
# repetition penalty of ~1.3 gives fluent replies (docs/sessions-models.md).
DEFAULT_REPETITION_PENALTY = 1.3
DEFAULT_TOP_K = 40
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_PROMPT = (
    "You may call functions to help with the user's request. The functions are "
    "described as JSON Schema inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n"
    "To call one, write only this, with the arguments as a JSON object:\n"
    '<tool_call>{{"name": "<function name>", "arguments": {{...}}}}</tool_call>\n'
    "The result comes back inside <tool_response></tool_response>."
)


@dataclass(frozen=True)
class ToolCall:
    """A function call the model made: ``arguments`` is the JSON text as the model wrote it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatMessage:
    """One message of the conversation sent to the model.

    ``role``: ``system``, ``user``, ``assistant`` or ``tool``; an assistant
    message may carry the ``tool_calls`` it made, a ``tool`` message answers
    the call ``tool_call_id``.
    """

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True)
class ChatDelta:
    """One streamed item of a reply: a piece of text, or one complete tool call."""

    text: str = ""
    tool_call: ToolCall | None = None


class ChatModel(Protocol):
    """A chat LM that streams its reply."""

    def stream(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[dict[str, Any]],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int | None,
    ) -> AsyncGenerator[ChatDelta, None]:
        """Stream the reply to ``messages``.

        Args:
            messages: the conversation, oldest first (system prompt first).
            tools: OpenAI function tools ``{"type": "function", "function": {name,
                description, parameters}}``; empty for none.
            max_new_tokens: most tokens generated.
            temperature: sampling temperature (0: greedy).
            seed: sampling seed; None: a random one.

        Raises (while iterating):
            ServiceUnavailable: the model's server is unreachable.
            InferenceError: the model's server answered with an error.
        """
        ...


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser:
    """Split a streamed reply into text and Hermes-style ``<tool_call>{json}</tool_call>`` calls.

    Text is passed on as soon as it cannot be the start of a ``<tool_call>``
    tag; the text of a call is held until its closing tag. A call whose body
    is not a JSON object with a string ``name`` is passed on as text; so is an
    unclosed call when the reply ends.
    """

    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, text: str) -> list[ChatDelta]:
        """Deltas that ``text`` (the next piece of the reply) completes."""
        self._buffer += text
        deltas: list[ChatDelta] = []
        while self._buffer:
            start = self._buffer.find(TOOL_CALL_OPEN)
            if start < 0:
                keep = _partial_suffix(self._buffer, TOOL_CALL_OPEN)
                ready, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[
                    len(self._buffer) - keep:]
                if ready:
                    deltas.append(ChatDelta(text=ready))
                break
            if start > 0:
                deltas.append(ChatDelta(text=self._buffer[:start]))
                self._buffer = self._buffer[start:]
            end = self._buffer.find(TOOL_CALL_CLOSE)
            if end < 0:
                break
            body = self._buffer[len(TOOL_CALL_OPEN):end]
            raw = self._buffer[: end + len(TOOL_CALL_CLOSE)]
            self._buffer = self._buffer[end + len(TOOL_CALL_CLOSE):]
            call = _parse_call(body)
            deltas.append(ChatDelta(tool_call=call) if call else ChatDelta(text=raw))
        return deltas

    def finish(self) -> list[ChatDelta]:
        """What is left when the reply ends, as text."""
        rest, self._buffer = self._buffer, ""
        return [ChatDelta(text=rest)] if rest else []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def _parse_call(body: str) -> ToolCall | None:
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return ToolCall(id=_call_id(), name=call["name"], arguments=text)


def hermes_messages(
    messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]]
) -> list[dict[str, str]]:
    """``messages`` as plain ``{role, content}`` dicts for a template without a tool format.

    Tools are described in the system message (:data:`TOOL_PROMPT`, appended to
    the first system message or added as one), an assistant's calls are
    written as ``<tool_call>`` text after its content, and a tool result is
    wrapped in ``<tool_response>`` (Hermes function-calling format,
    NousResearch/Hermes-Function-Calling).
    """
    rendered = []
    for message in messages:
        content = message.content
        for call in message.tool_calls:
            body = json.dumps({"name": call.name, "arguments": json.loads(call.arguments or "{}")})
            content += f"{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}"
        if message.role == "tool":
            content = f"<tool_response>{content}</tool_response>"
        rendered.append({"role": message.role, "content": content})
    if tools:
        described = TOOL_PROMPT.format(
            tools="\n".join(json.dumps(tool.get("function", tool)) for tool in tools)
        )
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": f"{rendered[0]['content']}\n\n{described}"}
        else:
            rendered.insert(0, {"role": "system", "content": described})
    return rendered


class TritonChatModel:
    """The bundled chat LM: Triton's decoupled ``chat`` model over gRPC streaming.

    Args:
        grpc_url: ``host:port`` of Triton's gRPC endpoint.
        repetition_penalty: CTRL penalty (>= 1) on every token already in the context.
        top_k: sampling keeps the ``top_k`` most likely tokens (0: all).
    """

    def __init__(
        self,
        grpc_url: str,
        repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
        top_k: int = DEFAULT_TOP_K,
    ) -> None:
        self.grpc_url = grpc_url
        self.repetition_penalty = repetition_penalty
        self.top_k = top_k

    def _inputs(
        self, messages: list[dict[str, str]], max_new_tokens: int, temperature: float,
        seed: int,
    ) -> list[triton_grpc.InferInput]:
        values = {
            "MESSAGES": np.array([json.dumps(messages).encode()], dtype=np.object_),
            "TEMPERATURE": np.array([temperature], np.float32),
            "TOP_K": np.array([self.top_k], np.int32),
            "REPETITION_PENALTY": np.array([self.repetition_penalty], np.float32),
            "MAX_NEW_TOKENS": np.array([max_new_tokens], np.int32),
            "SEED": np.array([seed], np.int64),
        }
        return infer_inputs(triton_grpc.InferInput, values)

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[dict[str, Any]],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int | None,
    ) -> AsyncGenerator[ChatDelta, None]:
        """Stream the reply (see :class:`ChatModel`); tools as in :func:`hermes_messages`."""
        seed = random.SystemRandom().randrange(2**31) if seed is None else seed
        inputs = self._inputs(hermes_messages(messages, tools), max_new_tokens, temperature, seed)

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": CHAT_MODEL, "inputs": inputs}

        parser = ToolCallParser()
        client = triton_grpc.InferenceServerClient(self.grpc_url)
        responses = client.stream_infer(requests())
        try:
            async for result, error in responses:
                if error is not None:
                    raise grpc_inference_error(CHAT_MODEL, error)
                for delta in parser.feed(result.as_numpy("TEXT")[0].decode("utf-8")):
                    yield delta
                if result.as_numpy("FINISH_REASON") is not None:
                    break
            for delta in parser.finish():
                yield delta
        except grpc.aio.AioRpcError as error:
            raise ServiceUnavailable(
                "the inference server is unreachable; retry later",
                detail=f"chat stream at {self.grpc_url}: {error.code()} {error.details()}",
                upstream=Upstream("triton", "UNAVAILABLE"),
            ) from error
        finally:
            responses.cancel()
            await client.close()


class OpenAIChatModel:
    """Any OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint, streamed (SSE).

    Args:
        base_url: API base, e.g. ``https://api.openai.com/v1``.
        api_key: sent as ``Authorization: Bearer``; empty sends none.
        model: the ``model`` field.
        timeout_s: connect/read timeout of the HTTP call, seconds.
        transport: an ``httpx`` transport (tests); None for the network.
    """

    PROVIDER = "openai-compatible"

    def __init__(
        self,
        base_url: str,
        api_key: str,
        model: str,
        timeout_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key = api_key
        self.model = model
        self.timeout_s = timeout_s
        self.transport = transport

    def _body(
        self, messages: Sequence[ChatMessage], tools: Sequence[dict[str, Any]],
        max_new_tokens: int, temperature: float, seed: int | None,
    ) -> dict[str, Any]:
        rendered: list[dict[str, Any]] = []
        for message in messages:
            entry: dict[str, Any] = {"role": message.role, "content": message.content}
            if message.tool_calls:
                entry["tool_calls"] = [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.name, "arguments": c.arguments}}
                    for c in message.tool_calls
                ]
            if message.tool_call_id is not None:
                entry["tool_call_id"] = message.tool_call_id
            rendered.append(entry)
        body: dict[str, Any] = {
            "model": self.model, "messages": rendered, "stream": True,
            "max_tokens": max_new_tokens, "temperature": temperature,
        }
        if seed is not None:
            body["seed"] = seed
        if tools:
            body["tools"] = list(tools)
        return body

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        tools: Sequence[dict[str, Any]],
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int | None,
    ) -> AsyncGenerator[ChatDelta, None]:
        """Stream the reply (see :class:`ChatModel`).

        Text comes from ``choices[0].delta.content``; tool calls are assembled
        from the ``delta.tool_calls`` fragments (by ``index``) and yielded
        when the stream ends.
        """
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = self._body(messages, tools, max_new_tokens, temperature, seed)
        calls: dict[int, dict[str, str]] = {}
        async with httpx.AsyncClient(timeout=self.timeout_s, transport=self.transport) as client:
            try:
                async with aconnect_sse(client, "POST", self.url, json=body,
                                        headers=headers) as source:
                    if source.response.status_code != 200:
                        await source.response.aread()
                        raise self._error(source.response)
                    async for event in source.aiter_sse():
                        if event.data.strip() == "[DONE]":
                            break
                        for choice in event.json().get("choices", [])[:1]:
                            delta = choice.get("delta") or {}
                            if delta.get("content"):
                                yield ChatDelta(text=delta["content"])
                            for fragment in delta.get("tool_calls") or []:
                                _merge_fragment(calls, fragment)
            except (httpx.TransportError, SSEError) as error:
                raise ServiceUnavailable(
                    "the chat model is unreachable; retry later",
                    detail=f"chat endpoint {self.url}: {error!r}",
                    upstream=Upstream(self.PROVIDER, "UNAVAILABLE"),
                ) from error
            except ValueError as error:
                raise InferenceError(
                    "the chat model sent an unreadable stream",
                    detail=f"chat endpoint {self.url}: {error}",
                    upstream=Upstream(self.PROVIDER, "BAD_STREAM"),
                ) from error
        for _, call in sorted(calls.items()):
            yield ChatDelta(tool_call=ToolCall(
                id=call["id"] or _call_id(), name=call["name"], arguments=call["arguments"]
            ))

    def _error(self, response: httpx.Response) -> InferenceError:
        return InferenceError(
            f"the chat model answered HTTP {response.status_code}",
            detail=f"chat endpoint {self.url}: {response.text[:500]}",
            upstream=Upstream(self.PROVIDER, str(response.status_code), response.status_code),
        )


def _merge_fragment(calls: dict[int, dict[str, str]], fragment: dict[str, Any]) -> None:
    """Add one streamed ``delta.tool_calls[i]`` fragment to the call it continues."""
    call = calls.setdefault(int(fragment.get("index", 0)), {"id": "", "name": "",
                                                            "arguments": ""})
    call["id"] = fragment.get("id") or call["id"]
    function = fragment.get("function") or {}
    call["name"] += function.get("name") or ""
    call["arguments"] += function.get("arguments") or ""


def chat_model(settings: Settings) -> ChatModel:
    """The configured chat LM: ``chat_base_url`` set -> OpenAI-compatible, else Triton's."""
    if settings.chat_base_url:
        return OpenAIChatModel(settings.chat_base_url, settings.chat_api_key, settings.chat_model)
    return TritonChatModel(settings.triton_grpc_url)
