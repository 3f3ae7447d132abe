"""CSM benchmark on CPU: the tiny random CSM through the local Triton ensemble vs
transformers' own ``generate``, side by side in one run.

(h) frames per second and RTF (wall time / audio seconds, 80 ms per frame) for
    the same conversation (two text turns, one 2 s spoken turn, the open turn),
    sampling at temperature 0.9, top-k 50, a fixed number of frames; the Triton
    time includes prompt building (Mimi encoding of the spoken turn) and the
    Mimi decode, as does ``generate(output_audio=True)``.

Speed on CPU says how much the serving path (BLS loop, two graph calls per
frame) costs around a small model; the GPU numbers for the full-size model
need a GPU session (docs/csm.md).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from devtools.local_triton import LocalTriton
from devtools.tiny_models import make_tiny_csm, speech, transformers_prompt
from export.csm import CsmExportOptions, export_csm
from handler.engines.base import take_params
from handler.engines.csm import CsmEngine, Segment
from handler.triton import TritonClient

ROOT = Path(__file__).resolve().parent.parent

NAME = "csm-tiny"
FRAMES = 48
FRAME_SECONDS = 0.08
SEGMENTS: list[tuple[str, str, np.ndarray | None]] = [
    ("0", "Welcome back to the show.", None),
    ("1", "Glad to be here.", speech(2.0, seed=1)),
    ("0", "Let's pick up where we left off.", None),
]


async def _triton_runs(url: str, repeats: int) -> list[tuple[float, int]]:
    client = TritonClient(url)
    engine = CsmEngine(NAME, 24_000, 32, ["0", "1"], 1024)
    segments = [Segment(s, t, a) for s, t, a in SEGMENTS]
    runs = []
    for seed in range(repeats + 1):
        given = {"temperature": 0.9, "repetition_penalty": 1.0, "max_new_tokens": FRAMES,
                 "seed": seed}
        params = engine.check_params(take_params(engine.param_rules(), given, NAME))
        start = time.perf_counter()
        result = await engine.generate(client, segments, params)
        runs.append((time.perf_counter() - start, result.frames))
    await client.close()
    return runs[1:]


def _transformers_runs(checkpoint: Path, repeats: int) -> list[tuple[float, int]]:
    import torch
    from transformers import AutoTokenizer, CsmForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = CsmForConditionalGeneration.from_pretrained(checkpoint).eval()
    prompt = transformers_prompt(tokenizer, model, SEGMENTS)
    runs = []
    for seed in range(repeats + 1):
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.no_grad():
            audio = model.generate(**prompt, max_new_tokens=FRAMES, do_sample=True,
                                   temperature=0.9, top_k=50, depth_decoder_do_sample=True,
                                   depth_decoder_temperature=0.9, depth_decoder_top_k=50,
                                   output_audio=True)
        runs.append((time.perf_counter() - start, audio[0].shape[-1] // 1920))
    return runs[1:]


def measure_csm(repeats: int) -> str:
    """Export the tiny CSM (once), run (h); returns the markdown section."""
    build = ROOT / "build" / "csm-bench"
    checkpoint = build / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        make_tiny_csm(checkpoint)
    repository = build / "repository"
    export_csm(CsmExportOptions(checkpoint=str(checkpoint), out=repository, name=NAME))
    with LocalTriton(repository) as server:
        triton = asyncio.run(_triton_runs(server.http_url, repeats))
    hf = _transformers_runs(checkpoint, repeats)
    rows = []
    for label, runs in (("Triton ensemble (BLS + ONNX Runtime)", triton),
                        ("transformers `generate` (eager, float32)", hf)):
        seconds = statistics.median(r[0] for r in runs)
        frames = int(statistics.median(r[1] for r in runs))
        rows.append(f"| (h) {label} | {frames} | {frames / seconds:.1f} | "
                    f"{seconds / (frames * FRAME_SECONDS):.3f} |")
    ratio = statistics.median(r[0] for r in hf) / statistics.median(r[0] for r in triton)
    return "\n".join([
        "## CSM (tiny random model, CPU)",
        "",
        "| path | frames | frames/s | RTF |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Triton is {ratio:.2f}× transformers' speed on the same conversation (median of "
        f"{repeats}; a frame costs two Triton calls, backbone + depth). The model is the "
        "test model (2-layer backbone and depth decoder, 2-layer Mimi), so these numbers "
        "measure the serving path, not CSM-1B; full-size GPU numbers need a GPU session.",
        "",
    ])


if __name__ == "__main__":
    print(measure_csm(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
