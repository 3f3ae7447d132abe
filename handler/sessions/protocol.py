"""The live-session event protocol: JSON text events, binary audio, close codes.

Server → client: every event is one JSON text message with ``type``,
``turn_id`` and ``seq`` (per-session sequence number, strictly increasing
across reconnects; a reconnecting client skips events whose ``seq`` it has
seen). Audio is sent as binary messages: each ``response.audio`` event is
followed at once by exactly ``messages`` binary messages of that event's
``turn_id``, in the socket's encoding and sample rate.

Client → server: binary messages are microphone audio in the socket's
encoding (one Opus packet per message for ``opus``); text messages are the
client events below. An invalid client message gets a non-fatal ``error``
event; failures of the socket itself end with a :class:`CloseCode`.

``python -m handler.sessions.protocol`` writes the JSON Schema of both event
families to ``docs/session-events.schema.json`` (tests check it is current).
Naming and where it differs from OpenAI's Realtime API and pipecat:
docs/sessions.md.
"""

from __future__ import annotations

import json
import sys
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from handler.schemas import REQUEST_CONFIG

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "session-events.schema.json"
ENCODINGS = ("pcm16", "mulaw", "opus")
SAMPLE_RATES = (8000, 16000, 24000, 48000)


class CloseCode(IntEnum):
    """WebSocket close codes of ``/v1/conversations/{id}/stream`` (private range 4000-4999).

    4000-4099 reject a query parameter; 44xx/45xx mirror the HTTP status of
    the same failure (4401 as 401, 4404 as 404, ...), so they read at a glance.
    """

    BAD_SAMPLE_RATE = 4001
    BAD_ENCODING = 4002
    BAD_VAD_THRESHOLD = 4003
    UNAUTHORIZED = 4401
    SESSION_NOT_FOUND = 4404
    IDLE_TIMEOUT = 4408
    REPLACED = 4409
    SESSION_ENDED = 4410
    DELETED = 4411
    MAX_DURATION = 4412
    MESSAGE_TOO_BIG = 4413
    MAX_TURNS = 4414
    RATE_LIMITED = 4429
    INTERNAL_ERROR = 4500
    SERVICE_BUSY = 4503


# Why a session ended (``session.ended`` ``reason``, stored ``ended_reason``) -> its close code.
END_REASON_CODES: dict[str, CloseCode] = {
    "deleted": CloseCode.DELETED,
    "idle_timeout": CloseCode.IDLE_TIMEOUT,
    "max_duration": CloseCode.MAX_DURATION,
    "max_turns": CloseCode.MAX_TURNS,
}
EndReason = Literal["deleted", "idle_timeout", "max_duration", "max_turns"]


class _ServerEvent(BaseModel):
    # The server sends every field, defaults included: the schema lists them all as required.
    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)

    turn_id: str | None = Field(
        description="The turn the event belongs to (``turn_<n>``); for session events the "
        "last turn so far, null before the first."
    )
    seq: int = Field(0, ge=0, description="Per-session sequence number, set by the transport.")


class SessionStarted(_ServerEvent):
    """First event on a session's first socket."""

    type: Literal["session.started"] = "session.started"
    session_id: str
    sample_rate: int = Field(description="Input and output sample rate, Hz.")
    encoding: Literal["pcm16", "mulaw", "opus"]
    vad_threshold: float


class SessionResumed(_ServerEvent):
    """First event on a later socket of the same session; ``turn_id`` is the last turn."""

    type: Literal["session.resumed"] = "session.resumed"
    session_id: str
    sample_rate: int = Field(description="Input and output sample rate, Hz.")
    encoding: Literal["pcm16", "mulaw", "opus"]
    vad_threshold: float


class SpeechStarted(_ServerEvent):
    """VAD heard the user start a turn."""

    type: Literal["input.speech_started"] = "input.speech_started"
    audio_start_ms: float = Field(description="Start in the socket's input audio, ms.")


class SpeechStopped(_ServerEvent):
    """VAD heard the user's turn end (after the end-of-speech silence)."""

    type: Literal["input.speech_stopped"] = "input.speech_stopped"
    audio_end_ms: float = Field(description="End in the socket's input audio, ms.")


class InputTranscript(_ServerEvent):
    """The final transcript of a user turn."""

    type: Literal["input.transcript"] = "input.transcript"
    text: str


class ResponseStarted(_ServerEvent):
    """The assistant starts a reply turn."""

    type: Literal["response.started"] = "response.started"
    reply_to: str | None = Field(None, description="The user turn it answers.")


class ResponseTextDelta(_ServerEvent):
    """Reply text as the model writes it."""

    type: Literal["response.text.delta"] = "response.text.delta"
    delta: str


