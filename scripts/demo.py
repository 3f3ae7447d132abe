"""``make demo``: the specs' own examples through API -> Triton -> Kokoro, into ``out/``.

1. speechbase-conversation.md's three-turn "How was your weekend?" exchange
   to ``/v1/audio/conversation`` as WAV and as MP3, and to
   ``/with-timestamps`` for its word timestamps;
2. kalpa-converse.md's "Welcome back to the show" contextual-TTS conversation
   and its recipe conversation with an open turn to author, to ``/v1/converse``;
3. one spoken exchange with a live session (conversational-ai-sessions.md): a
   question rendered by the bundled voice is spoken into the session's socket in
   real time; the reply's audio goes to ``out/session_reply.wav``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
from pathlib import Path

import httpx
import soundfile as sf

from devtools import REPOSITORY
from devtools.local_stack import LocalStack
from devtools.session_client import rendered_speech, spoken_exchange
from devtools.signals import stop_on_signals
from handler.routes.openapi import CONVERSE_EXAMPLES
from handler.routes.openapi import WEEKEND as DIALOGUE_WEEKEND

# The live-session exchange: 16 kHz pcm16, like the playground.
SESSION_RATE = 16_000
QUESTION = "What is the best way to learn to cook?"
PERSONA = "You are a friendly cooking teacher. Answer in one short sentence."
# The specs' example conversations, as the API document shows them.
WEEKEND = {**DIALOGUE_WEEKEND, "output": "wav"}
RECIPE = CONVERSE_EXAMPLES["author"]["value"]
WELCOME_BACK = CONVERSE_EXAMPLES["contextual_tts"]["value"]


def _duration_s(data: bytes) -> float:
    info = sf.info(io.BytesIO(data))
    return float(info.frames / info.samplerate)


def _shell_json(body: object) -> str:
    """JSON quoted for a POSIX shell single-quoted argument."""
    return "'" + json.dumps(body, ensure_ascii=False).replace("'", "'\\''") + "'"


def main() -> None:
    """Run the examples, write the files, print durations and curl commands."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("out"))
    parser.add_argument("--repository", type=Path, default=REPOSITORY)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stop_on_signals()
    with LocalStack(args.repository) as stack:
        headers = {"Authorization": f"Bearer {stack.api_key}"}
        with httpx.Client(base_url=stack.base_url, headers=headers, timeout=120) as client:
            written = []
            for name, output in (("weekend.wav", "wav"), ("weekend.mp3", "mp3")):
                response = client.post("/v1/audio/conversation", json={**WEEKEND, "output": output})
                response.raise_for_status()
                (args.out / name).write_bytes(response.content)
                written.append((name, _duration_s(response.content)))
            replies = {}
            for name, body in (("welcome_back.wav", WELCOME_BACK), ("recipe_authored.wav", RECIPE)):
                response = client.post("/v1/converse", json=body)
                response.raise_for_status()
                replies[name] = response.json()["reply"]
                wav = base64.b64decode(replies[name]["audio"]["data_b64"])
                (args.out / name).write_bytes(wav)
                written.append((name, _duration_s(wav)))
            response = client.post("/v1/audio/conversation/with-timestamps", json=WEEKEND)
            response.raise_for_status()
            timed = response.json()
            (args.out / "weekend_timestamps.json").write_text(
                json.dumps(timed["timestamps"], indent=2)
            )
            voice = client.get("/v1/models").json()["data"][0]["voices"][0]
        question = rendered_speech(stack.base_url, stack.api_key, QUESTION, SESSION_RATE)
        spoken = asyncio.run(spoken_exchange(
            stack.base_url, stack.api_key, [question], SESSION_RATE, voice, PERSONA))
    [reply_done] = [e.event for e in spoken.client.events if e.event["type"] == "response.done"]
    reply_audio = spoken.client.audio_of(reply_done["turn_id"])
    sf.write(args.out / "session_reply.wav", reply_audio, SESSION_RATE, subtype="PCM_16")
    written.append(("session_reply.wav", len(reply_audio) / SESSION_RATE))
    for name, seconds in written:
        print(f"{args.out / name}: {seconds:.2f} s")
    for name, reply in replies.items():
        print(f'{name}: speaker {reply["speaker"]} says "{reply["text"]}"')
    words = " ".join(f"{w['text']}@{w['start']:.2f}s" for w in timed["timestamps"])
    print(f"word timestamps (out/weekend_timestamps.json): {words}")
    user, assistant = spoken.session["turns"][:2]
    print(f'live session {spoken.session["session_id"]}: you said "{user["text"]}"; '
          f'the assistant said "{assistant["text"]}"')
    timings = ", ".join(f"{name} {ms:.0f} ms" for name, ms in assistant["latency_ms"].items())
    print(f"  after your speech ended: {timings} (out/session_reply.wav)")
    print("  talk to it yourself: `make serve`, then open $CONVERSE_URL/playground")
    print("\nTry more with `make serve`, then for example:")
    print(
        '  curl -s $CONVERSE_URL/v1/audio/conversation -H "Authorization: Bearer $CONVERSE_KEY" '
        f"-H 'Content-Type: application/json' -d {_shell_json(WEEKEND)} -o weekend.wav"
    )
    print(
        '  curl -s $CONVERSE_URL/v1/converse -H "Authorization: Bearer $CONVERSE_KEY" '
        f"-H 'Content-Type: application/json' -d {_shell_json(WELCOME_BACK)}"
    )


if __name__ == "__main__":
    main()
