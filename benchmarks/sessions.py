"""Live sessions: time to first audio (TTFA) after the user stops speaking, and 10 sessions at once.

A scripted client (devtools/session_client.py) speaks utterances rendered by the
bundled voice into a session in real time. For each reply:
- TTFA: from the true end of the utterance (last sample above -40 dBFS) to the
  arrival of the reply's first audio message;
- its parts: VAD hangover (true end -> ``input.speech_stopped``, in stream time),
  ASR, LM time to first token, first clause voicing (the server's ``latency_ms``)
  and the rest (transport, queueing, resampling, encoding);
- gaps: the longest stall of a client that plays audio as soon as it arrives.

``python -m benchmarks.sessions [--utterances 20] [--concurrent 10]`` prints the
section; ``make benchmark`` puts it in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from benchmarks.isolated import isolate
from devtools import REPOSITORY
from devtools.local_stack import LocalStack
from devtools.session_client import (
    LiveClient,
    ReceivedEvent,
    rendered_speech,
    spoken_exchange,
)

RATE = 16_000
# Ten replies of up to 64 tokens voiced on 2 cores take minutes, not the default 2.
REPLY_TIMEOUT_S = 600.0
QUESTIONS = [
    "What is the best way to learn to cook?",
    "Can you recommend a good book?",
    "How do I make a cup of tea?",
    "What should I do this weekend?",
    "Why is the sky blue?",
]


@dataclass(frozen=True)
class Exchange:
    """Figures of one reply, milliseconds."""

    ttfa: float
    hangover: float
    asr: float
    first_token: float
    first_clause_voice: float
    rest: float
    longest_gap: float


def _longest_gap_ms(client: LiveClient, turn_id: str) -> float:
    """Longest stall of a player that starts at the first audio message of ``turn_id``."""
    pieces = [e for e in client.events
              if e.event["type"] == "response.audio" and e.event["turn_id"] == turn_id]
    play_end: float | None = None
    longest = 0.0
    for piece in pieces:
        begin = piece.wall_s if play_end is None else max(piece.wall_s, play_end)
        if play_end is not None:
            longest = max(longest, begin - play_end)
        play_end = begin + piece.event["duration_ms"] / 1000
    return longest * 1000


def _first(client: LiveClient, kind: str) -> ReceivedEvent:
    return next(e for e in client.events if e.event["type"] == kind)


async def _exchange(stack: LocalStack, voice: str, audio: np.ndarray) -> Exchange:
    spoken = await spoken_exchange(stack.base_url, stack.api_key, audio, RATE, voice,
                                   "Answer in one short sentence.", timeout_s=REPLY_TIMEOUT_S)
    client = spoken.client
    if not client.of_type("response.audio"):
        raise RuntimeError(
            "no reply audio: "
            + "; ".join(f"{e.event['type']} {e.event.get('code') or e.event.get('status')}"
                        for e in client.events
                        if e.event["type"] in ("error", "response.done")))
    stopped = _first(client, "input.speech_stopped")
    audio_event = _first(client, "response.audio")
    true_end_wall = stopped.wall_s - (stopped.input_ms - spoken.true_end_ms) / 1000
    latency: dict[str, Any] = next(
        t for t in spoken.session["turns"] if t["role"] == "assistant")["latency_ms"]
    ttfa = (audio_event.wall_s - true_end_wall) * 1000
    hangover = stopped.input_ms - spoken.true_end_ms
    return Exchange(
        ttfa=ttfa,
        hangover=hangover,
        asr=latency["asr"],
        first_token=latency["first_token"] - latency["asr"],
        first_clause_voice=latency["first_clause_voice"],
        rest=ttfa - hangover - latency["first_audio"],
        longest_gap=_longest_gap_ms(client, audio_event.event["turn_id"]),
    )


def _row(name: str, exchanges: list[Exchange]) -> str:
    def cell(field: str) -> str:
        values = [getattr(e, field) for e in exchanges]
        return f"{np.percentile(values, 50):.0f} / {np.percentile(values, 95):.0f}"

    fields = ("ttfa", "hangover", "asr", "first_token", "first_clause_voice", "rest",
              "longest_gap")
    return f"| {name} | {len(exchanges)} | " + " | ".join(cell(f) for f in fields) + " |"


def measure_sessions(stack: LocalStack, utterances: int, concurrent: int) -> str:
    """Sequential exchanges, then ``concurrent`` sessions at once; a PERFORMANCE.md section."""
    voice = httpx.get(f"{stack.base_url}/v1/models",
                      headers={"Authorization": f"Bearer {stack.api_key}"}).json()["data"][0][
        "voices"][0]
    clips = [rendered_speech(stack.base_url, stack.api_key, text, RATE) for text in QUESTIONS]
    sequential = [asyncio.run(_exchange(stack, voice, clips[i % len(clips)]))
                  for i in range(utterances)]

    async def together() -> list[Exchange | BaseException]:
        return await asyncio.gather(
            *(_exchange(stack, voice, clips[i % len(clips)]) for i in range(concurrent)),
            return_exceptions=True)

    results = asyncio.run(together())
    loaded = [r for r in results if isinstance(r, Exchange)]
    failures = [repr(r) for r in results if not isinstance(r, Exchange)]
    return "\n".join([
        "## Live sessions (bundled VAD, Whisper, SmolLM2, Kokoro)",
        "",
        "`python -m benchmarks.sessions`: a scripted client speaks a rendered question into a",
        "session in real time (16 kHz pcm16) and plays the reply as it arrives. Milliseconds,",
        "p50 / p95. TTFA runs from the true end of the user's speech to the first reply audio;",
        "it is the sum of the VAD hangover (the 500 ms end-of-speech silence plus a window),",
        "ASR, the LM's first token, the first clause's voicing and the rest (transport,",
        "waiting for a whole clause, resampling, encoding). ASR and the LM's first token",
        "count from the confirmed end of speech: work on the turn starts 160 ms into the",
        "silence, so about 340 ms of it is done by then. *Gap*: the longest stall of a",
        "client playing the reply as it arrives.",
        "",
        "| load | replies | TTFA | VAD hangover | ASR | LM first token | first clause voice "
        "| rest | longest gap |",
        "|---|---|---|---|---|---|---|---|---|",
        _row("one session", sequential),
        _row(f"{concurrent} sessions at once", loaded) if loaded else "",
        "",
        f"Failures with {concurrent} sessions at once: {len(failures)}"
        + (f" ({'; '.join(failures)})" if failures else "") + ".",
        "",
    ])


def main() -> None:
    """Start the local stack on the exported repository and print the section."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--utterances", type=int, default=20)
    parser.add_argument("--concurrent", type=int, default=10)
    args = parser.parse_args()
    isolate("converse-sessions-")
    with LocalStack(REPOSITORY) as stack:
        print(measure_sessions(stack, args.utterances, args.concurrent))


if __name__ == "__main__":
    main()
