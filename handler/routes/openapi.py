"""The OpenAPI 3.1 document: request bodies, every error each route answers, examples.

Routes read their JSON bodies themselves (auth and size checks first), so the
bodies are added here as ``components.schemas`` entries. FastAPI's default 422
(``HTTPValidationError``) is dropped: no route answers it. Each operation lists
the errors it really answers, in its path's envelope and media type (one table,
:data:`OPERATION_ERRORS`; the envelopes come from :mod:`handler.errors`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from handler.errors import uses_problem_json
from handler.schemas.converse import (
    ConverseRequest,
    ConverseResponse,
    StreamAudio,
    StreamDone,
    StreamMetadata,
)
from handler.schemas.dialogue import (
    DialogueRequest,
    LinkedDialogue,
    SplitResponse,
    TimestampsRequest,
)
from handler.schemas.errors import KalpaError, ModerationError, Problem
from handler.schemas.sessions import ConversationCreate
from handler.schemas.storage import VoiceCreate

API_DESCRIPTION = """Self-hostable conversational speech API served from Triton.

* `POST /v1/converse`, `GET /v1/models`: kalpa-converse; errors in the Kalpa
  envelope `{"error": {"type", "message", "request_id"}}`.
* `POST /v1/audio/conversation` (+ `/with-timestamps`): speechbase; errors as
  RFC 7807 `application/problem+json`.
* `POST /v1/conversations/create`, `GET`/`DELETE /v1/conversations/{session_id}`:
  live sessions (conversational-ai-sessions), Kalpa envelope. Their audio
  stream, `WS /v1/conversations/{session_id}/stream`, is a WebSocket (not
  described by OpenAPI): events, close codes and audio in docs/sessions.md and
  docs/session-events.schema.json.
* Auth: `Authorization: Bearer <key>` or `X-API-Key: <key>`.
* Load balancers: `GET /health` is liveness (200 while the process runs),
  `GET /ready` is readiness (200 when Triton and the model list are ready,
  else 503 with `Retry-After`).
* Busy service: 503 `overloaded` (or 429 `concurrency_limited` for a key over
  its share) with `Retry-After`, answered at once.
