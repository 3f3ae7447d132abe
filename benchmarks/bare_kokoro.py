"""The bare runtime the voice benchmark races: kokoro-onnx rendering a dialogue in-process.

Runs in its own virtual environment (kokoro-onnx 0.6 needs numpy 2, the
project pins numpy 1; see :func:`benchmarks.voice.bare_runtime_python`), so it
imports nothing from the project. Protocol, one JSON object per line:

* argv: ``model.onnx`` path, voices ``.npz`` path;
* stdin: ``{"turns": [[text, voice], ...], "gap_ms": int}``; stdout:
  ``{"seconds": float, "samples": int}``: wall time of rendering every turn in
  order with ``Kokoro.create`` (its own espeak-ng phonemizer, default session
  options, as a user of the library runs it) and joining them with ``gap_ms``
  of silence, and the number of 24 kHz samples produced.

The process ends when stdin closes.
"""

import json
import sys
import time

import numpy as np
from kokoro_onnx import Kokoro


def main() -> None:
    """Load the model once, warm it, then answer render requests until stdin closes."""
    kokoro = Kokoro(sys.argv[1], sys.argv[2])
    kokoro.create("Hello world.", "jf_alpha")
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        start = time.perf_counter()
        gap = np.zeros(24 * request["gap_ms"], np.float32)
        parts = []
        for index, (text, voice) in enumerate(request["turns"]):
            audio, _ = kokoro.create(text, voice)
            parts.extend([gap, audio] if index else [audio])
        samples = len(np.concatenate(parts))
        print(json.dumps({"seconds": time.perf_counter() - start, "samples": samples}), flush=True)


if __name__ == "__main__":
    main()
