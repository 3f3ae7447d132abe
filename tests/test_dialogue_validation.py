"""``/v1/audio/conversation`` (+ ``/with-timestamps``): request checks made before any voicing.

``timestamps`` on the plain endpoint, the paths of ``output`` errors, and the
routes' own body limit (the largest valid dialogue, not the process-wide 64 MiB).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from handler.app import create_app
from handler.schemas.converse import MAX_TURN_CHARS, MAX_TURNS
from handler.schemas.dialogue import (
    MAX_BODY_BYTES,
    MAX_MODEL_CHARS,
    MAX_VOICE_CHARS,
    MAX_VOICE_ID_CHARS,
    DialogueRequest,
    Mp3Output,
    TimestampsRequest,
)
from tests.helpers import AUTH, make_settings
from tests.test_conversation_api import problem

PLAIN = "/v1/audio/conversation"
TIMED = "/v1/audio/conversation/with-timestamps"
API_DOCS = Path(__file__).resolve().parent.parent / "docs" / "api.md"
GOOD = {"voice": "jf_alpha", "text": "Fine, thanks."}
JSON_HEADERS = {**AUTH, "content-type": "application/json"}
# Outside the BMP: json.dumps writes it as an escaped surrogate pair, 12 bytes
# for one character, the most JSON spends on a character.
WIDE = "\N{SLIGHTLY SMILING FACE}"


@pytest.mark.parametrize("value", [None, "on", "off"])
def test_timestamps_field_is_rejected_on_the_plain_endpoint(
    client: TestClient, value: str | None
) -> None:
    # speechbase: "the plain /v1/audio/conversation endpoint rejects it"; null is still the field.
    body = {"turns": [GOOD], "timestamps": value}
    error = problem(client.post(PLAIN, json=body, headers=AUTH), 400, "validation_error")
    assert [item["path"] for item in error["validation"]] == [["timestamps"]]
    assert "with-timestamps" in error["validation"][0]["message"]


@pytest.mark.parametrize("path", [PLAIN, TIMED])
@pytest.mark.parametrize(
    ("output", "where"),
    [
        ("ogg", ["output"]),
        ("MP3", ["output"]),
        (5, ["output"]),
        ({"format": "ogg"}, ["output", "format"]),
        ({"bitrate": 96}, ["output", "format"]),
        ({"format": "mp3", "bitrate": "fast"}, ["output", "bitrate"]),
        ({"format": "mp3", "quality": 2}, ["output", "quality"]),
    ],
)
def test_output_errors_name_the_request_fields(
    client: TestClient, path: str, output: Any, where: list[str]
) -> None:
    # One error, at the request's own path: no pydantic union labels such as
    # "literal['wav','mp3','pcm']" or "Mp3Output", no error for the member not meant.
    body = {"turns": [GOOD], "output": output}
    error = problem(client.post(path, json=body, headers=AUTH), 400, "validation_error")
    assert [item["path"] for item in error["validation"]] == [where]


@pytest.mark.parametrize("path", [PLAIN, TIMED])
@pytest.mark.parametrize(
    ("fields", "where"),
    [({"gapMs": "100"}, ["gapMs"]), ({"gapMs": True}, ["gapMs"]),
     ({"volumeDbfs": "-20"}, ["volumeDbfs"]), ({"split": 1}, ["split"]),
     ({"output": {"format": "mp3", "bitrate": "64"}}, ["output", "bitrate"])],
)
def test_values_of_the_wrong_json_type_are_refused(
    client: TestClient, path: str, fields: dict[str, Any], where: list[str]
) -> None:
    """No string read as a number, no boolean or number as another type."""
    body = {"turns": [GOOD], **fields}
    error = problem(client.post(path, json=body, headers=AUTH), 400, "validation_error")
    assert [item["path"] for item in error["validation"]] == [where]


@pytest.mark.parametrize(
    ("output", "audio_format", "kbps"),
    [
        ("wav", "wav", 96),
        ("pcm", "pcm", 96),
        ("mp3", "mp3", 96),
        ({"format": "mp3"}, "mp3", 96),
        ({"format": "mp3", "bitrate": 64}, "mp3", 64),
        (Mp3Output(format="mp3", bitrate=32), "mp3", 32),
    ],
)
def test_output_shapes_accepted(output: Any, audio_format: str, kbps: int) -> None:
    request = DialogueRequest.model_validate({"turns": [GOOD], "output": output})
    assert (request.audio_format, request.mp3_bitrate_kbps) == (audio_format, kbps)


def largest_valid_body(**top: Any) -> bytes:
    """Every field at its cap, every character a 12-byte escape, as json.dumps sends it."""
    turn = {
        "text": WIDE * MAX_TURN_CHARS,
        "voice": WIDE * MAX_VOICE_CHARS,
        "model": WIDE * MAX_MODEL_CHARS,
        "voiceId": WIDE * MAX_VOICE_ID_CHARS,
    }
    body = {
        "model": WIDE * MAX_MODEL_CHARS,
        "turns": [turn] * MAX_TURNS,
        "gapMs": 10_000,
        "volumeDbfs": -60.0,
        "output": {"format": "mp3", "bitrate": 160},
        "split": False,
        **top,
    }
    return json.dumps(body, indent=2).encode()


@pytest.mark.parametrize(
    ("model", "top"), [(DialogueRequest, {}), (TimestampsRequest, {"timestamps": "off"})]
)
def test_largest_valid_body_fits_the_limit(model: type[DialogueRequest], top: Any) -> None:
    body = largest_valid_body(**top)
    model.model_validate_json(body)
    assert len(body) <= MAX_BODY_BYTES


def test_largest_valid_body_is_read(client: TestClient) -> None:
    # Read and parsed, then refused by the service's own rules (a top-level model
    # and per-turn models), not by the size limit.
    response = client.post(PLAIN, content=largest_valid_body(), headers=JSON_HEADERS)
    problem(response, 400, "validation_error")


def chunks(size: int) -> Iterator[bytes]:
    """``size`` bytes in 1 MiB pieces, sent without a Content-Length."""
    while size > 0:
        yield b" " * min(size, 1 << 20)
        size -= 1 << 20


@pytest.mark.parametrize("path", [PLAIN, TIMED])
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_body_over_the_dialogue_limit_is_413_before_parsing(
    client: TestClient, path: str, declared: bool
) -> None:
    # Not JSON: had it been parsed, the answer would be a 400.
    size = MAX_BODY_BYTES + 1
    content = b"{" + b" " * (size - 1) if declared else chunks(size)
    response = client.post(path, content=content, headers=JSON_HEADERS)
    error = problem(response, 413, "payload_too_large")
    assert str(MAX_BODY_BYTES) in error["detail"]


def test_smaller_process_limit_still_applies(triton_url: str) -> None:
    app = create_app(make_settings(triton_url=triton_url, max_request_bytes=2048))
    with TestClient(app, raise_server_exceptions=False) as small:
        body = {"turns": [{"voice": "jf_alpha", "text": "x" * 4096}]}
        error = problem(small.post(PLAIN, json=body, headers=AUTH), 413, "payload_too_large")
    assert "2048" in error["detail"]


def test_docs_state_the_limit() -> None:
    assert f"{MAX_BODY_BYTES:,} bytes" in API_DOCS.read_text()
