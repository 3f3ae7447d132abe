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
windows equals N calls with one. Before every :data:`BUDGET_CHECK_WINDOWS`
windows the loop checks the request's budget (``converse_backend.Budget``:
client cancellation, the request's deadline) and fails the request with
Triton's CANCELLED code once it is spent, so a long request does not hold
the instance, which every live session shares, past its caller's patience.
"""

import converse_backend as backend

# isort: split
import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

WINDOW = {16000: 512, 8000: 256}
CONTEXT = {16000: 64, 8000: 32}
# Windows between two budget checks: 1.024 s of audio at 16 kHz, about 2 ms of one
# core (0.07 ms a window on a 2-core CPU). A check asks the server whether the request
# was cancelled (a round trip from the python stub to it), which is not free beside
# a 0.07 ms window; a cancelled or late call still stops within about 2 ms.
BUDGET_CHECK_WINDOWS = 32


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

    def _run(self, budget, windows, state, context, sample_rate):
        """Probabilities FP32 [N] and the state after the last window (module docstring).

        Raises:
            ValueError: a rate or shape the model does not take.
            converse_backend.Cancelled: ``budget`` was spent (checked before every
                :data:`BUDGET_CHECK_WINDOWS` windows, the first included).
        """
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
            if index % BUDGET_CHECK_WINDOWS == 0:
                budget.check()
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
                    backend.Budget(request),
                    np.ascontiguousarray(tensor("WINDOWS"), dtype=np.float32),
                    np.ascontiguousarray(tensor("STATE"), dtype=np.float32),
                    np.ascontiguousarray(tensor("CONTEXT"), dtype=np.float32),
                    int(tensor("SAMPLE_RATE").reshape(-1)[0]),
                )
            except backend.Cancelled as error:
                responses.append(backend.cancelled_response(error))
                continue
            except ValueError as error:
                responses.append(backend.error_response(error))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("PROBABILITIES", probabilities),
                pb_utils.Tensor("STATE_OUT", np.ascontiguousarray(state, dtype=np.float32)),
            ]))
        return responses
