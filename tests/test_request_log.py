"""One JSON log line per request with per-turn child events; Prometheus metrics when enabled."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from handler.services.admission import Admission
from handler.services.telemetry import Metrics
from tests.helpers import API_KEY, AUTH
from tests.robust_fakes import FakeTriton, fake_client

WEEKEND = {"turns": [{"voice": "jf_alpha", "text": "How was your weekend?"},
                     {"voice": "jm_kumo", "text": "Good, I finally caught up on sleep."}]}


def request_lines(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines()
            if line.startswith('{"event":"request"')]


def test_one_line_per_request_with_turn_events(capsys: pytest.CaptureFixture[str]) -> None:
    with fake_client(FakeTriton()) as client:
        response = client.post("/v1/audio/conversation", json=WEEKEND, headers=AUTH)
        refused = client.post("/v1/audio/conversation", json={"turns": []}, headers=AUTH)
    out = capsys.readouterr().out
    ok, bad = request_lines(out)
    assert ok["request_id"] == response.headers["x-request-id"]
    assert (ok["route"], ok["status"], ok["model"]) == ("/v1/audio/conversation", 200, "kokoro")
    assert ok["characters"] == sum(len(t["text"]) for t in WEEKEND["turns"])
    assert ok["output_audio_seconds"] > 0
    turns = ok["turns"]
    assert isinstance(turns, list)
    assert [(t["turn_index"], t["stage"], t["characters"]) for t in turns] == [
        (0, "voice", 21), (1, "voice", 35)]
    assert all(t["latency_ms"] >= 0 for t in turns)
    assert bad["status"] == refused.status_code == 400 and bad["error_code"] == "validation_error"
    assert API_KEY not in out


def test_error_detail_goes_to_the_log_not_the_client(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeTriton()
    fake.ready = False
    with fake_client(fake) as client:
        response = client.get("/v1/models", headers=AUTH)
    (line,) = request_lines(capsys.readouterr().out)
    assert response.status_code == 503 and line["status"] == 503
    assert line["request_id"] == response.json()["error"]["request_id"]


def test_an_unhandled_error_is_detailed_in_the_log_not_the_client(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with fake_client(FakeTriton()) as client:
        def broken(key_id: str) -> None:
            raise RuntimeError("usage table went away")

        client.app.state.storage.get_usage = broken  # type: ignore[attr-defined]
        response = client.get("/v1/usage", headers=AUTH)
    (line,) = request_lines(capsys.readouterr().out)
    assert response.status_code == 500 and "went away" not in response.text
    assert (line["status"], line["error_code"]) == (500, "internal_error")
    assert line["error_detail"] == "RuntimeError('usage table went away')"


def test_log_lines_can_be_turned_off(capsys: pytest.CaptureFixture[str]) -> None:
    with fake_client(FakeTriton(), log_requests=False) as client:
        client.get("/health")
    assert request_lines(capsys.readouterr().out) == []


def test_metrics_only_when_enabled() -> None:
    with fake_client(FakeTriton()) as client:
        assert client.get("/metrics").status_code == 404
    with fake_client(FakeTriton(), metrics_enabled=True) as client:
        client.post("/v1/audio/conversation", json=WEEKEND, headers=AUTH)
        text = client.get("/metrics").text
    assert 'converse_requests_total{route="/v1/audio/conversation",status="200"} 1.0' in text
    assert "converse_request_seconds_bucket" in text
    assert "converse_admission_running" in text


def test_liveness_and_readiness() -> None:
    fake = FakeTriton()
    with fake_client(fake) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/ready").json() == {"status": "ready", "models": ["kokoro"]}
        fake.ready = False
        client.app.state.catalog._fetched_at = -1.0  # type: ignore[attr-defined]
        not_ready = client.get("/ready")
        assert client.get("/health").status_code == 200
    assert not_ready.status_code == 503 and "retry-after" in not_ready.headers
    assert not_ready.json()["error"]["type"] == "service_unavailable"


@pytest.mark.parametrize("served", [(), ("whisper_asr",), ("kokoro",)])
def test_a_triton_without_the_default_model_is_not_ready(served: tuple[str, ...]) -> None:
    """Requests that name no model would fail there: 503 with Retry-After, saying why."""
    fake = FakeTriton(extra_models=("whisper_asr",))
    fake.configs = {name: config for name, config in fake.configs.items() if name in served}
    with fake_client(fake, default_model="tiny-csm") as client:
        not_ready = client.get("/ready")
    assert not_ready.status_code == 503 and "retry-after" in not_ready.headers
    message = not_ready.json()["error"]["message"]
    assert "default model 'tiny-csm' is not served" in message
    assert message.endswith(f"served: {'kokoro' if 'kokoro' in served else 'none'})")


def gauges(metrics: Metrics) -> tuple[str, str]:
    """The exposition's admission gauge lines: (running, waiting)."""
    lines = metrics.exposition().decode().splitlines()
    running, = [line for line in lines if line.startswith("converse_admission_running ")]
    waiting, = [line for line in lines if line.startswith("converse_admission_waiting ")]
    return running, waiting


def test_a_scrape_shows_the_requests_running_and_waiting_at_that_moment() -> None:
    """Before any request has ended, the gauges already count the ones in flight."""
    async def scenario() -> None:
        admission = Admission(1, 2, 1.0, 5)
        metrics = Metrics(admission)
        gate = asyncio.Event()

        async def hold() -> None:
            async with admission.slot("key", time.monotonic() + 60):
                await gate.wait()

        holders = [asyncio.create_task(hold()) for _ in range(2)]
        while admission.waiting < 1:
            await asyncio.sleep(0)
        assert gauges(metrics) == ("converse_admission_running 1.0",
                                   "converse_admission_waiting 1.0")
        gate.set()
        await asyncio.gather(*holders)
        assert gauges(metrics) == ("converse_admission_running 0.0",
                                   "converse_admission_waiting 0.0")

    asyncio.run(scenario())
