"""``make benchmark`` (``python -m benchmarks.run_all``): every measurement side by side in one run -> docs/PERFORMANCE.md."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import onnxruntime as ort

from benchmarks.author_speech import measure_author_speech
from benchmarks.csm import measure_csm
from benchmarks.isolated import isolate
from benchmarks.sessions import measure_sessions
from benchmarks.voice import BENCHMARK_DEADLINE_S, measure_voice
from devtools import REPOSITORY
from devtools.local_stack import LocalStack

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    """Run the voice, author/speech and session benchmarks on the local stack, then CSM."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/PERFORMANCE.md")
    parser.add_argument("--wer", default="", help="WER line from tests/test_speech.py")
    args = parser.parse_args()
    isolate("converse-benchmark-", deadline_s=BENCHMARK_DEADLINE_S)
    with LocalStack(REPOSITORY) as stack:
        sections = [
            measure_voice(stack, args.repeats),
            measure_author_speech(stack, args.repeats),
            measure_sessions(stack, utterances=20, concurrent=10),
        ]
    sections.append(measure_csm(args.repeats))
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    text = "\n".join([
        "# Performance",
        "",
        f"Measured by `make benchmark` (`python -m benchmarks.run_all`, median of {args.repeats} runs,",
        "compared paths measured in the same run). Machine: "
        f"{machine}, Python {platform.python_version()}, onnxruntime {ort.__version__},",
        "CPU only, local tritonserver 2.51 (python backend).",
        "",
        *sections,
    ])
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