class ResponseAudio(_ServerEvent):
    """Describes the binary audio messages that follow it at once."""

    type: Literal["response.audio"] = "response.audio"
    messages: int = Field(ge=1, description="Binary messages that follow, all of this turn.")
    samples: int = Field(ge=0, description="Samples they hold at the socket's sample rate.")
    offset_ms: float = Field(ge=0, description="Where they start in the reply's audio, ms.")
    duration_ms: float = Field(ge=0, description="How long they play, ms.")


class ResponseDone(_ServerEvent):
    """The reply ended: completed, interrupted by the user (barge-in), or failed."""

    type: Literal["response.done"] = "response.done"
    status: Literal["completed", "interrupted", "failed"]
    played_ms: float | None = Field(
        None, description="Reply audio the client played (its last playback.position), ms."
    )
    text: str = Field("", description="The stored reply text (the heard words if interrupted).")


class ToolCall(_ServerEvent):
    """The model calls a client tool; answer with ``tool.result`` of the same ``call_id``."""

    type: Literal["tool.call"] = "tool.call"
    call_id: str
    name: str
    arguments: dict[str, Any] = Field(description="Valid against the tool's parameters schema.")


class ErrorEvent(_ServerEvent):
    """Something failed; ``fatal`` means the socket closes next."""

    type: Literal["error"] = "error"
    code: str
    message: str
    fatal: bool = False


class SessionEnded(_ServerEvent):
    """The session ended; the socket closes with the reason's close code."""

    type: Literal["session.ended"] = "session.ended"
    reason: EndReason


ServerEvent = Annotated[
    SessionStarted
    | SessionResumed
    | SpeechStarted
    | SpeechStopped
    | InputTranscript
    | ResponseStarted
    | ResponseTextDelta
    | ResponseAudio
    | ResponseDone
    | ToolCall
    | ErrorEvent
    | SessionEnded,
    Field(discriminator="type"),
]


def _type_required(schema: dict[str, Any]) -> None:
    """A client event without ``type`` is refused (it selects the event), so the schema says so."""
    required = schema.setdefault("required", [])
    if "type" not in required:
        required.insert(0, "type")


class _ClientEvent(BaseModel):
    model_config = ConfigDict(**REQUEST_CONFIG, json_schema_extra=_type_required)


# Longest tool.result output, characters: stored as one turn, it must fit a DynamoDB item
# (400 KB) even at 6 bytes a character (a control character escaped in JSON).
MAX_TOOL_OUTPUT_CHARS = 65_536


class ToolResult(_ClientEvent):
    """The client's answer to a ``tool.call``."""

    type: Literal["tool.result"] = "tool.result"
    call_id: str = Field(min_length=1, max_length=128)
    output: str = Field(
        max_length=MAX_TOOL_OUTPUT_CHARS,
        description="The result the model reads (JSON text is customary), at most 65,536 "
        "characters; a longer one is refused with an invalid_event error.",
    )


class ResponseCancel(_ClientEvent):
    """Stop the current reply (as if the user had spoken over it)."""

    type: Literal["response.cancel"] = "response.cancel"
    turn_id: str | None = Field(None, description="The reply to stop; null: the current one.")


class PlaybackPosition(_ClientEvent):
    """How much of a reply's audio the client has played so far."""

    type: Literal["playback.position"] = "playback.position"
    turn_id: str
    played_ms: float = Field(ge=0)


ClientEvent = Annotated[ToolResult | ResponseCancel | PlaybackPosition, Field(discriminator="type")]
SERVER_EVENTS: TypeAdapter[ServerEvent] = TypeAdapter(ServerEvent)
CLIENT_EVENTS: TypeAdapter[ClientEvent] = TypeAdapter(ClientEvent)


def events_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of both event families: ``server_event`` and ``client_event``."""
    server = SERVER_EVENTS.json_schema(mode="serialization", ref_template="#/$defs/{model}")
    client = CLIENT_EVENTS.json_schema(mode="validation", ref_template="#/$defs/{model}")
    definitions = {**server.pop("$defs"), **client.pop("$defs")}
    definitions["ServerEvent"] = server
    definitions["ClientEvent"] = client
    definitions["CloseCode"] = {
        "description": "WebSocket close codes: "
        + ", ".join(f"{code.value} {code.name}" for code in CloseCode),
        "enum": [code.value for code in CloseCode],
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "converse live-session events (WS /v1/conversations/{id}/stream)",
        "description": "Text messages are one event each; audio travels as binary messages "
        "(see docs/sessions.md).",
        "oneOf": [{"$ref": "#/$defs/ServerEvent"}, {"$ref": "#/$defs/ClientEvent"}],
        "$defs": dict(sorted(definitions.items())),
    }


def schema_text() -> str:
    """The schema file's text (2-space JSON, trailing newline)."""
    return json.dumps(events_schema(), indent=2) + "\n"


if __name__ == "__main__":
    SCHEMA_PATH.write_text(schema_text(), encoding="utf-8")
    sys.stdout.write(f"wrote {SCHEMA_PATH}\n")
