"""Property tests: no request body, however malformed, produces a 500."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import AUTH

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
short_text = st.text(alphabet="abcdefgh .,!?", min_size=0, max_size=30)
converse_turn = st.fixed_dictionaries(
    {"speaker": st.sampled_from(["0", "1", "2", "", "x"])},
    optional={"text": st.one_of(st.none(), short_text, st.integers()),
              "audio_wav_b64": st.one_of(st.none(), st.text(max_size=16))},
)
converse_body = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"conversation": st.lists(converse_turn, max_size=4)},
        optional={"model": st.one_of(st.none(), st.text(max_size=8), st.just("kokoro")),
                  "params": st.one_of(json_values, st.fixed_dictionaries(
                      {}, optional={"speed": st.floats(allow_nan=False, allow_infinity=False),
                                    "top_k": st.integers()}))},
    ),
)
conversation_turn = st.fixed_dictionaries(
    {},
    optional={"text": st.one_of(short_text, st.integers()),
              "voice": st.sampled_from(["jf_alpha", "jm_kumo*2+jf_alpha", "x*", "", "alloy"]),
              "model": st.sampled_from(["kokoro", "nope"]),
              "voiceId": st.text(max_size=8)},
)
conversation_body = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"turns": st.lists(conversation_turn, max_size=3)},
        optional={"model": st.sampled_from(["kokoro", "nope", ""]),
                  "gapMs": st.integers(-5, 20_000),
                  "volumeDbfs": st.floats(-100, 10, allow_nan=False, allow_infinity=False),
                  "output": st.one_of(st.sampled_from(["wav", "mp3", "pcm", "ogg"]), json_values,
                                      st.fixed_dictionaries({"format": st.just("mp3"),
                                                             "bitrate": st.integers(0, 400)})),
                  "split": st.one_of(st.booleans(), st.integers()),
                  "timestamps": st.sampled_from(["on", "off"])},
    ),
)

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(body=converse_body)
def test_converse_never_500(client: TestClient, body: Any) -> None:
    response = client.post("/v1/converse", json=body, headers=AUTH)
    assert response.status_code in (200, 400, 422), response.text
    if response.status_code != 200:
        assert response.json()["error"]["type"] == "invalid_request"


@SETTINGS
@given(body=conversation_body)
def test_conversation_never_500(client: TestClient, body: Any) -> None:
    response = client.post("/v1/audio/conversation", json=body, headers=AUTH)
    assert response.status_code in (200, 400, 422), response.text
    if response.status_code != 200:
        assert response.headers["content-type"].startswith("application/problem+json")
