"""Moderation: blocklist/regex policy, one bad turn fails all, fail_mode open|closed.

What the client reads (a generic reason) is checked apart from what the log
line carries (the matched term or pattern, a failing policy's error text). A
plugged-in policy runs in worker threads: the event loop, and the request's
deadline, go on while it checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient

from handler.app import create_app
from handler.errors import ModerationUnavailable
from handler.moderation import (
    MODERATION_THREADS,
    BlocklistPolicy,
    ModerationPolicy,
    ModerationVerdict,
    moderate,
)
from handler.schemas.errors import ModerationError, ModerationReason
from handler.settings import Settings
from tests.helpers import AUTH, make_settings

# How long a gated test policy waits for its release before giving up, seconds:
# long enough that a check run on the event loop shows as a stalled loop.
GATE_S = 10.0
# What a policy that calls a (down) moderation service raises: an internal host,
# port and a secret the client must never read.
OUTAGE = ("HTTPSConnectionPool(host='moderation.internal.corp', port=8443): "
          "Max retries exceeded with url: /v1/check?api_key=sk-live-SECRET123")


class BrokenPolicy:
    """A policy whose moderation service is down."""

    def check(self, text: str) -> ModerationVerdict | None:
        """Always raises, as a client of an unreachable service does."""
        raise ConnectionError(OUTAGE)


class GatedPolicy:
    """Lets every text through, once released (or after GATE_S seconds)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()

    def check(self, text: str) -> ModerationVerdict | None:
        """Wait for ``release``; ``entered`` and ``finished`` tell the test where it is."""
        self.entered.set()
        self.release.wait(GATE_S)
        self.finished.set()
        return None