"""

REF = "#/components/schemas/{model}"
BODY_MODELS: tuple[type[BaseModel], ...] = (
    ConverseRequest,
    StreamMetadata,
    StreamAudio,
    StreamDone,
    DialogueRequest,
    TimestampsRequest,
    VoiceCreate,
    ConversationCreate,
    SplitResponse,
    LinkedDialogue,
    KalpaError,
    Problem,
    ModerationError,
)
AUTHENTICATED = ("/v1/converse", "/v1/models", "/v1/audio/", "/v1/voices", "/v1/usage",
                 "/v1/uploads", "/v1/conversations")
INFERENCE = {400, 413, 422, 502, 503, 504}
OPERATION_ERRORS: dict[tuple[str, str], set[int]] = {
    ("get", "/ready"): {503},
    ("get", "/v1/models"): {502, 503, 504},
    ("post", "/v1/converse"): INFERENCE,
    ("post", "/v1/audio/conversation"): INFERENCE,
    ("post", "/v1/audio/conversation/with-timestamps"): INFERENCE,
    ("post", "/v1/voices"): {400, 413, 502, 503, 504},
    ("get", "/v1/voices"): {400},
    ("get", "/v1/voices/{voice_id}"): {404},
    ("delete", "/v1/voices/{voice_id}"): {404},
    ("get", "/v1/files/{key}"): {401, 404},
    ("put", "/v1/files/{key}"): {401, 404, 413},
    ("post", "/v1/conversations/create"): {400, 413, 502, 503, 504},
    ("get", "/v1/conversations/{session_id}"): {404},
    ("delete", "/v1/conversations/{session_id}"): {404},
}
DESCRIPTIONS = {
    400: "Invalid request: a rule or cap is broken; nothing was synthesised.",
    401: "Missing or unknown API key (or a bad file-URL signature).",
    404: "Not found.",
    413: "Request body larger than CONVERSE_MAX_REQUEST_BYTES.",
    422: "A turn's text has nothing to speak (or, on /v1/audio/*, moderation blocked it).",
    429: "Rate limit: the key's token bucket is empty, or the key holds its share of a "
    "busy service. Retry-After says when to retry.",
    500: "Internal error (a bug; logged under the request id).",
    502: "The inference server answered with an error.",
    503: "Overloaded (cannot finish before the deadline), or the inference server is "
    "unreachable or not ready; Retry-After says when to retry. On /with-timestamps also "
    "timestamps_unavailable. On /v1/audio/*, moderation failed and fails closed "
    "(the moderation body, reason error_fail_closed). On every route that takes a key, "
    "the API keys secret could not be read.",
    504: "The request did not finish before its deadline (CONVERSE_TRITON_TIMEOUT_S).",
}
RETRY_AFTER = {
    "description": "Seconds to wait before retrying.",
    "schema": {"type": "integer", "minimum": 1},
}
REQUEST_ID = {"description": "The request's id (echoed when the client sent a valid one).",
              "schema": {"type": "string"}}
KALPA_EXAMPLE = {
    "error": {
        "type": "invalid_request",
        "message": "conversation[2]: the open turn already has text and audio; nothing is "
        "left to generate",
        "request_id": "req_0f3c9d2a6b7e4e58a1d2c3b4a5f60718",
    }
}
PROBLEM_EXAMPLE = {
    "type": "/problems/validation_error",
    "title": "Invalid request",
    "status": 400,
    "detail": "turns.1.voice: unknown voice 'alloy'",
    "code": "unknown_voice",
    "validation": [{"path": ["turns", "1", "voice"], "message": "unknown voice 'alloy'"}],
    "turn_index": 1,
    "request_id": "req_0f3c9d2a6b7e4e58a1d2c3b4a5f60718",
}
# Request examples: the specs' own conversations (speechbase's with this service's voices).
CONVERSE_EXAMPLES = {
    "author": {
        "summary": "Author the next turn (kalpa-converse)",
        "value": {
            "conversation": [
                {"speaker": "0", "text": "Did you end up trying that recipe?"},
                {"speaker": "1", "text": "I did — the timing was the hard part."},
                {"speaker": "0"},
            ]
        },
    },
    "contextual_tts": {
        "summary": "Contextual TTS: render exact text, in context (kalpa-converse)",
        "value": {
            "conversation": [
                {"speaker": "0", "text": "Welcome back to the show."},
                {"speaker": "1", "text": "Glad to be here."},
                {"speaker": "0", "text": "Let's pick up where we left off — episode twelve."},
            ]
        },
    },
}
WEEKEND = {
    "model": "kokoro",
    "turns": [
        {"voice": "jf_alpha", "text": "How was your weekend?"},
        {"voice": "jm_kumo", "text": "Good — I finally caught up on sleep."},
        {"voice": "jf_alpha", "text": "Lucky you."},
    ],
    "gapMs": 500,
    "volumeDbfs": -16,
    "output": "mp3",
}
DIALOGUE_EXAMPLES = {
    "weekend": {"summary": "The speechbase conversation", "value": WEEKEND},
    "split": {
        "summary": "Per-turn segments",
        "value": {**WEEKEND, "output": {"format": "mp3", "bitrate": 96}, "split": True},
    },
}
TIMESTAMPS_EXAMPLES = {
    "weekend": {
        "summary": "The speechbase conversation with word timestamps",
        "value": {**WEEKEND, "output": "wav", "timestamps": "on"},
    }
}
VOICE_EXAMPLES = {
    "blend": {
        "summary": "A saved blend",
        "value": {"name": "host", "voice": "jf_alpha*0.7+jm_kumo*0.3"},
    }
}
CONVERSATION_EXAMPLES = {
    "assistant": {
        "summary": "A concierge persona with one tool",
        "value": {
            "voice_id": "jf_alpha",
            "system_prompt": "You are a friendly hotel concierge. Keep answers under two "
            "sentences and confirm before booking anything.",
            "language": "en",
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "book_table",
                        "description": "Book a restaurant table for the guest.",
                        "parameters": {
                            "type": "object",
                            "properties": {
                                "time": {"type": "string", "description": "HH:MM, 24 h"},
                                "guests": {"type": "integer", "minimum": 1},
                            },
                            "required": ["time", "guests"],
                        },
                    },
                }
            ],
            "context_window": 20,
            "max_turns": 40,
        },
    }
}
BODY_EXAMPLES: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/v1/converse"): CONVERSE_EXAMPLES,
    ("post", "/v1/audio/conversation"): DIALOGUE_EXAMPLES,
    ("post", "/v1/audio/conversation/with-timestamps"): TIMESTAMPS_EXAMPLES,
    ("post", "/v1/voices"): VOICE_EXAMPLES,
    ("post", "/v1/conversations/create"): CONVERSATION_EXAMPLES,
}


def ref(model: type[BaseModel]) -> dict[str, str]:
    """A ``$ref`` to ``model``'s entry in ``components.schemas``."""
    return {"$ref": REF.format(model=model.__name__)}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` declaring ``model`` (registered in :data:`BODY_MODELS`) as the body.

    Routes read their body with ``parse_body`` (auth and size checks come
    first), so FastAPI does not see the model; this puts it in the document.
    """
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref(model)}}}
    }


STREAM_DESCRIPTION = """With `"stream": true` (an extension, docs/api.md): Server-Sent Events.
`event: metadata` (StreamMetadata), then `event: audio` (StreamAudio) per chunk in
play order, then `event: done` (StreamDone); a failure after the first chunk ends
the stream with `event: error` (KalpaError). Each `data:` line is one JSON object.
Errors before the first chunk are ordinary error responses."""
STREAM_EXAMPLE = (
    'event: metadata\ndata: {"request_id": "req_0f3c9d2a6b7e4e58a1d2c3b4a5f60718", '
    '"model": "kokoro", "speaker": "0", "format": "pcm_s16le", "sample_rate": 24000, '
    '"num_quantizers": null}\n\n'
    'event: audio\ndata: {"index": 0, "data_b64": "AAABAAIA"}\n\n'
    'event: done\ndata: {"request_id": "req_0f3c9d2a6b7e4e58a1d2c3b4a5f60718", '
    '"text": "Glad to be here.", "usage": {"input_chars": 16, "input_audio_seconds": 0.0, '
    '"output_audio_seconds": 1.2}, "warnings": []}\n\n'
)


def converse_responses() -> dict[int | str, dict[str, Any]]:
    """``responses`` of ``POST /v1/converse``: the JSON reply, or the event stream."""
    return {
        200: {
            "description": f"The completed turn ({ConverseResponse.__name__}). "
            + STREAM_DESCRIPTION,
            "content": {
                "text/event-stream": {
                    "schema": {"type": "string"},
                    "example": STREAM_EXAMPLE,
                }
            },
        }
    }


def _error_response(path: str, status: int) -> dict[str, Any]:
    if uses_problem_json(path):
        content: dict[str, Any] = {
            "application/problem+json": {"schema": ref(Problem), "example": PROBLEM_EXAMPLE}
        }
        if status in (422, 503):  # moderation blocked a turn (422) or failed closed (503)
            content["application/json"] = {"schema": ref(ModerationError)}
    else:
        content = {"application/json": {"schema": ref(KalpaError), "example": KALPA_EXAMPLE}}
    headers: dict[str, Any] = {"X-Request-ID": REQUEST_ID}
    if status in (429, 503):
        headers["Retry-After"] = {**RETRY_AFTER, "required": status == 429}
    return {"description": DESCRIPTIONS[status], "headers": headers, "content": content}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI 3.1 document (built once, then cached on the app)."""
    if app.openapi_schema:
        return app.openapi_schema
    document = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    _, definitions = models_json_schema(
        [(model, "validation") for model in BODY_MODELS], ref_template=REF
    )
    schemas.update(definitions["$defs"])
    document["components"]["securitySchemes"] = {
        "bearerAuth": {"type": "http", "scheme": "bearer", "description": "API key."},
        "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    }
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            responses.pop("422", None)
            statuses = set(OPERATION_ERRORS.get((method, path), set())) | {500}
            if path.startswith(AUTHENTICATED):
                operation["security"] = [{"bearerAuth": []}, {"apiKeyHeader": []}]
                # 503: also the API keys secret unreadable (Secrets Manager throttled).
                statuses |= {401, 429, 503}
            for status in sorted(statuses):
                responses[str(status)] = _error_response(path, status)
            if (method, path) in BODY_EXAMPLES:
                body = operation["requestBody"]["content"]["application/json"]
                body["examples"] = BODY_EXAMPLES[method, path]
    app.openapi_schema = document
    return document
