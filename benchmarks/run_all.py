"""``make benchmark`` (``python -m benchmarks.run_all``): every measurement side by side in one run -> docs/PERFORMANCE.md.

Each measured section replaces the section under the same heading in the
document; every other section (the overload, restart, disconnect and fuzz
runs, which have their own scripts, and hand-written ``###`` notes) is kept.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
from pathlib import Path

import onnxruntime as ort

from benchmarks.author_speech import measure_author_speech
from benchmarks.csm import measure_csm
from benchmarks.isolated import isolate
from benchmarks.sessions import CONCURRENT, measure_sessions
from benchmarks.voice import BENCHMARK_DEADLINE_S, measure_voice
from devtools import REPOSITORY
from devtools.local_stack import LocalStack

ROOT = Path(__file__).resolve().parent.parent


def merge_sections(document: str, preamble: str, sections: list[str]) -> str:
    """``document`` with its preamble and the measured ``sections`` replaced.

    Args:
        document: the current markdown (may be empty).
        preamble: the text before the first section heading.
        sections: markdown sections, each starting with its ``## `` heading line.

    Returns:
        The preamble, then the document's sections in their order, each chunk
        (from a ``## `` or ``### `` heading to the next one) replaced by the
        measured section with the same heading line; measured sections the
        document lacks go at the end.
    """
    chunks = re.split(r"(?m)^(?=##?# )", document)[1:]
    by_heading = {chunk.split("\n", 1)[0]: chunk for chunk in chunks}
    order = list(by_heading)
    for section in sections:
        heading = section.split("\n", 1)[0]
        if heading not in by_heading:
            order.append(heading)
        by_heading[heading] = section.rstrip("\n") + "\n\n"
    return preamble.rstrip("\n") + "\n\n" + "".join(by_heading[h] for h in order).rstrip("\n") + "\n"


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
            measure_sessions(stack, utterances=20, concurrent=CONCURRENT, turns=6,
                             conversations=2),
        ]
    sections.append(measure_csm(args.repeats))
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    preamble = "\n".join([
        "# Performance",
        "",
        f"Measured by `make benchmark` (`python -m benchmarks.run_all`, median of {args.repeats} runs,",
        "compared paths measured in the same run). Machine: "
        f"{machine}, Python {platform.python_version()}, onnxruntime {ort.__version__},",
        "CPU only, local tritonserver 2.51 (python backend).",
    ])
    current = args.out.read_text() if args.out.exists() else ""
    text = merge_sections(current, preamble, sections)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
