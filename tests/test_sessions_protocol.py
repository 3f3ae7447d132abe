"""The session event protocol: the published schema is current and describes the events."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from handler.sessions.protocol import (
    CLIENT_EVENTS,
    SCHEMA_PATH,
    SERVER_EVENTS,
    CloseCode,
    ResponseDone,
    events_schema,
    schema_text,
)


def test_published_schema_is_the_generated_one() -> None:
    # Regenerate with: python -m handler.sessions.protocol
    assert SCHEMA_PATH.read_text(encoding="utf-8") == schema_text()


def test_schema_is_valid_and_checks_events() -> None:
    schema = events_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    done = ResponseDone(turn_id="turn_2", seq=7, status="interrupted", played_ms=420.0)
    validator.validate(json.loads(done.model_dump_json()))
    validator.validate({"type": "playback.position", "turn_id": "turn_2", "played_ms": 420})
    for bad in (
        {"type": "response.done", "turn_id": "turn_2", "seq": 1, "status": "cancelled"},
        {"type": "tool.result", "output": "{}"},
        {"type": "unknown.event"},
    ):
        assert not validator.is_valid(bad), bad


def test_every_server_event_carries_type_turn_id_and_seq() -> None:
    schema = events_schema()
    for ref in schema["$defs"]["ServerEvent"]["oneOf"]:
        definition = schema["$defs"][ref["$ref"].rsplit("/", 1)[1]]
        assert {"type", "turn_id", "seq"} <= set(definition["required"]), ref


@pytest.mark.parametrize("event", [
    {"call_id": "c1", "output": "ok"},
    {"turn_id": "turn_2", "played_ms": 420},
    {"turn_id": None, "seq": 3, "text": "hello"},
])
def test_the_schema_refuses_events_without_a_type_as_the_server_does(
    event: dict[str, Any]
) -> None:
    assert not jsonschema.Draft202012Validator(events_schema()).is_valid(event)
    with pytest.raises(ValidationError):
        CLIENT_EVENTS.validate_python(event)


def test_client_events_parse_by_type_and_reject_unknown_fields() -> None:
    event = CLIENT_EVENTS.validate_json('{"type":"tool.result","call_id":"c1","output":"{}"}')
    assert event.type == "tool.result"
    with pytest.raises(ValidationError):
        CLIENT_EVENTS.validate_json('{"type":"response.cancel","extra":1}')
    with pytest.raises(ValidationError):
        CLIENT_EVENTS.validate_json('{"type":"playback.position","turn_id":"t","played_ms":true}')
    with pytest.raises(ValidationError):
        CLIENT_EVENTS.validate_json('{"type":"tool.result","call_id":"c1","output":{"a":1}}')
    server = SERVER_EVENTS.validate_python({"type": "session.ended", "turn_id": None,
                                            "reason": "deleted"})
    assert server.type == "session.ended"


def test_close_codes_are_private_and_distinct() -> None:
    assert all(4000 <= code <= 4999 for code in CloseCode)
    assert len({int(code) for code in CloseCode}) == len(CloseCode)
