"""Moderation: blocklist/regex policy, one bad turn fails all, fail_mode open|closed."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from handler.app import create_app
from handler.moderation import BlocklistPolicy, ModerationVerdict
from handler.settings import Settings
from tests.helpers import AUTH, make_settings


class BrokenPolicy:
    def check(self, text: str) -> ModerationVerdict | None:
        raise RuntimeError("moderation backend down")


def broken_policy(settings: Settings) -> BrokenPolicy:
    return BrokenPolicy()


def conversation(*texts: str) -> dict[str, Any]:
    return {"model": "kokoro", "turns": [{"voice": "jm_kumo", "text": t} for t in texts]}


def test_blocklist_matches_whole_words_case_insensitively() -> None:
    policy = BlocklistPolicy(["darn"], [r"\b\d{3}-\d{4}\b"])
    assert policy.check("Well, DARN it.") == ModerationVerdict("blocklist", "blocked term 'DARN'")
    assert policy.check("darned socks") is None
    verdict = policy.check("call 555-1234")
    assert verdict is not None and verdict.type == "pattern"


def test_one_blocked_turn_fails_the_whole_conversation(triton_url: str) -> None:
    settings = make_settings(triton_url=triton_url, moderation_blocklist="darn,heck")
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/audio/conversation", headers=AUTH,
                               json=conversation("Hello there.", "Oh heck, no."))
        usage = client.get("/v1/usage", headers=AUTH).json()
        allowed = client.post("/v1/audio/conversation", headers=AUTH,
                              json=conversation("Hello there."))
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "content_moderation_blocked"
    assert error["reason"] == {"type": "blocklist", "detail": "blocked term 'heck'"}
    assert error["turn_index"] == 1
    assert usage["requests"] == 0  # nothing was synthesised or metered
    assert allowed.status_code == 200


@pytest.mark.parametrize(("fail_mode", "status"), [("closed", 422), ("open", 200)])
def test_failing_policy_obeys_fail_mode(triton_url: str, fail_mode: str, status: int) -> None:
    settings = make_settings(
        triton_url=triton_url,
        moderation_policy="tests.test_moderation:broken_policy",
        moderation_fail_mode=fail_mode,
    )
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/audio/conversation", headers=AUTH, json=conversation("Hi."))
    assert response.status_code == status
    if status == 422:
        assert response.json()["error"]["reason"]["type"] == "error_fail_closed"
