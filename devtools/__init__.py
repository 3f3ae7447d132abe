"""Tools for running and testing converse on this machine, not part of the service.

* :mod:`devtools.local_triton` runs the ``tritonserver`` binary of the
  ``nvidia-pytriton`` wheel on CPU (``python -m devtools.local_triton``);
* :mod:`devtools.local_stack` runs that server plus the API on loopback
  (``make demo``, ``make serve``, benchmarks);
* :mod:`devtools.fake_triton` is a test double of Triton's HTTP API for the
  fast test tier (``make test-fast``);
* :mod:`devtools.tiny_models` builds tiny random checkpoints (Gemma 3, CSM);
* :mod:`devtools.wer` measures word error rate (tests and benchmarks).

Tests and benchmarks import from here, never from each other.
"""

from pathlib import Path

# The local CPU model repository `make repository` builds (`python -m export all`).
REPOSITORY = Path(__file__).resolve().parent.parent / "build" / "model_repository"
