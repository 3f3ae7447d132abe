"""``/v1/conversations``: create, read and end sessions (the REST half).

Checks at creation: ``tools`` (OpenAI function shape; each ``parameters`` a
valid JSON Schema of an object, checked with jsonschema's metaschema, whose
patterns the linear-time engine of :mod:`handler.sessions.tools` takes),
``system_prompt`` and the tools together fitting the bundled chat LM's
context (:func:`check_system_message`), ``voice_id`` (a saved voice of the
caller, else a bundled voice or blend of the default model) and ``language``
(a language the session's models handle, see :func:`supported_languages`). A
session ends when it is deleted, and in any case ``session_max_duration_s``
after creation (applied when it is read).
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from jsonschema import Draft202012Validator, SchemaError
from jsonschema.validators import validator_for
from starlette.concurrency import run_in_threadpool

from handler.engines.chat import ChatMessage, hermes_messages
from handler.engines.kokoro import KokoroEngine, VoiceSpecError
from handler.errors import InvalidRequest, NotFound, ValidationItem
from handler.schemas.sessions import (
    Conversation,
    ConversationConfig,
    ConversationCreate,
    ConversationTurn,
    ToolCallRecord,
)
from handler.services.context import RequestContext
from handler.sessions.tools import ToolSchemaError, arguments_validator
from handler.settings import Settings
from handler.storage.base import SessionRecord, SessionStore, utf8_json

SESSION_ID_PREFIX = "conv_"
SESSION_ID_PATTERN = re.compile(f"{SESSION_ID_PREFIX}[0-9a-f]{{32}}")  # prefix + uuid4().hex
STREAM_PATH = "/v1/conversations/{session_id}/stream"
_ISO_639_1 = re.compile(r"^[a-z]{2}$")
# Languages a session can hold, by voice engine. Speech recognition (Whisper) is
# multilingual and the chat model follows its prompt, so the voice decides: the
# Kokoro frontend's G2P (misaki's English dictionaries) phonemises English only.
_ENGINE_LANGUAGES: dict[type, tuple[str, ...]] = {KokoroEngine: ("en",)}
# The bundled chat LM's context (export/chat.py, MAX_CONTEXT) and the tokens a reply
# keeps free of it (handler/sessions/runner.py, REPLY_MAX_NEW_TOKENS); a test checks both.
BUNDLED_CHAT_CONTEXT_TOKENS = 2048
REPLY_TOKENS = 64
# Characters per token of English in SmolLM2's tokenizer: 4.6 in prose, 3.3-3.9 in
# markdown or JSON (docs/sessions.md). The API has no tokenizer, so it counts characters.
CHARACTERS_PER_TOKEN = 4
# The system message (the persona and, for the bundled model, the tools' descriptions)
# may fill half of the prompt; the other half holds the recent turns.
BUNDLED_SYSTEM_CHARS = (BUNDLED_CHAT_CONTEXT_TOKENS - REPLY_TOKENS) // 2 * CHARACTERS_PER_TOKEN
# Largest stored configuration, bytes of compact UTF-8 JSON: a DynamoDB item holds at
# most 400 KB (AWS's item size limit), and the session's other attributes take under
# 1 KB. Only tools' schemas come near it (a system prompt is at most 20,000 characters).
MAX_CONFIG_BYTES = 256 * 1024
# Largest create body read, bytes: a configuration of MAX_CONFIG_BYTES as clients may
# send it, indented or with \u escapes (6 bytes for a character UTF-8 writes in 2-3).
MAX_CREATE_BODY_BYTES = 4 * MAX_CONFIG_BYTES


def _invalid(path: list[str | int], message: str, code: str = "validation_error") -> InvalidRequest:
    where = ".".join(str(p) for p in path)
    return InvalidRequest(
        f"{where}: {message}",
        code=code,
        validation=[ValidationItem([str(p) for p in path], message)],
    )


def supported_languages(engine: object) -> tuple[str, ...]:
    """ISO 639-1 codes a session voiced by ``engine`` can be held in."""
    return _ENGINE_LANGUAGES.get(type(engine), ())


def check_tools(body: ConversationCreate) -> None:
    """Each tool's ``parameters`` is a JSON Schema of an object; names are unique.

    The schema must also compile for the check of the model's arguments
    (:func:`handler.sessions.tools.arguments_validator`): patterns without
    lookaround or backreferences, ``$ref`` within the schema, draft 4 or later.

    Raises:
        InvalidRequest: naming the path, e.g. ``tools.0.function.parameters.properties.x.type``.
    """
    names: set[str] = set()
    for index, tool in enumerate(body.tools):
        base: list[str | int] = ["tools", index, "function"]
        if tool.function.name in names:
            raise _invalid([*base, "name"], f"duplicate tool name {tool.function.name!r}")
        names.add(tool.function.name)
        parameters = tool.function.parameters
        validator = validator_for(parameters, default=Draft202012Validator)
        try:
            validator.check_schema(parameters)
        except SchemaError as error:
            path = [*base, "parameters", *error.absolute_path]
            raise _invalid(path, f"not a valid JSON Schema: {error.message}") from error
        if parameters.get("type") != "object":
            raise _invalid([*base, "parameters", "type"], "the arguments schema must be 'object'")
        try:
            arguments_validator(parameters)
        except ToolSchemaError as error:
            raise _invalid([*base, "parameters", *error.path], error.message) from error


def check_system_message(body: ConversationCreate, settings: Settings) -> None:
    """With the bundled chat LM, the system prompt and tools leave room for the turns.

    The bundled model (``chat_base_url`` unset) reads the persona and the
    tools' descriptions (:func:`handler.engines.chat.hermes_messages`) in one
    system message, kept in every prompt; one too long for its context fails
    every reply. Together they may take :data:`BUNDLED_SYSTEM_CHARS`
    characters. An OpenAI-compatible endpoint's context is not known here;
    its limit is the schema's (20,000 characters of system prompt).

    Raises:
        InvalidRequest: naming ``system_prompt`` when it alone is too long, else ``tools``.
    """
    if settings.chat_base_url:
        return
    limit = (f"this server's chat model (a {BUNDLED_CHAT_CONTEXT_TOKENS:,}-token context) "
             f"takes at most {BUNDLED_SYSTEM_CHARS:,}")
    if len(body.system_prompt) > BUNDLED_SYSTEM_CHARS:
        raise _invalid(["system_prompt"], f"{len(body.system_prompt):,} characters; {limit}")
    tools = [tool.model_dump(mode="json") for tool in body.tools]
    system = hermes_messages([ChatMessage("system", body.system_prompt)], tools)[0]["content"]
    if len(system) > BUNDLED_SYSTEM_CHARS:
        raise _invalid(["tools"], f"the system prompt and the tools' descriptions come to "
                       f"{len(system):,} characters; {limit}")


def check_config_size(config: dict[str, Any]) -> None:
    """The session's configuration fits one storage item (:data:`MAX_CONFIG_BYTES`).

    Raises:
        InvalidRequest: naming ``tools`` (the only part that can be so large).
    """
    size = len(utf8_json(config).encode("utf-8"))
    if size > MAX_CONFIG_BYTES:
        raise _invalid(["tools"], f"the session's configuration comes to {size:,} bytes of "
                       f"JSON; at most {MAX_CONFIG_BYTES:,} (the tools' schemas)")


async def resolve_voice(voice_id: str, ctx: RequestContext) -> tuple[str, object, str]:
    """(model id, engine, canonical voice spec) of a saved voice, bundled voice or blend.

    Raises:
        InvalidRequest: neither a saved voice of the caller nor a valid voice spec
            (code ``voice_not_found``), or a saved voice whose voice its model no
            longer serves (``unknown_voice``), naming ``voice_id``.
        ServiceUnavailable: Triton unreachable.
    """
    saved = await ctx.saved_voice(voice_id)
    if saved is not None and saved.voice is not None:
        model, engine = await ctx.catalog.resolve_named_voices(saved.model, ["voice_id"])
        try:  # checked again: the model may have stopped serving it since it was saved
            return model.id, engine, engine.parse_voice(saved.voice)
        except VoiceSpecError as error:
            raise _invalid(
                ["voice_id"], f"saved voice {voice_id!r}: {error}", "unknown_voice"
            ) from error
    model, engine = await ctx.catalog.resolve_named_voices(None, ["voice_id"])
    try:
        return model.id, engine, engine.parse_voice(voice_id)
    except VoiceSpecError as error:
        raise _invalid(
            ["voice_id"], f"not a saved voice id, bundled voice or blend: {error}",
            "voice_not_found",
        ) from error


def stream_url(public_base: str, request_base: str, session_id: str) -> str:
    """The session's WebSocket URL.

    ``public_base`` (``CONVERSE_PUBLIC_STREAM_URL``, e.g. ``wss://live.example.com``)
    when set, else the request's own base URL with ``http`` -> ``ws`` and
    ``https`` -> ``wss``.
    """
    base = public_base or re.sub(r"^http", "ws", request_base)
    return base.rstrip("/") + STREAM_PATH.format(session_id=session_id)


async def create(body: ConversationCreate, ctx: RequestContext) -> Conversation:
    """Validate and store a new session for the caller's key.

    Raises:
        InvalidRequest: bad tools, system prompt, voice or language (see the module
            docstring), or a configuration too large to store (:func:`check_config_size`).
    """
    check_tools(body)
    check_system_message(body, ctx.settings)
    if not _ISO_639_1.match(body.language):
        raise _invalid(["language"], f"{body.language!r} is not an ISO 639-1 code (e.g. 'en')")
    model_id, engine, voice = await resolve_voice(body.voice_id, ctx)
    languages = supported_languages(engine)
    if body.language not in languages:
        raise _invalid(
            ["language"],
            f"{body.language!r} is not supported by voice {voice!r}; supported: "
            f"{', '.join(languages) or 'none'}",
            "unsupported_language",
        )
    config = body.model_dump(mode="json")
    check_config_size(config)
    storage: SessionStore = ctx.storage
    now = storage.clock()
    record = SessionRecord(
        id=f"{SESSION_ID_PREFIX}{uuid.uuid4().hex}",
        key_id=ctx.key_id,
        config=config,
        model=model_id,
        voice=voice,
        created_at=now,
        expires_at=now + ctx.settings.session_max_duration_s + storage.retention_s,
    )
    await run_in_threadpool(storage.put_session, record)
    return await _view(record, ctx)


async def current(
    storage: SessionStore, key_id: str, session_id: str, max_duration_s: float
) -> SessionRecord | None:
    """The session as it stands now; one past ``max_duration_s`` is ended first.

    Its ``ended_reason`` is then ``max_duration`` and it ended (``ended_at``, the
    start of its retention) at ``created_at + max_duration_s``, however much
    later it is read; None when there is no such session (or the id is not one
    this service issues).
    """
    if SESSION_ID_PATTERN.fullmatch(session_id) is None:
        return None  # never issued; DynamoDB would refuse a key over 1 KiB with an error
    record = await run_in_threadpool(storage.get_session, key_id, session_id)
    if record is None or record.status != "active":
        return record
    end = record.created_at + max_duration_s
    if storage.clock() >= end:
        record = await run_in_threadpool(
            storage.end_session, key_id, session_id, "max_duration", end
        )
    return record


async def _current(session_id: str, ctx: RequestContext) -> SessionRecord | None:
    return await current(ctx.storage, ctx.key_id, session_id, ctx.settings.session_max_duration_s)


async def get(session_id: str, ctx: RequestContext) -> Conversation:
    """The caller's session with its turns.

    Raises:
        NotFound: no such session for this key, or its 30 days after the end have passed.
    """
    record = await _current(session_id, ctx)
    if record is None:
        raise NotFound(f"no conversation {session_id!r}")
    return await _view(record, ctx)


async def end(session_id: str, ctx: RequestContext) -> Conversation:
    """End the caller's session (``deleted``); one that had already ended keeps its reason.

    Raises:
        NotFound: no such session for this key (or past retention).
    """
    if await _current(session_id, ctx) is None:
        raise NotFound(f"no conversation {session_id!r}")
    ended = await run_in_threadpool(ctx.storage.end_session, ctx.key_id, session_id, "deleted")
    if ended is None:
        raise NotFound(f"no conversation {session_id!r}")
    return await _view(ended, ctx)


async def _view(record: SessionRecord, ctx: RequestContext) -> Conversation:
    turns = await run_in_threadpool(ctx.storage.list_turns, record.key_id, record.id)
    return Conversation(
        session_id=record.id,
        status="ended" if record.status == "ended" else "active",
        ended_reason=record.ended_reason,
        config=ConversationConfig.model_validate(record.config),
        model=record.model,
        voice=record.voice,
        created_at=record.created_at,
        ended_at=record.ended_at,
        expires_at=record.expires_at,
        stream_url=stream_url(ctx.settings.public_stream_url, ctx.base_url, record.id),
        turns=[
            ConversationTurn(
                turn_id=t.turn_id,
                role=t.role,
                text=t.text,
                started_at=t.started_at,
                ended_at=t.ended_at,
                audio_ms=t.audio_ms,
                interrupted=t.interrupted,
                played_ms=t.played_ms,
                tool_calls=[ToolCallRecord(**call) for call in t.tool_calls],
                tool_call_id=t.tool_call_id,
                latency_ms=t.latency_ms,
            )
            for t in turns
        ],
    )

