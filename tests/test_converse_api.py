"""``/v1/converse`` and ``/v1/models`` against every kalpa-converse rule and cap."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from devtools.fake_triton import FakeTriton
from handler.app import create_app
from tests.helpers import AMOUNTS, AUTH, make_settings, tone, wav_b64

HISTORY = [
    {"speaker": "0", "text": "Welcome back to the show."},
    {"speaker": "1", "text": "Glad to be here."},
]


def post(client: TestClient, body: Any, headers: dict[str, str] | None = None) -> Any:
    return client.post("/v1/converse", json=body, headers=AUTH if headers is None else headers)


def assert_kalpa_error(response: Any, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type
    assert error["request_id"] == response.headers["x-request-id"]
    assert error["message"]
    return dict(error)


def test_models_lists_kokoro_with_speakers_and_voices(client: TestClient) -> None:
    response = client.get("/v1/models", headers=AUTH)
    assert response.status_code == 200
    (model,) = response.json()["data"]
    assert model["id"] == "kokoro" and model["default"] is True
    assert model["speakers"] == ["0", "1"]
    assert model["modes"] == ["tts", "converse", "author"]
    assert model["sample_rate"] == 24_000 and model["num_quantizers"] is None
    assert {"jf_alpha", "jm_kumo"} <= set(model["voices"])


def test_contextual_tts_reply(client: TestClient) -> None:
    text = "Let's pick up where we left off — episode twelve."
    response = post(client, {"conversation": [*HISTORY, {"speaker": "0", "text": text}]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["request_id"] == response.headers["x-request-id"]
    assert body["model"] == "kokoro"
    reply = body["reply"]
    assert reply["speaker"] == "0" and reply["text"] == text
    assert reply["audio"]["format"] == "wav" and reply["audio"]["sample_rate"] == 24_000
    assert reply["audio"]["num_quantizers"] is None
    samples, rate = sf.read(io.BytesIO(base64.b64decode(reply["audio"]["data_b64"])))
    assert rate == 24_000
    usage = body["usage"]
    assert usage["input_chars"] == sum(len(t["text"]) for t in HISTORY) + len(text)
    assert usage["input_audio_seconds"] == 0
    assert usage["output_audio_seconds"] == pytest.approx(len(samples) / 24_000, abs=1e-3)


def test_history_audio_is_metered_any_rate_stereo_and_data_uri(client: TestClient) -> None:
    stereo = np.stack([tone(1.5, 16_000), tone(1.5, 16_000)], axis=1)
    history = [
        {"speaker": "0", "audio_wav_b64": wav_b64(stereo, 16_000, data_uri=True)},
        {"speaker": "1", "text": "Nice.", "audio_wav_b64": wav_b64(tone(0.5, 44_100), 44_100)},
    ]
    response = post(client, {"conversation": [*history, {"speaker": "0", "text": "Thanks."}]})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["input_audio_seconds"] == pytest.approx(2.0, abs=1e-3)


def test_client_request_id_is_echoed(client: TestClient) -> None:
    response = client.get("/v1/models", headers={**AUTH, "X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"


def test_speed_param_changes_duration(client: TestClient) -> None:
    conversation = [{"speaker": "1", "text": "The quick brown fox jumps over the lazy dog."}]
    slow = post(client, {"conversation": conversation, "params": {"speed": 0.7}}).json()
    fast = post(client, {"conversation": conversation, "params": {"speed": 1.4}}).json()
    assert slow["usage"]["output_audio_seconds"] > 1.3 * fast["usage"]["output_audio_seconds"]


OPEN = {"speaker": "0", "text": "Hello."}
AUDIO = wav_b64(tone(0.2), 24_000)


def encoded_wav(sample_rate: int, subtype: str = "PCM_16") -> str:
    """Base64 of a 2,000-sample WAV file at ``sample_rate`` Hz in ``subtype``."""
    buffer = io.BytesIO()
    sf.write(buffer, tone(2000 / sample_rate, sample_rate), sample_rate, format="WAV",
             subtype=subtype)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"conversation": []}, 400, "conversation"),
        ({}, 400, "conversation"),
        ({"conversation": [OPEN] * 65}, 400, "64"),
        ({"conversation": [{"speaker": "0", "text": "x" * 8001}]}, 400, "8000"),
        ({"conversation": [{"speaker": "0"}, OPEN]}, 400, "history turn"),
        ({"conversation": [{"speaker": "0", "text": "  "}, OPEN]}, 400, "history turn"),
        ({"conversation": [{"speaker": "0", "text": "Hi.", "audio_wav_b64": AUDIO}]}, 400,
         "nothing is left"),
        ({"conversation": [{"speaker": "0", "audio_wav_b64": AUDIO}]}, 400, "audio only"),
        ({"conversation": [{"speaker": "speaker_0", "text": "Hi."}]}, 400, "speaker label"),
        ({"conversation": [{"speaker": "2", "text": "Hi."}]}, 400, "speaker label"),
        ({"conversation": [{"speaker": "0", "audio_wav_b64": "not base64!"}, OPEN]}, 400,
         "base64"),
        ({"conversation": [{"speaker": "0", "audio_wav_b64": "UklGRiQAAABXQVZF"}, OPEN]}, 400,
         "conversation[0]"),
        # 2,000 samples at 1 Hz would resample to 32 million at 16 kHz: refused unread.
        ({"conversation": [{"speaker": "0", "audio_wav_b64": encoded_wav(1)}, OPEN]}, 400,
         "sample rate 1 Hz"),
        ({"conversation": [{"speaker": "0", "audio_wav_b64": encoded_wav(8000, "GSM610")},
                           OPEN]}, 400, "encoding cannot be read"),
        ({"conversation": [OPEN], "model": "nope"}, 400, "unknown model"),
        ({"conversation": [OPEN], "params": {"temperature": 0.5}}, 400, "temperature"),
        ({"conversation": [OPEN], "params": {"speed": 3.0}}, 400, "speed"),
        ({"conversation": [OPEN], "params": {"top_k": 0}}, 400, "top_k"),
        ({"conversation": [OPEN], "extra": 1}, 400, "extra"),
        # JSON types are kept: no string read as a number, no boolean as an integer.
        ({"conversation": [OPEN], "params": {"speed": "1.1"}}, 400, "speed"),
        ({"conversation": [OPEN], "stream": 1}, 400, "stream"),
        ({"conversation": [{"speaker": "0", "text": 5}]}, 400, "text"),
    ],
)
def test_invalid_requests(client: TestClient, body: Any, status: int, needle: str) -> None:
    error = assert_kalpa_error(post(client, body), status, "invalid_request")
    assert needle.lower() in error["message"].lower()


def test_history_audio_at_every_supported_rate_and_encoding_is_heard(client: TestClient) -> None:
    """Any sample rate in 8-192 kHz and any encoding soundfile reads are accepted."""
    readable = ["PCM_16", "PCM_24", "PCM_32", "PCM_U8", "FLOAT", "DOUBLE", "ULAW", "ALAW",
                "IMA_ADPCM", "MS_ADPCM"]
    history = [{"speaker": "0", "text": "Hi.", "audio_wav_b64": encoded_wav(rate, subtype)}
               for rate, subtype in [(8000, "PCM_16"), (192_000, "PCM_16"),
                                     *((16_000, s) for s in readable)]]
    response = post(client, {"conversation": [*history, OPEN]})
    assert response.status_code == 200, response.text


def test_a_blank_text_beside_audio_is_replaced_by_the_transcript(
    client: TestClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """History text of only spaces counts as none: the audio's transcript is what is heard."""
    import handler.services.converse as service

    async def transcribe(triton: Any, samples: np.ndarray) -> tuple[str, list[Any]]:
        return "the bridge is closed", []

    prompts: list[list[tuple[str, str]]] = []

    async def author_turn(triton: Any, history: list[tuple[str, str]], speaker: str,
                          params: Any) -> str:
        prompts.append(history)
        return "Oh no."

    monkeypatch.setattr(service, "transcribe", transcribe)
    monkeypatch.setattr(service, "author_turn", author_turn)
    spoken = {"speaker": "0", "text": "   ", "audio_wav_b64": wav_b64(tone(1.0), 24_000)}
    response = post(client, {"conversation": [spoken, {"speaker": "1"}]})
    assert response.status_code == 200, response.text
    assert prompts == [[("0", "the bridge is closed")]]


