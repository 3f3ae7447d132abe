"""Helpers shared by converse's python-backend models.

Not a Triton model: ``python -m export`` copies this file next to every python
model's ``model.py`` in the built repository (Triton's python backend puts the
version folder on ``sys.path``). A ``model.py`` imports it before numpy and
``triton_python_backend_utils``, because importing it puts the project's
site-packages first on ``sys.path``: the local tritonserver's stub interpreter
ignores PYTHONPATH, so the launcher passes them in ``CONVERSE_SITE_PACKAGES``
(and the stub gets numpy 1.26; with numpy 2 it returns empty tensors). The
variable is unset in the NGC container, where this is a no-op.
"""

import json
import os
import sys
import time

sys.path[:0] = [p for p in os.environ.get("CONVERSE_SITE_PACKAGES", "").split(os.pathsep) if p]

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


def parameters(args):
    """The model config's ``parameters`` as ``{key: string_value}``."""
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def version_file(args, name):
    """Path of the file ``name`` in this model's version folder."""
    return os.path.join(args["model_repository"], args["model_version"], name)


def error_response(error):
    """An ``InferenceResponse`` carrying ``error``'s message (the request fails, not the model)."""
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))


class Cancelled(Exception):
    """The request was cancelled by its client or ran past its timeout; stop working on it."""


class Budget:
    """When a generation loop must stop: client cancellation or the request's own timeout.

    Triton marks a request cancelled when its gRPC client cancels the call
    (Triton docs, "Request Cancellation", r23.10+); its HTTP endpoint does not
    (a closed connection leaves the request running). The HTTP client's
    ``timeout`` request parameter (microseconds, 0 = none) is therefore also
    honoured here as the whole request's budget, counted from ``execute``.

    Args:
        request: the ``pb_utils.InferenceRequest`` being generated for.
    """

    def __init__(self, request):
        self.request = request
        timeout_us = int(request.timeout() or 0)
        self.ends = time.monotonic() + timeout_us / 1e6 if timeout_us > 0 else None

    def check(self):
        """Raise :class:`Cancelled` if the request was cancelled or its timeout has passed."""
        if self.request.is_cancelled():
            raise Cancelled("the request was cancelled")
        if self.ends is not None and time.monotonic() > self.ends:
            raise Cancelled("the request ran past its timeout")


def cancelled_response(error):
    """An ``InferenceResponse`` failing the request with Triton's CANCELLED code."""
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(str(error), pb_utils.TritonError.CANCELLED)
    )


def infer(model_name, inputs, output_names):
    """One BLS call: run ``model_name`` on ``inputs`` ({name: array}); the named outputs.

    Outputs are asked for in CPU memory: on a GPU a network's outputs would
    otherwise stay on the device, where ``as_numpy()`` raises.

    Raises:
        RuntimeError: the called model answered with an error (its message).
    """
    request = pb_utils.InferenceRequest(
        model_name=model_name,
        requested_output_names=list(output_names),
        inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()],
        preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
    )
    response = request.exec()
    if response.has_error():
        raise RuntimeError(response.error().message())
    return [pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in output_names]


def sample_top_k(logits, temperature, top_k, rng):
    """One id from ``logits`` [V]: top-k softmax sampling of ``logits / temperature``.

    ``temperature`` <= 0 is greedy (argmax); ``top_k`` 0 or >= V keeps the whole
    vocabulary. ``rng`` is a ``numpy.random.Generator`` (one draw per call).
    """
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    if 0 < top_k < scaled.size:
        cutoff = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled >= cutoff, scaled, -np.inf)
    probabilities = np.exp(scaled - np.max(scaled))
    probabilities /= probabilities.sum()
    return int(rng.choice(scaled.size, p=probabilities))
