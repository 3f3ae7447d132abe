"""Triton python model: one ONNX graph on onnxruntime (the local CPU repository).

The local tritonserver has only the python backend, so every network that the
GPU repository serves with ``platform: "onnxruntime_onnx"`` is wrapped by this
file instead (``python -m export`` copies it next to the ``model.onnx``).
Tensor names come from the model's config, so names, shapes and dtypes match
the GPU variant exactly; each request runs the graph once.
"""

import json
import os
import sys

# The local tritonserver's stub interpreter ignores PYTHONPATH; the launcher
# passes the project's site-packages in this variable instead.
sys.path[:0] = [p for p in os.environ.get("CONVERSE_SITE_PACKAGES", "").split(os.pathsep) if p]

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    """onnxruntime wrapper of this version's ``model.onnx``."""

    def initialize(self, args):
        """Open an onnxruntime session; read tensor names from the config."""
        config = json.loads(args["model_config"])
        threads = int(config["parameters"]["intra_op_threads"]["string_value"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
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
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error))))
                continue
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(value))
                for name, value in zip(self.outputs, results, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
