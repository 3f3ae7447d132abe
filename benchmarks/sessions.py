"""Live sessions: time to first audio (TTFA) after the user stops speaking, and sessions at once.

A scripted client (devtools/session_client.py) speaks utterances rendered by the
bundled voice into a session in real time. For each reply:
- TTFA: from the true end of the utterance (last sample above -40 dBFS) to the
  arrival of the reply's first audio message;
- its parts: VAD hangover (true end -> ``input.speech_stopped``, in stream time),
  ASR, LM time to first token, first clause voicing (the server's ``latency_ms``)
  and the rest (transport, queueing, resampling, encoding);
- gaps: the longest stall of a client that plays audio as soon as it arrives;
- CPU: seconds of CPU (user + system, psutil) each model's Triton processes,
  tritonserver itself and this process (the API and the scripted client) spend
  per reply of the one-session rows, and per second of reply audio: what a
  reply costs, so how many cores replies played at the same time need.

``python -m benchmarks.sessions [--utterances 20] [--concurrent 2,4,10]`` prints the
section; ``make benchmark`` puts it in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from benchmarks.isolated import isolate
from devtools import REPOSITORY
from devtools.local_stack import LocalStack
from devtools.session_client import LiveClient, rendered_speech, spoken_exchange
from handler.sessions.turn_taking import EARLY_END_SILENCE_MS, END_SILENCE_MS

RATE = 16_000
# Sessions speaking at the same moment, a row each: 10 is issue #10's load.
CONCURRENT = (2, 4, 10)
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
    audio_ms: float


def _audio_of(client: LiveClient, turn_id: str) -> list[Any]:
    """The ``response.audio`` events of ``turn_id``, in order."""
    return [e for e in client.events
            if e.event["type"] == "response.audio" and e.event["turn_id"] == turn_id]


def _longest_gap_ms(client: LiveClient, turn_id: str) -> float:
    """Longest stall of a player that starts at the first audio message of ``turn_id``."""
    pieces = _audio_of(client, turn_id)
    play_end: float | None = None
    longest = 0.0
    for piece in pieces:
        begin = piece.wall_s if play_end is None else max(piece.wall_s, play_end)
        if play_end is not None:
            longest = max(longest, begin - play_end)
        play_end = begin + piece.event["duration_ms"] / 1000
    return longest * 1000


async def _exchanges(stack: LocalStack, voice: str, questions: list[np.ndarray]) -> list[Exchange]:
    """``questions`` spoken in turn into one new session; the figures of each reply."""
    spoken = await spoken_exchange(stack.base_url, stack.api_key, questions, RATE, voice,
                                   "Answer in one short sentence.", timeout_s=REPLY_TIMEOUT_S)
    client = spoken.client
    replies = client.of_type("response.done")
    if len(client.of_type("response.audio")) == 0 or any(
            r.event["status"] != "completed" for r in replies):
        raise RuntimeError("a reply failed: " + client.summary())
    assistant = [t for t in spoken.session["turns"] if t["role"] == "assistant"]
    figures = []
    for stopped, true_end_ms, reply, stored in zip(
            client.of_type("input.speech_stopped"), spoken.true_ends_ms, replies, assistant,
            strict=True):
        turn_id = reply.event["turn_id"]
        audio_event = next(e for e in client.of_type("response.audio")
                           if e.event["turn_id"] == turn_id)
        true_end_wall = stopped.wall_s - (stopped.input_ms - true_end_ms) / 1000
        latency: dict[str, Any] = stored["latency_ms"]
        ttfa = (audio_event.wall_s - true_end_wall) * 1000
        hangover = stopped.input_ms - true_end_ms
        figures.append(Exchange(
            ttfa=ttfa,
            hangover=hangover,
            asr=latency["asr"],
            first_token=latency["first_token"] - latency["asr"],
            first_clause_voice=latency["first_clause_voice"],
            rest=ttfa - hangover - latency["first_audio"],
            longest_gap=_longest_gap_ms(client, turn_id),
            audio_ms=sum(e.event["duration_ms"] for e in _audio_of(client, turn_id)),
        ))
    return figures


def _row(name: str, exchanges: list[Exchange]) -> str:
    def cell(field: str) -> str:
        values = [getattr(e, field) for e in exchanges]
        return f"{np.percentile(values, 50):.0f} / {np.percentile(values, 95):.0f}"

    fields = ("ttfa", "hangover", "asr", "first_token", "first_clause_voice", "rest",
              "longest_gap")
    return f"| {name} | {len(exchanges)} | " + " | ".join(cell(f) for f in fields) + " |"


def cpu_seconds(stack: LocalStack) -> Counter[str]:
    """CPU seconds (user + system) spent so far, by model, tritonserver, and this process.

    A python-backend stub counts for the model whose ``model.py`` it runs (all
    its instances together); ``tritonserver`` is the server process itself;
    ``API and client`` is this process (the API server's thread and the
    scripted clients). A process that ended meanwhile is not counted.
    """
    totals: Counter[str] = Counter()
    for process in stack.triton.processes():
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            script = next((arg for arg in process.cmdline() if arg.endswith("model.py")), None)
            name = Path(script).parent.parent.name if script else "tritonserver"
            totals[name] += times.user + times.system
    own = psutil.Process().cpu_times()
    totals["API and client"] = own.user + own.system
    return totals


def cpu_table(spent: Counter[str], exchanges: list[Exchange]) -> list[str]:
    """Rows of CPU seconds per reply and per second of reply audio; a total row last."""
    replies = len(exchanges)
    audio_s = sum(e.audio_ms for e in exchanges) / 1000
    rows = [f"| {name} | {seconds / replies:.2f} | {seconds / audio_s:.3f} |"
            for name, seconds in spent.most_common() if seconds > 0]
    total = sum(spent.values())
    return [
        "| process | CPU s per reply | CPU s per second of reply audio |",
        "|---|---|---|",
        *rows,
        f"| all | {total / replies:.2f} | {total / audio_s:.3f} |",
        "",
        f"{replies} replies of {audio_s / replies:.1f} s of audio on average. Replies that",
        "play at the same moment keep up with playback only while they need less CPU than",
        f"the machine has: about {total / audio_s:.2f} cores each, so "
        f"{psutil.cpu_count()} cores carry about {psutil.cpu_count() / (total / audio_s):.1f}",
        f"at once and ten need about {10 * total / audio_s:.0f} (a lower bound: the",
        "first audio also waits for Whisper and the LM's first clause).",
    ]


def measure_sessions(stack: LocalStack, utterances: int, concurrent: Sequence[int], turns: int,
                     conversations: int) -> str:
    """A PERFORMANCE.md section: first replies one at a time, later turns, sessions at once.

    ``utterances`` sessions of one question each, one after another; then
    ``conversations`` sessions of ``turns`` questions each (the replies after the
    first: a prompt that grows); then, for each n in ``concurrent``, n
    one-question sessions that speak at the same moment (a row each: where
    the machine's capacity ends).
    """
    voice = httpx.get(f"{stack.base_url}/v1/models",
                      headers={"Authorization": f"Bearer {stack.api_key}"}).json()["data"][0][
        "voices"][0]
    clips = [rendered_speech(stack.base_url, stack.api_key, text, RATE) for text in QUESTIONS]
    before = cpu_seconds(stack)
    sequential = [asyncio.run(_exchanges(stack, voice, [clips[i % len(clips)]]))[0]
                  for i in range(utterances)]
    spent = cpu_seconds(stack)
    spent.subtract(before)
    later = [figures for _ in range(conversations) for figures in asyncio.run(
        _exchanges(stack, voice, [clips[i % len(clips)] for i in range(turns)]))[1:]]

    async def together(count: int) -> list[list[Exchange] | BaseException]:
        return await asyncio.gather(
            *(_exchanges(stack, voice, [clips[i % len(clips)]]) for i in range(count)),
            return_exceptions=True)

    loaded_rows, failure_lines = [], []
    for count in concurrent:
        results = asyncio.run(together(count))
        loaded = [r[0] for r in results if isinstance(r, list)]
        failures = [repr(r) for r in results if not isinstance(r, list)]
        if loaded:
            loaded_rows.append(_row(f"{count} sessions at once", loaded))
        failure_lines.append(f"Failures with {count} sessions at once: {len(failures)}"
                             + (f" ({'; '.join(failures)})" if failures else "") + ".")
    return "\n".join([
        "## Live sessions (bundled VAD, Whisper, SmolLM2, Kokoro)",
        "",
        "`python -m benchmarks.sessions`: a scripted client speaks a rendered question into a",
        "session in real time (16 kHz pcm16) and plays the reply as it arrives. Milliseconds,",
        "p50 / p95. TTFA runs from the true end of the user's speech to the first reply audio;",
        "it is the sum of the VAD hangover (the 500 ms end-of-speech silence plus a window),",
        "ASR, the LM's first token, the first clause's voicing and the rest (transport,",
        "waiting for a whole clause, resampling, encoding). ASR and the LM's first token",
        "count from the confirmed end of speech: work on the turn starts "
        f"{EARLY_END_SILENCE_MS} ms into the",
        f"silence, so about {END_SILENCE_MS - EARLY_END_SILENCE_MS} ms of it is done by then. "
        "*Gap*: the longest stall of a",
        "client playing the reply as it arrives. *Later turns*: the replies after the first",
        f"in sessions of {turns} questions (each prompt holds the conversation so far).",
        "",
        "| load | replies | TTFA | VAD hangover | ASR | LM first token | first clause voice "
        "| rest | longest gap |",
        "|---|---|---|---|---|---|---|---|---|",
        _row("one session", sequential),
        _row(f"one session, turns 2-{turns}", later) if later else "",
        *loaded_rows,
        "",
        " ".join(failure_lines),
        "",
        "CPU of the one-session replies (the first row), by process (psutil, user +",
        "system; a model's row is its Triton python-backend processes):",
        "",
        *cpu_table(spent, sequential),
        "",
    ])


def _counts(text: str) -> list[int]:
    """``"2,4,10"`` -> ``[2, 4, 10]``."""
    return [int(part) for part in text.split(",") if part.strip()]


def _at_least_one(text: str) -> int:
    """An argument count of one or more (the one-session row and its CPU table need a reply)."""
    count = int(text)
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {count}")
    return count


def main() -> None:
    """Start the local stack on the exported repository and print the section."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--utterances", type=_at_least_one, default=20)
    parser.add_argument("--concurrent", type=_counts, default=CONCURRENT,
                        help="comma-separated session counts, each run at once (default 2,4,10)")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--conversations", type=int, default=2)
    args = parser.parse_args()
    isolate("converse-sessions-")
    with LocalStack(REPOSITORY) as stack:
        print(measure_sessions(stack, args.utterances, args.concurrent, args.turns,
                               args.conversations))


if __name__ == "__main__":
    main()
