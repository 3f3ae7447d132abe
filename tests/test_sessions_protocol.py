"""The session event protocol: the published schema is current and describes the events."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from handler.sessions import tools
from handler.sessions.protocol import (
    CLIENT_EVENTS,
    SCHEMA_PATH,
    SERVER_EVENTS,
    CloseCode,
    ResponseDone,
    events_schema,
    schema_text,
)
from handler.sessions.tools import ToolCallError, checked_arguments


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


def test_a_tool_result_longer_than_the_limit_is_refused() -> None:
    def result(output: str) -> str:
        return json.dumps({"type": "tool.result", "call_id": "c1", "output": output},
                          ensure_ascii=False)

    assert CLIENT_EVENTS.validate_json(result("€" * 65_536)).type == "tool.result"
    with pytest.raises(ValidationError, match="65536 characters"):
        CLIENT_EVENTS.validate_json(result("€" * 65_537))


def test_close_codes_are_private_and_distinct() -> None:
    assert all(4000 <= code <= 4999 for code in CloseCode)
    assert len({int(code) for code in CloseCode}) == len(CloseCode)


# tool.call arguments: checked against the tool's schema (handler/sessions/tools.py), on the
# event loop, so in bounded time whatever the schema and the arguments.

LOOKUP = [{"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object",
    "properties": {"q": {"type": "string", "pattern": "^(a+)+$"}},
    "patternProperties": {"^(b+)+$": {"type": "integer"}},
    "additionalProperties": False,
}}}]
EVALUATED = [{"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object",
    "allOf": [{"patternProperties": {"^(b+)+$": {"type": "integer"}}}],
    "unevaluatedProperties": False,
}}}]


class NoBacktracking:
    """Stands in for ``re`` in jsonschema's keywords: a pattern must not reach Python's engine."""

    def search(self, pattern: str, text: str) -> None:
        raise AssertionError(f"Python's backtracking re matched {pattern!r} against the arguments")


def test_tool_arguments_are_matched_without_backtracking(monkeypatch: pytest.MonkeyPatch) -> None:
    """``(a+)+`` against 5,000 a and a ``!``: Python's ``re`` would try 2^5000 ways."""
    for module in (jsonschema._keywords, jsonschema._utils, jsonschema._legacy_keywords):
        monkeypatch.setattr(module, "re", NoBacktracking())
    near_miss = "a" * 5000 + "!"
    with pytest.raises(ToolCallError, match=r"at q: .* does not match"):
        checked_arguments("lookup", json.dumps({"q": near_miss}), LOOKUP)
    with pytest.raises(ToolCallError, match="Additional properties"):
        checked_arguments("lookup", json.dumps({"b" * 5000 + "!": 1}), LOOKUP)
    with pytest.raises(ToolCallError, match="Unevaluated properties"):
        checked_arguments("lookup", json.dumps({"b" * 5000 + "!": 1}), EVALUATED)
    valid = {"q": "a" * 5000, "b" * 5000: 1}
    assert checked_arguments("lookup", json.dumps(valid), LOOKUP) == valid
    assert checked_arguments("lookup", json.dumps({"bb": 2}), EVALUATED) == {"bb": 2}


def test_tool_arguments_over_the_limit_or_nested_too_deeply_are_refused_unchecked() -> None:
    over = json.dumps({"q": "a" * 16_384})
    with pytest.raises(ToolCallError, match="at most 16384"):
        checked_arguments("lookup", over, LOOKUP)
    deep = '{"q": ' + "[" * 5000 + "]" * 5000 + "}"
    assert len(deep) <= 16_384
    with pytest.raises(ToolCallError, match="nested too deeply"):
        checked_arguments("lookup", deep, LOOKUP)


def test_tool_patterns_are_ecma_262_without_lookaround_or_backreferences() -> None:
    def tool(pattern: str) -> list[dict[str, object]]:
        return [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"x": {"type": "string", "pattern": pattern}}}}}]

    assert checked_arguments("f", '{"x": "2026-11-02"}', tool(r"^\d{4}-\d{2}-\d{2}$"))
    with pytest.raises(ToolCallError, match="at x"):  # ECMA-262: \d is [0-9] (re: any digit)
        checked_arguments("f", '{"x": "\u0661\u0662"}', tool(r"^\d+$"))
    for unsupported in (r"^(?=.*[A-Z]).+$", r"^(a)\1$"):
        with pytest.raises(tools.ToolSchemaError, match="not supported") as raised:
            tools.arguments_validator(tool(unsupported)[0]["function"]["parameters"])
        assert raised.value.path == ["properties", "x", "pattern"]
        # A session created before such schemas were refused: the call fails, the session goes on.
        with pytest.raises(ToolCallError, match="cannot be used"):
            checked_arguments("f", '{"x": "A"}', tool(unsupported))
