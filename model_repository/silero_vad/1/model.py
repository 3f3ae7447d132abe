"""Triton python model ``silero_vad``: Silero VAD over consecutive windows, caller-kept state.

Inputs (``max_batch_size: 0``): ``WINDOWS`` FP32 [N, W], N >= 1 consecutive
windows of mono audio in [-1, 1], W = 512 samples at 16 kHz or 256 at 8 kHz;
``STATE`` FP32 [2, 1, 128], the network's recurrent state after the previous
window (zeros at the start of a stream); ``CONTEXT`` FP32 [C], the last C
samples before the first window (C = 64 at 16 kHz, 32 at 8 kHz; zeros at the
start); ``SAMPLE_RATE`` INT64 [1], 16000 or 8000.
Outputs: ``PROBABILITIES`` FP32 [N], speech probability per window;
``STATE_OUT`` FP32 [2, 1, 128], the state after the last window (the next
call's ``CONTEXT`` is the last C samples of the last window).

Each window runs the network once, in order, on ``[context | window]``
exactly as silero-vad's own ``OnnxWrapper`` does (silero_vad/utils_vad.py,
v6.2: 64 samples of context at 16 kHz, 32 at 8 kHz), so one call with N
windows equals N calls with one.
"""

import converse_backend as backend

# isort: split
import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

WINDOW = {16000: 512, 8000: 256}
CONTEXT = {16000: 64, 8000: 32}


class TritonPythonModel:
    """Silero VAD window loop (see module docstring)."""

    def initialize(self, args):
        """Open the onnxruntime session on this version's ``silero_vad.onnx``."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(backend.parameters(args)["intra_op_threads"])
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            backend.version_file(args, "silero_vad.onnx"), options,
            providers=["CPUExecutionProvider"],
        )

    def _run(self, windows, state, context, sample_rate):
        if sample_rate not in WINDOW:
            raise ValueError(f"SAMPLE_RATE must be one of {sorted(WINDOW)}, not {sample_rate}")
        if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] != WINDOW[sample_rate]:
            raise ValueError(
                f"WINDOWS must be [N >= 1, {WINDOW[sample_rate]}] at {sample_rate} Hz, "
                f"not {list(windows.shape)}"
            )
        if context.shape != (CONTEXT[sample_rate],):
            raise ValueError(
                f"CONTEXT must be [{CONTEXT[sample_rate]}] at {sample_rate} Hz, "
                f"not {list(context.shape)}"
            )
        rate = np.array(sample_rate, dtype=np.int64)
        probabilities = np.empty(windows.shape[0], dtype=np.float32)
        for index, window in enumerate(windows):
            frame = np.concatenate([context, window])[None, :]
            output, state = self.session.run(None, {"input": frame, "state": state, "sr": rate})
            probabilities[index] = output[0, 0]
            context = window[-context.size:]
        return probabilities, state

    def execute(self, requests):
        """One response per request: the probabilities of its windows and the new state."""
        responses = []
        for request in requests:

            def tensor(name, request=request):
                return pb_utils.get_input_tensor_by_name(request, name).as_numpy()

            try:
                probabilities, state = self._run(
                    np.ascontiguousarray(tensor("WINDOWS"), dtype=np.float32),
                    np.ascontiguousarray(tensor("STATE"), dtype=np.float32),
                    np.ascontiguousarray(tensor("CONTEXT"), dtype=np.float32),
                    int(tensor("SAMPLE_RATE").reshape(-1)[0]),
                )
            except ValueError as error:
                responses.append(backend.error_response(error))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("PROBABILITIES", probabilities),
                pb_utils.Tensor("STATE_OUT", np.ascontiguousarray(state, dtype=np.float32)),
            ]))
        return responses
