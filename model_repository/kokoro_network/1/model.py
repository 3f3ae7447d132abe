"""Triton python model ``kokoro_network``: the Kokoro-82M ONNX graph on onnxruntime (CPU).

The local tritonserver has only the python backend, so this wraps the same
``model.onnx`` that the GPU repository serves with ``platform: "onnxruntime_onnx"``.
Tensors (``max_batch_size: 0``): ``tokens`` INT64 [1, T], ``style`` FP32 [1, 256],
``speed`` FP32 [1] -> ``audio`` FP32 [n_samples] at 24 kHz.
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
    """onnxruntime wrapper of ``model.onnx`` with the GPU config's tensor contract."""

    def initialize(self, args):
        """Open an onnxruntime session on this version's ``model.onnx``."""
        config = json.loads(args["model_config"])
        threads = int(config["parameters"]["intra_op_threads"]["string_value"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        """Run the graph once per request (the graph's batch dimension is fixed at 1)."""
        responses = []
        for request in requests:
            feeds = {
                name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                for name in ("tokens", "style", "speed")
            }
            try:
                (audio,) = self.session.run(["audio"], feeds)
            except Exception as error:  # onnxruntime raises its own untyped errors
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error))))
                continue
            tensor = pb_utils.Tensor("audio", np.ascontiguousarray(audio, np.float32).reshape(-1))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses
