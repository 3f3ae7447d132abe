"""``make benchmark``: every measurement side by side in one run -> docs/PERFORMANCE.md."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from author_speech import measure_author_speech  # noqa: E402
from csm import measure_csm  # noqa: E402
from local_stack import LocalStack  # noqa: E402
from voice import measure_voice  # noqa: E402


def main() -> None:
    """Run the voice and author/speech benchmarks on the local stack, then CSM; write the page."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/PERFORMANCE.md")
    parser.add_argument("--wer", default="", help="WER line from tests/test_speech.py")
    args = parser.parse_args()
    with LocalStack(ROOT / "build" / "model_repository") as stack:
        sections = [measure_voice(stack, args.repeats), measure_author_speech(stack, args.repeats)]
    sections.append(measure_csm(args.repeats))
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    text = "\n".join([
        "# Performance",
        "",
        f"Measured by `make benchmark` (`benchmarks/run_all.py`, median of {args.repeats} runs,",
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
