"""``/v1/conversations`` shapes (conversational-ai-sessions.md), the specs' field names.

Tools use OpenAI's function-tool shape, ``{"type": "function", "function":
{"name", "description", "parameters"}}``, with ``parameters`` a JSON Schema
object; the service checks it against JSON Schema's metaschema.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from handler.schemas import REQUEST_CONFIG

MAX_TOOLS = 64
MAX_SYSTEM_PROMPT_CHARS = 20_000


class FunctionDefinition(BaseModel):
    """One callable function: name, what it does, and its arguments' JSON Schema."""

    model_config = REQUEST_CONFIG

    name: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Function name (OpenAI's rule: letters, digits, _ and -, at most 64).",
    )
    description: str = Field("", max_length=4000, description="When the model should call it.")
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="JSON Schema (draft 2020-12) of the arguments object.",
    )
    strict: bool | None = Field(
        None,
        strict=True,
        exclude_if=lambda value: value is None,
        description="OpenAI's flag for schema-exact arguments: passed on to an OpenAI-compatible "
        "chat endpoint; arguments are checked against the schema either way.",
    )


class Tool(BaseModel):
    """A tool the assistant may call mid-conversation (answered by the client)."""

    model_config = REQUEST_CONFIG

    type: Literal["function"] = "function"
    function: FunctionDefinition


class ConversationCreate(BaseModel):
    """``POST /v1/conversations/create``."""

    model_config = REQUEST_CONFIG

    voice_id: str = Field(
        min_length=1,
        max_length=256,
        description="A bundled voice, a blend (name*weight+...) or a saved voice id (/v1/voices).",
    )
    system_prompt: str = Field(
        min_length=1,
        max_length=MAX_SYSTEM_PROMPT_CHARS,
        description="The assistant's persona, tone and behaviour.",
    )
    language: str = Field("en", description="Primary language, ISO 639-1 code.")
    tools: list[Tool] = Field(default_factory=list, max_length=MAX_TOOLS)
    context_window: int = Field(50, ge=1, le=1000, description="Previous turns kept in context.")
    max_turns: int | None = Field(
        None, ge=1, description="Dialogue turns before the session ends; null: unlimited."
    )


class ConversationConfig(ConversationCreate):
    """The stored configuration of a session (the create request, defaults filled in)."""


class ToolCallRecord(BaseModel):
    """A tool call the model made in an assistant turn."""

    id: str
    name: str
    arguments: str = Field(description="The arguments as JSON text.")
    text_offset: int = Field(
        0, ge=0, description="Characters of the turn's text the model wrote before the call "
        "(in a cut-off reply, of the words heard); the text after it was written with the "
        "result."
    )


class ConversationTurn(BaseModel):
    """One dialogue turn."""

    turn_id: str = Field(description="turn_<n>, n increasing within the session.")
    role: Literal["user", "assistant", "tool"]
    text: str = Field(
        description="User transcript, assistant text (the heard words when interrupted), "
        "or the tool result."
    )
    started_at: float = Field(description="Unix seconds.")
    ended_at: float | None = Field(description="Unix seconds; null while in progress.")
    audio_ms: float = Field(description="Audio in the turn, milliseconds.")
    interrupted: bool = Field(description="True when the user cut the reply off.")
    played_ms: float | None = Field(description="Reply audio the client played, milliseconds.")
    tool_calls: list[ToolCallRecord]
    tool_call_id: str | None = Field(description="For a tool turn: the call it answers.")
    latency_ms: dict[str, float] = Field(
        description="Latency figures of the turn, milliseconds (e.g. asr, first_token, "
        "first_audio)."
    )


class Conversation(BaseModel):
    """A session: configuration, status and the ordered turns."""

    session_id: str = Field(description="conv_<32 hex>.")
    status: Literal["active", "ended"]
    ended_reason: str | None = Field(
        description="deleted, max_turns, idle_timeout or max_duration; null while active."
    )
    config: ConversationConfig
    model: str = Field(description="The voice model that speaks the replies.")
    voice: str = Field(description="The voice, in the model's canonical form.")
    created_at: float = Field(description="Unix seconds.")
    ended_at: float | None = Field(description="Unix seconds; null while active.")
    expires_at: float | None = Field(
        description="Unix seconds after which the session is gone (30 days after it ended)."
    )
    stream_url: str = Field(description="WebSocket URL of the session's audio stream.")
    turns: list[ConversationTurn]