class PairedPolicy:
    """Lets a text through only once a second check is running at the same time."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=GATE_S)

    def check(self, text: str) -> ModerationVerdict | None:
        """Wait at the barrier (raises BrokenBarrierError when the checks run one by one)."""
        self.barrier.wait()
        return None


def broken_policy(settings: Settings) -> BrokenPolicy:
    return BrokenPolicy()


def app_with(policy: ModerationPolicy, triton_url: str, **overrides: Any) -> TestClient:
    """A client of an app whose moderation policy is ``policy``."""
    app = create_app(make_settings(triton_url=triton_url, **overrides))
    app.state.moderation = policy
    return TestClient(app)


def conversation(*texts: str) -> dict[str, Any]:
    return {"model": "kokoro", "turns": [{"voice": "jm_kumo", "text": t} for t in texts]}


def request_line(out: str) -> dict[str, Any]:
    """The one request log line for a POST in ``out`` (captured stdout)."""
    (line,) = [json.loads(text) for text in out.splitlines()
               if text.startswith('{"event":"request"') and '"method":"POST"' in text]
    return dict(line)


def test_blocklist_matches_whole_words_case_insensitively() -> None:
    policy = BlocklistPolicy(["darn"], [r"\b\d{3}-\d{4}\b"])
    assert policy.check("Well, DARN it.") == ModerationVerdict("blocklist", "blocked term 'DARN'")
    assert policy.check("darned socks") is None
    verdict = policy.check("call 555-1234")
    assert verdict is not None and verdict.type == "pattern"


@pytest.mark.parametrize(("text", "blocked"), [
    ("you @ss", "@ss"), ("@ss!", "@ss"), ("I love C++.", "C++"), ("what the sh!t", "sh!t"),
    ("x@ss", None), ("Ic++z", None), ("a badword here", "badword"), ("badwords", None),
])
def test_blocklist_entries_edged_with_symbols_are_whole_words(
    text: str, blocked: str | None,
) -> None:
    """A word is whole where no word character touches it, whatever its own edges are."""
    verdict = BlocklistPolicy(["@ss", "c++", "sh!t", "badword"], []).check(text)
    if blocked is None:
        assert verdict is None
    else:
        assert verdict == ModerationVerdict("blocklist", f"blocked term {blocked!r}")


def test_one_blocked_turn_fails_the_whole_conversation(
    triton_url: str, capsys: pytest.CaptureFixture[str],
) -> None:
    settings = make_settings(triton_url=triton_url, moderation_blocklist="darn,heck")
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/audio/conversation", headers=AUTH,
                               json=conversation("Hello there.", "Oh heck, no."))
        line = request_line(capsys.readouterr().out)
        usage = client.get("/v1/usage", headers=AUTH).json()
        allowed = client.post("/v1/audio/conversation", headers=AUTH,
                              json=conversation("Hello there."))
    assert response.status_code == 422
    error = ModerationError.model_validate(response.json()).error
    assert error.code == "content_moderation_blocked"
    assert error.reason == ModerationReason(type="blocklist",
                                            detail="the text contains a blocked term")
    assert error.turn_index == 1
    assert (line["status"], line["error_code"]) == (422, "content_moderation_blocked")
    assert "'heck'" in line["error_detail"]  # the operator learns what matched
    assert usage["requests"] == 0  # nothing was synthesised or metered
    assert allowed.status_code == 200


def test_a_pattern_block_tells_the_client_nothing_of_the_pattern(
    triton_url: str, capsys: pytest.CaptureFixture[str],
) -> None:
    pattern = r"k[i1]ll\s+(him|her)"
    settings = make_settings(triton_url=triton_url, moderation_patterns=[pattern, "bomb"])
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/audio/conversation", headers=AUTH,
                               json=conversation("Fine.", "K1ll  him."))
    line = request_line(capsys.readouterr().out)
    assert response.status_code == 422
    error = ModerationError.model_validate(response.json()).error
    assert (error.turn_index, error.reason.type) == (1, "pattern")
    assert error.reason.detail == "the text matches a blocked pattern"
    assert "k[i1]ll" not in response.text and "bomb" not in response.text
    assert repr(pattern) in line["error_detail"]


def test_a_failing_policy_closed_is_a_retryable_503_that_names_nothing_internal(
    triton_url: str, capsys: pytest.CaptureFixture[str],
) -> None:
    settings = make_settings(
        triton_url=triton_url, moderation_policy="tests.test_moderation:broken_policy",
        moderation_fail_mode="closed", retry_after_s=7,
    )
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/audio/conversation", headers=AUTH, json=conversation("Hi."))
    line = request_line(capsys.readouterr().out)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "7"
    error = ModerationError.model_validate(response.json()).error
    assert (error.code, error.reason.type, error.turn_index) == (
        "content_moderation_blocked", "error_fail_closed", 0)
    for secret in ("moderation.internal.corp", "8443", "SECRET123", "ConnectionError"):
        assert secret not in response.text
    assert (line["status"], line["error_code"]) == (503, "content_moderation_blocked")
    assert OUTAGE in line["error_detail"]


def test_a_failing_policy_open_lets_the_text_through(triton_url: str) -> None:
    settings = make_settings(
        triton_url=triton_url, moderation_policy="tests.test_moderation:broken_policy",
        moderation_fail_mode="open",
    )
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/audio/conversation", headers=AUTH, json=conversation("Hi."))
    assert response.status_code == 200


def test_the_reason_schema_names_every_reason_type_the_service_sends() -> None:
    described = ModerationReason.model_fields["type"].description or ""
    for reason_type in ("blocklist", "pattern", "error_fail_closed"):
        assert reason_type in described


def test_a_policy_that_is_checking_does_not_stall_other_requests(triton_url: str) -> None:
    policy = GatedPolicy()
    with app_with(policy, triton_url) as client, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.post, "/v1/audio/conversation", headers=AUTH,
                              json=conversation("Hi."))
        assert policy.entered.wait(GATE_S)
        health = client.get("/health")
        answered_while_checking = not policy.finished.is_set()
        policy.release.set()
        response = pending.result()
    assert health.status_code == 200
    assert answered_while_checking
    assert response.status_code == 200


def test_the_turns_of_a_request_are_checked_at_the_same_time(triton_url: str) -> None:
    """Each check waits for the other: checked one by one, the first fails (503)."""
    with app_with(PairedPolicy(), triton_url) as client:
        response = client.post("/v1/audio/conversation", headers=AUTH,
                               json=conversation("Hello there.", "Hi."))
    assert response.status_code == 200


def test_the_deadline_answers_while_the_policy_is_still_checking(triton_url: str) -> None:
    policy = GatedPolicy()
    deadlines = {"triton_timeout_s": 2.0, "lambda_timeout_s": 3.0, "gateway_timeout_s": 4.0}
    with app_with(policy, triton_url, **deadlines) as client:
        response = client.post("/v1/audio/conversation", headers=AUTH, json=conversation("Hi."))
        answered_while_checking = not policy.finished.is_set()
        policy.release.set()
    assert policy.entered.is_set()
    assert response.status_code == 504
    assert answered_while_checking


class HungPolicy:
    """A policy whose moderation service stopped answering; counts the checks running."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.running = 0
        self.most_running = 0
        self._lock = threading.Lock()

    def check(self, text: str) -> ModerationVerdict | None:
        """Hang until released (or GATE_S seconds)."""
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            self.release.wait(GATE_S)
        finally:
            with self._lock:
                self.running -= 1
        return None


def test_checks_their_requests_abandoned_hold_at_most_the_moderation_threads() -> None:
    """A hung service keeps MODERATION_THREADS checks running, never more; the next
    request then fails closed at once instead of starting another thread."""
    policy = HungPolicy()

    async def request() -> None:
        with contextlib.suppress(TimeoutError, ModerationUnavailable):
            async with asyncio.timeout(0.3):  # the request's deadline
                await moderate(policy, ["Hello."] * MODERATION_THREADS, "closed", 5)

    async def scenario() -> None:
        for _ in range(3):
            await asyncio.gather(*(request() for _ in range(4)))
        async with asyncio.timeout(GATE_S / 2):
            with pytest.raises(ModerationUnavailable):
                await moderate(policy, ["Hello."], "closed", 5)

    try:
        asyncio.run(scenario())
    finally:
        policy.release.set()
    assert policy.most_running == MODERATION_THREADS