def test_base64_wrapped_into_mime_lines_is_accepted_up_to_the_cap() -> None:
    from handler.schemas.converse import MAX_TURN_AUDIO_BYTES, Turn
    from handler.services.turn_input import decode_turn_audio

    header = base64.b64decode(wav_b64(np.zeros(1, np.float32), 24_000))[:44]
    wrapped = base64.encodebytes(header + bytes(MAX_TURN_AUDIO_BYTES - len(header))).decode()
    wrapped = wrapped.replace("\n", "\r\n")
    turn = Turn(speaker="0", audio_wav_b64=wrapped)
    assert decode_turn_audio(str(turn.audio_wav_b64), 0).samples.size > 0


def test_amounts_and_years_over_the_voices_token_limit_are_voiced(client: TestClient) -> None:
    """174 characters that Kokoro's frontend turns into more than its 510 phoneme tokens."""
    response = post(client, {"conversation": [{"speaker": "0", "text": AMOUNTS}]})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["output_audio_seconds"] > 5.0


def test_audio_cap_is_checked_on_base64_length() -> None:
    from handler.errors import InvalidRequest
    from handler.schemas.converse import MAX_TURN_AUDIO_BYTES
    from handler.services.turn_input import decode_turn_audio

    oversized = "A" * ((MAX_TURN_AUDIO_BYTES // 3 + 1) * 4)
    with pytest.raises(InvalidRequest, match="25 MiB"):
        decode_turn_audio(oversized, 3)


def test_not_json_is_invalid_request(client: TestClient) -> None:
    response = client.post("/v1/converse", content=b"{nope", headers=AUTH)
    assert_kalpa_error(response, 400, "invalid_request")


def test_auth_errors(client: TestClient) -> None:
    body = {"conversation": [OPEN]}
    missing = post(client, body, headers={})
    assert_kalpa_error(missing, 401, "authentication_error")
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="converse"'
    assert_kalpa_error(
        post(client, body, headers={"Authorization": "Bearer wrong"}), 401, "authentication_error"
    )
    assert post(client, body, headers={"X-API-Key": "test-key-123"}).status_code == 200


def test_unknown_route_and_method(client: TestClient) -> None:
    assert_kalpa_error(client.get("/v1/nothing", headers=AUTH), 404, "not_found")
    not_allowed = client.get("/v1/converse", headers=AUTH)
    assert_kalpa_error(not_allowed, 405, "method_not_allowed")
    assert not_allowed.headers["Allow"] == "POST"
    problem = client.get("/v1/audio/conversation", headers=AUTH)
    assert problem.status_code == 405 and problem.headers["Allow"] == "POST"


def test_health_needs_no_key(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert client.get("/ready").json()["status"] == "ready"


@pytest.fixture(scope="module")
def voice_only_client() -> Iterator[TestClient]:
    """An API over a Triton (the test double) that serves Kokoro but no author LM."""
    with FakeTriton(models=["kokoro"]) as server, TestClient(
        create_app(make_settings(triton_url=server.http_url))
    ) as voice_only:
        yield voice_only


def test_speaker_only_open_turn_needs_the_author_mode(voice_only_client: TestClient) -> None:
    (model,) = voice_only_client.get("/v1/models", headers=AUTH).json()["data"]
    assert model["modes"] == ["tts", "converse"]
    error = assert_kalpa_error(
        post(voice_only_client, {"conversation": [*HISTORY, {"speaker": "0"}]}),
        400, "invalid_request",
    )
    assert "author" in error["message"]


def test_open_turn_with_nothing_to_speak_is_422(client: TestClient) -> None:
    error = assert_kalpa_error(
        post(client, {"conversation": [*HISTORY, {"speaker": "0", "text": "🙂"}]}),
        422, "invalid_request",
    )
    assert "letter or digit" in error["message"]


def test_openapi_documents_the_request_bodies(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    paths, schemas = document["paths"], document["components"]["schemas"]
    expected = {
        "/v1/converse": "conversation",
        "/v1/audio/conversation": "turns",
        "/v1/audio/conversation/with-timestamps": "timestamps",
        "/v1/voices": "name",
    }
    for path, field in expected.items():
        schema = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert field in schemas[schema["$ref"].rsplit("/", 1)[1]]["properties"], path
