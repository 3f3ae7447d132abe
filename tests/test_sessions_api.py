"""``/v1/conversations``: create, read and delete sessions; retention with an injected clock."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from handler.app import create_app
from handler.schemas.sessions import MAX_SYSTEM_PROMPT_CHARS
from handler.sessions.service import MAX_CREATE_BODY_BYTES
from handler.storage.base import TurnRecord
from handler.storage.sqlite import SQLiteStorage
from tests.helpers import API_KEY, AUTH, make_settings, unserved_saved_voice
from tests.test_lambda import FakeContext, http_api_v2_event, load_lambda

OTHER_KEY = "other-key-456"
KEY_ID = hashlib.sha256(API_KEY.encode()).hexdigest()[:16]
DAY = 86400.0
PERSONA = {"voice_id": "jf_alpha", "system_prompt": "You are a terse librarian."}
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}


def tool_with(parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", "parameters": parameters}}


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def api(triton_url: str, clock: Clock) -> Iterator[TestClient]:
    settings = make_settings(triton_url=triton_url, api_keys=f"{API_KEY},{OTHER_KEY}")
    app = create_app(settings)
    app.state.storage = SQLiteStorage(settings.sqlite_path, clock=clock)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def create(api: TestClient, **fields: Any) -> Any:
    return api.post("/v1/conversations/create", json={**PERSONA, **fields}, headers=AUTH)


def test_create_answers_201_with_stored_config_and_stream_url(api: TestClient,
                                                             clock: Clock) -> None:
    response = create(api, tools=[WEATHER], max_turns=6)
    assert response.status_code == 201, response.text
    body = response.json()
    assert re.fullmatch(r"conv_[0-9a-f]{32}", body["session_id"])
    assert body["status"] == "active" and body["ended_reason"] is None
    assert body["config"] == {**PERSONA, "language": "en", "tools": [WEATHER],
                              "context_window": 50, "max_turns": 6}
    assert (body["model"], body["voice"]) == ("kokoro", "jf_alpha*1")
    assert body["created_at"] == clock.now
    assert body["stream_url"] == f"ws://testserver/v1/conversations/{body['session_id']}/stream"
    assert body["turns"] == []
    again = api.get(f"/v1/conversations/{body['session_id']}", headers=AUTH).json()
    assert again == body


def test_public_stream_url_setting_wins(triton_url: str) -> None:
    settings = make_settings(triton_url=triton_url, public_stream_url="wss://live.example.com/")
    with TestClient(create_app(settings)) as client:
        body = client.post("/v1/conversations/create", json=PERSONA, headers=AUTH).json()
    assert body["stream_url"] == (
        f"wss://live.example.com/v1/conversations/{body['session_id']}/stream")


def test_saved_voices_and_blends_are_voices(api: TestClient) -> None:
    saved = api.post("/v1/voices", json={"name": "host", "voice": "jf_alpha*1+jm_kumo*3"},
                     headers=AUTH).json()
    assert create(api, voice_id=saved["id"]).json()["voice"] == "jf_alpha*0.25+jm_kumo*0.75"
    assert create(api, voice_id="jm_kumo*2+jf_alpha*2").json()["voice"] == (
        "jm_kumo*0.5+jf_alpha*0.5")


def error_of(response: Any) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request" and error["request_id"]
    return str(error["message"])


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"voice_id": "alloy"}, "voice_id: not a saved voice id"),
        ({"language": "fr"}, "supported: en"),
        ({"language": "english"}, "language: 'english' is not an ISO 639-1 code"),
        ({"tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object",
                                        "properties": {"x": {"type": "strng"}}}}}]},
         "tools.0.function.parameters.properties.x.type: not a valid JSON Schema"),
        ({"tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "required": "x"}}}]},
         "tools.0.function.parameters.required: not a valid JSON Schema"),
        ({"tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "array"}}}]},
         "tools.0.function.parameters.type: the arguments schema must be 'object'"),
        ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name: duplicate tool name"),
        ({"tools": [{"type": "retrieval"}]}, "tools.0"),
        ({"tools": [{"type": "function", "function": {**WEATHER["function"], "strict": "yes"}}]},
         "tools.0.function.strict"),
        ({"context_window": 0}, "context_window"),
        ({"context_window": True}, "context_window"),
        ({"max_turns": "5"}, "max_turns"),
        ({"max_turns": 0}, "max_turns"),
        ({"system_prompt": ""}, "system_prompt"),
        ({"tools": [tool_with({"type": "object", "properties": {
            "password": {"type": "string", "pattern": "^(?=.*[0-9]).{8,}$"}}})]},
         "tools.0.function.parameters.properties.password.pattern: pattern "
         "'^(?=.*[0-9]).{8,}$' is not supported"),
        ({"tools": [tool_with({"type": "object", "patternProperties": {r"^(x)\1$": {}}})]},
         "tools.0.function.parameters.patternProperties.^(x)\\1$: pattern"),
        ({"tools": [tool_with({"type": "object", "properties": {
            "a": {"$ref": "https://example.com/a.json"}}})]},
         "tools.0.function.parameters: Resource 'https://example.com/a.json'"),
        ({"tools": [tool_with({"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}})]},
         "tools.0.function.parameters: Pointer '/$defs/a' does not exist"),
        ({"tools": [tool_with({"$schema": "http://json-schema.org/draft-03/schema#",
                               "type": "object"})]},
         "tools.0.function.parameters.$schema: 'http://json-schema.org/draft-03/schema#' is "
         "not supported"),
    ],
)
def test_bad_sessions_are_400_naming_the_path(api: TestClient, fields: dict[str, Any],
                                              expected: str) -> None:
    assert expected in error_of(create(api, **fields))


def test_the_system_message_must_leave_the_bundled_chat_model_room_for_turns(
    api: TestClient,
) -> None:
    """Persona and tools, as the bundled model reads them, take at most half its prompt.

    (A 20,000-character persona was accepted, and then every reply failed: it
    needs 4,279 of SmolLM2's tokens, and 1,984 fit.)
    """
    assert create(api, system_prompt="x" * 3968).status_code == 201
    message = error_of(create(api, system_prompt="You are a librarian who answers. " * 606))
    assert message == ("system_prompt: 19,998 characters; this server's chat model (a 2,048-token "
                       "context) takes at most 3,968")
    many = [{"type": "function", "function": {**WEATHER["function"], "name": f"weather_{n}"}}
            for n in range(30)]
    assert create(api, tools=many[:6]).status_code == 201
    assert error_of(create(api, tools=many)).startswith(
        "tools: the system prompt and the tools' descriptions come to ")


def test_an_openai_compatible_chat_endpoint_takes_the_schemas_longest_system_prompt(
    triton_url: str,
) -> None:
    settings = make_settings(triton_url=triton_url, chat_base_url="http://llm.example/v1")
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/conversations/create", headers=AUTH, json={
            **PERSONA, "system_prompt": "x" * MAX_SYSTEM_PROMPT_CHARS})
    assert response.status_code == 201, response.text


def test_tools_too_large_to_store_are_400_and_a_body_over_the_cap_413(triton_url: str) -> None:
    """A session's configuration must fit one DynamoDB item (400 KB); bodies are capped
    before they are parsed."""
    def schema(n: int) -> dict[str, Any]:
        return {"type": "object",
                "properties": {"q": {"type": "string", "description": "x" * 70_000}}}

    tools = [{"type": "function", "function": {"name": f"f{n}", "parameters": schema(n)}}
             for n in range(4)]
    settings = make_settings(triton_url=triton_url, chat_base_url="http://llm.example/v1")
    with TestClient(create_app(settings)) as client:
        too_large = client.post("/v1/conversations/create", headers=AUTH,
                                json={**PERSONA, "tools": tools})
        fits = client.post("/v1/conversations/create", headers=AUTH,
                           json={**PERSONA, "tools": tools[:3]})
        body = client.post("/v1/conversations/create", headers=AUTH,
                           json={**PERSONA, "system_prompt": "x" * MAX_CREATE_BODY_BYTES})
    assert too_large.status_code == 400, too_large.text
    assert "tools: the session's configuration comes to" in error_of(too_large)
    assert fits.status_code == 201, fits.text
    assert body.status_code == 413, body.text


def test_the_system_message_limit_is_derived_from_the_bundled_chat_model() -> None:
    from export.chat import MAX_CONTEXT
    from handler.sessions import service
    from handler.sessions.runner import REPLY_MAX_NEW_TOKENS

    assert service.BUNDLED_CHAT_CONTEXT_TOKENS == MAX_CONTEXT
    assert service.REPLY_TOKENS == REPLY_MAX_NEW_TOKENS
    assert service.BUNDLED_SYSTEM_CHARS == (MAX_CONTEXT - REPLY_MAX_NEW_TOKENS) // 2 * 4 == 3968


def test_a_tool_may_carry_openais_strict_flag(api: TestClient) -> None:
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    response = create(api, tools=[strict, {"type": "function", "function": {"name": "f"}}])
    assert response.status_code == 201, response.text
    stored = api.get(f"/v1/conversations/{response.json()['session_id']}", headers=AUTH).json()
    # Stored as sent: the flag where it was given, no flag where it was not.
    assert stored["config"]["tools"] == [strict, {"type": "function", "function": {
        "name": "f", "description": "", "parameters": {"type": "object", "properties": {}}}}]


def test_auth_and_ownership(api: TestClient) -> None:
    assert api.post("/v1/conversations/create", json=PERSONA).status_code == 401
    session_id = create(api).json()["session_id"]
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    for method in ("get", "delete"):
        response = api.request(method, f"/v1/conversations/{session_id}", headers=other)
        assert response.status_code == 404 and response.json()["error"]["type"] == "not_found"
    assert api.get("/v1/conversations/conv_missing", headers=AUTH).status_code == 404


def test_delete_ends_and_history_stays_30_days(api: TestClient, clock: Clock) -> None:
    session_id = create(api).json()["session_id"]
    storage = api.app.state.storage  # type: ignore[attr-defined]
    storage.put_turn(KEY_ID, session_id, TurnRecord(
        "turn_1", "user", "What time is it?", clock.now, clock.now + 1.5, 1500.0,
        latency_ms={"asr": 180.0}))
    storage.put_turn(KEY_ID, session_id, TurnRecord(
        "turn_2", "assistant", "It is", clock.now + 2, clock.now + 2.4, 400.0, True, 400.0,
        latency_ms={"first_audio": 640.0}))
    clock.now += 10
    deleted = api.delete(f"/v1/conversations/{session_id}", headers=AUTH)
    assert deleted.status_code == 200
    body = deleted.json()
    assert (body["status"], body["ended_reason"]) == ("ended", "deleted")
    assert body["ended_at"] == clock.now and body["expires_at"] == clock.now + 30 * DAY
    assert [t["turn_id"] for t in body["turns"]] == ["turn_1", "turn_2"]
    assert body["turns"][1]["interrupted"] and body["turns"][1]["played_ms"] == 400.0
    assert body["turns"][0]["latency_ms"] == {"asr": 180.0}
    clock.now += 29 * DAY
    assert api.get(f"/v1/conversations/{session_id}", headers=AUTH).json() == body
    assert api.delete(f"/v1/conversations/{session_id}", headers=AUTH).json() == body
    clock.now += 1 * DAY
    assert api.get(f"/v1/conversations/{session_id}", headers=AUTH).status_code == 404
    assert api.delete(f"/v1/conversations/{session_id}", headers=AUTH).status_code == 404


def test_sessions_end_after_their_maximum_length(api: TestClient, clock: Clock) -> None:
    session_id = create(api).json()["session_id"]
    clock.now += api.app.state.settings.session_max_duration_s  # type: ignore[attr-defined]
    body = api.get(f"/v1/conversations/{session_id}", headers=AUTH).json()
    assert (body["status"], body["ended_reason"], body["ended_at"]) == (
        "ended", "max_duration", clock.now)


def test_a_session_first_read_long_after_its_maximum_length_ended_at_that_length(
    api: TestClient, clock: Clock
) -> None:
    """Its end, and so its 30 days of retention, run from the maximum length, not the read."""
    created = create(api).json()
    end = created["created_at"] + api.app.state.settings.session_max_duration_s  # type: ignore[attr-defined]
    clock.now = end + 20 * DAY
    body = api.get(f"/v1/conversations/{created['session_id']}", headers=AUTH).json()
    assert (body["status"], body["ended_reason"]) == ("ended", "max_duration")
    assert body["ended_at"] == end and body["expires_at"] == end + 30 * DAY
    clock.now = end + 30 * DAY
    assert api.get(f"/v1/conversations/{created['session_id']}", headers=AUTH).status_code == 404


def test_stream_path_over_plain_http_is_426(api: TestClient) -> None:
    response = api.get("/v1/conversations/conv_x/stream", headers=AUTH)
    assert response.status_code == 426 and response.headers["upgrade"] == "websocket"
    assert response.json()["error"]["type"] == "invalid_request"



def test_lambda_answers_the_stream_path_without_crashing(triton_url: str) -> None:
    for module in load_lambda(triton_url):
        answer = module.handler(
            http_api_v2_event("GET", "/v1/conversations/conv_x/stream"), FakeContext()
        )
        created = module.handler(http_api_v2_event("POST", "/v1/conversations/create", PERSONA),
                                 FakeContext())
    assert answer["statusCode"] == 426
    assert json.loads(answer["body"])["error"]["type"] == "invalid_request"
    assert created["statusCode"] == 201
    assert json.loads(created["body"])["stream_url"].startswith("wss://api.example.com/")


def test_openapi_documents_the_session_routes(api: TestClient) -> None:
    paths = api.get("/openapi.json").json()["paths"]
    create_op = paths["/v1/conversations/create"]["post"]
    assert {"201", "400", "401", "429"} <= set(create_op["responses"])
    example = create_op["requestBody"]["content"]["application/json"]["examples"]["assistant"]
    assert create(api, **example["value"]).status_code == 201
    assert {"200", "401", "404"} <= set(paths["/v1/conversations/{session_id}"]["delete"]
                                       ["responses"])
    assert "/v1/conversations/{session_id}/stream" not in paths


def test_a_saved_voice_the_model_no_longer_serves_is_400() -> None:
    with unserved_saved_voice("jf_nezumi") as (_, client, voice_id):
        response = client.post("/v1/conversations/create", headers=AUTH, json={
            "voice_id": voice_id, "system_prompt": "You are Pat."})
        assert "voice_id: saved voice" in error_of(response)
        assert "unknown voice 'jf_nezumi'" in error_of(response)
