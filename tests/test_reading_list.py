"""Each bug of the robustness reading list, with the test that would have caught it."""

from __future__ import annotations

import asyncio
import hashlib

from fastapi.testclient import TestClient

from devtools.local_triton import free_port
from handler.app import create_app
from handler.engines.kokoro import KokoroEngine
from handler.settings import Settings
from tests.helpers import AUTH, make_settings, tone, wav_b64
from tests.robust_fakes import PIECE_SAMPLES, FakeTriton, failing, fake_client


def test_plaintext_api_keys_are_dropped_after_hashing() -> None:
    settings = Settings(api_keys="alpha-secret, beta-secret")
    dumped = settings.model_dump_json() + repr(settings) + repr(vars(settings))
    assert "alpha-secret" not in dumped and "beta-secret" not in dumped
    assert settings.api_keys == ""
    assert hashlib.sha256(b"alpha-secret").hexdigest() in settings.key_digests


def test_sentence_pause_goes_between_sentences_not_pieces() -> None:
    fake = FakeTriton()
    engine = KokoroEngine("kokoro", frozenset({"jf_alpha"}), 24_000, (0.5, 2.0),
                          ("jf_alpha*1",), pause_ms=250)
    text = "One. Two. Three."  # three sentences, one 240-character piece before the fix
    audio = asyncio.run(engine.synthesize(fake, text, "jf_alpha*1", 1.0))  # type: ignore[arg-type]
    assert len(audio) == 3 * PIECE_SAMPLES + 2 * 6000
    assert fake.calls == ["kokoro"] * 3


def test_history_audio_kokoro_cannot_hear_is_a_warning() -> None:
    body = {"conversation": [
        {"speaker": "1", "audio_wav_b64": wav_b64(tone(0.5), 24_000)},
        {"speaker": "0", "text": "Sounds good."},
    ]}
    with fake_client(FakeTriton()) as client:
        response = client.post("/v1/converse", json=body, headers=AUTH)
        text_only = client.post("/v1/converse", headers=AUTH, json={"conversation": [
            {"speaker": "1", "text": "Hi."}, {"speaker": "0", "text": "Sounds good."}]})
    assert response.status_code == 200, response.text
    (warning,) = response.json()["warnings"]
    assert "turn(s) 0" in warning and "not used" in warning
    assert text_only.json()["warnings"] == []


def test_mp3_bitrate_is_checked_at_the_model_sample_rate() -> None:
    body = {"turns": [{"voice": "jf_alpha", "text": "Hello."}],
            "output": {"format": "mp3", "bitrate": 8}}
    with fake_client(FakeTriton(sample_rate=44_100)) as client:
        response = client.post("/v1/audio/conversation", json=body, headers=AUTH)
    # 8 kbps exists at 24 kHz (MPEG-2) but not at 44.1 kHz (MPEG-1): a 400, not a 500.
    assert response.status_code == 400, response.text
    assert response.json()["validation"][0]["path"] == ["output", "bitrate"]


def test_failed_timestamps_are_not_metered() -> None:
    fake = FakeTriton(extra_models=("aligner", "whisper_asr"))
    fake.behaviours["aligner"] = failing("no alignment")
    fake.behaviours["whisper_asr"] = failing("no transcript")
    body = {"turns": [{"voice": "jf_alpha", "text": "Hello."}]}
    with fake_client(fake) as client:
        response = client.post("/v1/audio/conversation/with-timestamps", json=body, headers=AUTH)
        usage = client.get("/v1/usage", headers=AUTH).json()
    assert response.status_code == 503 and response.json()["code"] == "timestamps_unavailable"
    assert usage["requests"] == 0 and usage["output_audio_seconds"] == 0


def test_triton_failures_carry_upstream_fields_and_no_internals() -> None:
    fake = FakeTriton()
    fake.behaviours["kokoro"] = failing("onnxruntime failed in /opt/models/kokoro/1/model.py", 400)
    body = {"turns": [{"voice": "jf_alpha", "text": "Hello."}]}
    with fake_client(fake) as client:
        problem = client.post("/v1/audio/conversation", json=body, headers=AUTH)
        kalpa = client.post("/v1/converse", headers=AUTH,
                            json={"conversation": [{"speaker": "0", "text": "Hello."}]})
    assert problem.status_code == 502
    body = problem.json()
    assert (body["provider"], body["upstream_code"], body["upstream_status"]) == (
        "triton", "INVALID_ARG", 400)
    for response in (problem, kalpa):
        assert "/opt/models" not in response.text and "model.py" not in response.text
    assert kalpa.status_code == 502 and kalpa.json()["error"]["type"] == "inference_error"


def test_unreachable_triton_message_names_no_host_or_port() -> None:
    port = free_port()
    with TestClient(create_app(make_settings(triton_url=f"127.0.0.1:{port}"))) as client:
        kalpa = client.post("/v1/converse", headers=AUTH,
                            json={"conversation": [{"speaker": "0", "text": "Hello."}]})
        problem = client.post("/v1/audio/conversation", headers=AUTH,
                              json={"turns": [{"voice": "jf_alpha", "text": "Hello."}]})
    assert kalpa.status_code == 503 and problem.status_code == 503
    for response in (kalpa, problem):
        assert str(port) not in response.text and "127.0.0.1" not in response.text
    assert problem.json()["provider"] == "triton"
    assert problem.json()["upstream_code"] == "UNAVAILABLE"
