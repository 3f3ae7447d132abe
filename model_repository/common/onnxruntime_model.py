"""Triton python model: one ONNX graph on onnxruntime (the local CPU repository).

The local tritonserver has only the python backend, so every network that the
GPU repository serves with ``platform: "onnxruntime_onnx"`` is served by this
file instead (``python -m export`` copies it as ``<network>/1/model.py`` next
to the ``model.onnx``). Tensor names come from the model's config, so names,
shapes and dtypes match the GPU variant exactly; each request runs the graph
once. Config parameters: ``intra_op_threads``, onnxruntime threads (0 = all
cores); ``intra_op_spinning`` "0" stops idle pool threads from spinning, so
instances that share the cores do not take them from each other; ``nice``
(optional, 0-19) lowers the CPU priority of the model's process (its python
stub), so it runs on the cores other models leave idle.
"""

import json
import os

import converse_backend as backend

# isort: split
import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def lower_priority(nice):
    """Set the nice value of every thread of this process to ``nice`` (Linux).

    A Linux nice value belongs to a thread, so each thread in ``/proc/self/task``
    is set; threads started later (onnxruntime's pool) inherit it from their creator.
    A thread that ends between the listing and its turn is skipped.

    Args:
        nice: the nice value, 0-19 (higher runs later; raising it needs no privilege).

    Raises:
        PermissionError: ``nice`` is below the current value and the process may not lower it.
    """
    for thread in os.listdir("/proc/self/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(thread), nice)
        except ProcessLookupError:
            continue


class TritonPythonModel:
    """onnxruntime wrapper of this version's ``model.onnx``."""

    def initialize(self, args):
        """Open an onnxruntime session; read tensor names from the config."""
        config = json.loads(args["model_config"])
        options = ort.SessionOptions()
        parameters = backend.parameters(args)
        if "nice" in parameters:
            lower_priority(int(parameters["nice"]))
        options.intra_op_num_threads = int(parameters["intra_op_threads"])
        if parameters.get("intra_op_spinning") == "0":
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            backend.version_file(args, "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = [tensor["name"] for tensor in config["input"]]
        self.outputs = [tensor["name"] for tensor in config["output"]]

    def execute(self, requests):
        """Run the graph once per request."""
        responses = []
        for request in requests:
            feeds = {
                name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                for name in self.inputs
            }
            try:
                results = self.session.run(self.outputs, feeds)
            except Exception as error:  # onnxruntime raises its own untyped errors
                responses.append(backend.error_response(error))
                continue
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(value))
                for name, value in zip(self.outputs, results, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
