"""Triton python model ``<name>_generator``: the CSM frame loop (BLS).

Inputs (``max_batch_size: 0``): ``FRAMES`` INT64 [1, T, Q+1] and
``FRAME_MASK`` BOOL [1, T, Q+1] (the prompt), ``MAX_NEW_FRAMES`` INT32 [1],
``TEMPERATURE`` FP32 [1] (codebook 0; 0 = greedy), ``DEPTH_TEMPERATURE`` FP32
[1] (codebooks 1..Q-1; 0 = greedy), ``TOP_K`` INT32 [1], ``REPETITION_PENALTY``
FP32 [1] (1 = off), ``PENALTY_WINDOW`` INT32 [1] (frames), ``SEED`` INT64 [1].
Output: ``AUDIO_CODES`` INT64 [1, Q, F], the generated frames without the
all-zero end frame.

Per frame (transformers ``generation_csm.py`` / SesameAILabs/csm
``generator.py``): one ``backbone`` call (prefill with the prompt, then one
position) -> codebook 0 sampled here from ``codebook0_logits`` -> one ``depth``
call for codebooks 1..Q-1 (Gumbel noise drawn here, so one seed fixes the whole
output) -> stop when all Q codebooks are 0, at MAX_NEW_FRAMES, or at
``max_seq_len``. Codebook-0 logits go through, in this order, a repetition
penalty over the codebook-0 values of the last PENALTY_WINDOW frames (CTRL,
Keskar et al. 2019: positive logits divided by the penalty, negative ones
multiplied), temperature, top-k, then softmax sampling. Before each frame the
loop checks the request's budget (``converse_backend.Budget``: client
cancellation, request timeout) and fails the request with CANCELLED once it is
spent.
"""

import converse_backend as backend

# isort: split
import numpy as np
import triton_python_backend_utils as pb_utils


def penalize_repeats(logits, recent, penalty):
    """``logits`` [V] as float64 with the CTRL repetition penalty on the ``recent`` ids.

    Positive logits of ids in ``recent`` are divided by ``penalty``, negative
    ones multiplied (Keskar et al. 2019); ``penalty`` 1 leaves them unchanged.
    """
    scores = logits.astype(np.float64)
    if penalty != 1.0 and len(recent):
        seen = np.unique(np.asarray(recent, dtype=np.int64))
        scores[seen] = np.where(scores[seen] > 0, scores[seen] / penalty, scores[seen] * penalty)
    return scores


class TritonPythonModel:
    """CSM generator loop (see module docstring)."""

    def initialize(self, args):
        """Read the model names and cache geometry from the config."""
        parameter = backend.parameters(args)
        self.backbone = parameter["backbone"]
        self.depth = parameter["depth"]
        self.codebooks = int(parameter["num_codebooks"])
        self.vocab = int(parameter["vocab_size"])
        self.max_seq_len = int(parameter["max_seq_len"])
        self.cache_shape = (
            int(parameter["num_layers"]), 1, int(parameter["kv_heads"]), 0,
            int(parameter["head_dim"]),
        )

    def _generate(self, budget, frames, mask, max_new, temperature, depth_temperature, top_k,
                  penalty, window, seed):
        rng = np.random.default_rng(seed)
        keys = np.zeros(self.cache_shape, np.float32)
        values = np.zeros(self.cache_shape, np.float32)
        frame_mask = np.zeros((1, 1, self.codebooks + 1), bool)
        frame_mask[..., :-1] = True
        depth_top_k = np.array([top_k if 0 < top_k < self.vocab else self.vocab], np.int64)
        generated = []
        position = frames.shape[1]
        while len(generated) < max_new and position < self.max_seq_len:
            budget.check()
            logits, hidden, keys, values = backend.infer(
                self.backbone,
                {"frames": frames, "frame_mask": mask, "past_keys": keys, "past_values": values},
                ["codebook0_logits", "last_hidden", "present_keys", "present_values"],
            )
            recent = [frame[0] for frame in generated[-window:]] if window > 0 else []
            first = backend.sample_top_k(
                penalize_repeats(logits[0], recent, penalty), temperature, top_k, rng
            )
            noise = rng.random((self.codebooks - 1, self.vocab), dtype=np.float32)
            (rest,) = backend.infer(
                self.depth,
                {
                    "last_hidden": hidden,
                    "codebook0": np.array([first], np.int64),
                    "temperature": np.array([depth_temperature], np.float32),
                    "top_k": depth_top_k,
                    "uniform_noise": noise,
                },
                ["codebooks"],
            )
            frame = np.concatenate([[first], rest[0]]).astype(np.int64)
            if not frame.any():
                break
            generated.append(frame)
            frames = np.zeros((1, 1, self.codebooks + 1), np.int64)
            frames[0, 0, :-1] = frame
            mask = frame_mask
            position += 1
        if not generated:
            raise RuntimeError("the model ended the turn before producing any audio frame")
        return np.stack(generated, axis=1)[None]

    def execute(self, requests):
        """Generate one turn's frames per request."""
        responses = []
        for request in requests:

            def tensor(name, request=request):
                return pb_utils.get_input_tensor_by_name(request, name).as_numpy()

            try:
                codes = self._generate(
                    backend.Budget(request),
                    tensor("FRAMES"),
                    tensor("FRAME_MASK"),
                    int(tensor("MAX_NEW_FRAMES").reshape(-1)[0]),
                    float(tensor("TEMPERATURE").reshape(-1)[0]),
                    float(tensor("DEPTH_TEMPERATURE").reshape(-1)[0]),
                    int(tensor("TOP_K").reshape(-1)[0]),
                    float(tensor("REPETITION_PENALTY").reshape(-1)[0]),
                    int(tensor("PENALTY_WINDOW").reshape(-1)[0]),
                    int(tensor("SEED").reshape(-1)[0]),
                )
            except backend.Cancelled as error:
                responses.append(backend.cancelled_response(error))
                continue
            except (RuntimeError, ValueError) as error:
                responses.append(backend.error_response(error))
                continue
            responses.append(
                pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("AUDIO_CODES", codes)])
            )
        return responses
