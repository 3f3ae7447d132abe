"""Triton python model ``<name>_prompt``: conversation segments -> CSM prompt frames.

Inputs (``max_batch_size: 0``), one entry per segment, oldest first, the last
one being the open turn: ``SEGMENT_TEXT`` BYTES [n] (UTF-8, may be empty),
``SEGMENT_SPEAKER`` BYTES [n] (speaker label), ``SEGMENT_AUDIO`` FP32 [S]
(every segment's 24 kHz mono audio, concatenated), ``SEGMENT_AUDIO_SAMPLES``
INT64 [n] (samples of each segment in ``SEGMENT_AUDIO``; 0 = no audio; the open
turn has none), ``MAX_NEW_FRAMES`` INT32 [1].
Outputs: ``FRAMES`` INT64 [1, T, Q+1], ``FRAME_MASK`` BOOL [1, T, Q+1],
``DROPPED_SEGMENTS`` INT32 [1] (oldest history segments left out).

Frames follow SesameAILabs/csm ``generator.py``: a segment's text is
``[{speaker}]{text}`` tokenized and wrapped BOS...EOS, one frame per token with
only the text column (index Q) set; its audio is the Mimi codes (``encoder``
model, BLS) plus one all-zero EOS frame, only the Q codebook columns set. The
prompt keeps the most recent history segments that fit in ``max_seq_len -
MAX_NEW_FRAMES`` positions; an open turn that alone does not fit is an error
whose message starts with ``prompt_too_long:``.
"""

import converse_backend as backend

# isort: split
import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer


class TritonPythonModel:
    """CSM prompt builder (see module docstring)."""

    def initialize(self, args):
        """Load the tokenizer and read the frame geometry from the config."""
        parameter = backend.parameters(args)
        self.tokenizer = Tokenizer.from_file(backend.version_file(args, "tokenizer.json"))
        self.encoder = parameter["encoder"]
        self.codebooks = int(parameter["num_codebooks"])
        self.max_seq_len = int(parameter["max_seq_len"])
        self.bos = int(parameter["bos_token_id"])
        self.eos = int(parameter["eos_token_id"])
        self.frame_samples = int(parameter["frame_samples"])

    def _text_frames(self, speaker, text):
        ids = [self.bos, *self.tokenizer.encode(f"[{speaker}]{text}", add_special_tokens=False).ids,
               self.eos]
        frames = np.zeros((len(ids), self.codebooks + 1), np.int64)
        mask = np.zeros(frames.shape, bool)
        frames[:, -1] = ids
        mask[:, -1] = True
        return frames, mask

    def _audio_frames(self, audio):
        if audio.size < self.frame_samples:  # the encoder needs one whole frame
            audio = np.pad(audio, (0, self.frame_samples - audio.size))
        (codes,) = backend.infer(
            self.encoder, {"audio": audio.reshape(1, 1, -1).astype(np.float32)}, ["audio_codes"]
        )
        codes = codes[0]
        frames = np.zeros((codes.shape[1] + 1, self.codebooks + 1), np.int64)
        frames[:-1, :-1] = codes.T
        mask = np.zeros(frames.shape, bool)
        mask[:, :-1] = True
        return frames, mask

    def _frame_count(self, speaker, text, samples):
        """Positions a segment takes: BOS + text tokens + EOS, Mimi frames + EOS frame."""
        tokens = len(self.tokenizer.encode(f"[{speaker}]{text}", add_special_tokens=False).ids) + 2
        return tokens + (-(-samples // self.frame_samples) + 1 if samples else 0)

    def _build(self, texts, speakers, audio, samples, max_new_frames):
        if max_new_frames >= self.max_seq_len:
            raise ValueError(f"MAX_NEW_FRAMES must be below {self.max_seq_len}")
        budget = self.max_seq_len - max_new_frames
        open_frames = self._frame_count(speakers[-1], texts[-1], 0)
        if open_frames > budget:
            raise ValueError(
                f"prompt_too_long: the open turn needs {open_frames} positions, but only "
                f"{budget} of the model's {self.max_seq_len} are left after max_new_tokens "
                f"{max_new_frames}"
            )
        starts = np.concatenate([[0], np.cumsum(samples)])
        kept, used = [], open_frames
        for index in range(len(texts) - 2, -1, -1):
            need = self._frame_count(speakers[index], texts[index], int(samples[index]))
            if used + need > budget:
                break
            kept.insert(0, index)
            used += need
        parts = []
        for index in kept:
            parts.append(self._text_frames(speakers[index], texts[index]))
            if samples[index]:
                parts.append(self._audio_frames(audio[starts[index]:starts[index + 1]]))
        parts.append(self._text_frames(speakers[-1], texts[-1]))
        frames = np.concatenate([f for f, _ in parts])[None]
        mask = np.concatenate([m for _, m in parts])[None]
        return frames, mask, len(texts) - 1 - len(kept)

    def execute(self, requests):
        """Build one prompt per request."""
        responses = []
        for request in requests:

            def tensor(name, request=request):
                return pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)

            try:
                texts = [t.decode("utf-8") for t in tensor("SEGMENT_TEXT")]
                speakers = [s.decode("utf-8") for s in tensor("SEGMENT_SPEAKER")]
                samples = tensor("SEGMENT_AUDIO_SAMPLES").astype(np.int64)
                audio = tensor("SEGMENT_AUDIO")
                if not (len(texts) == len(speakers) == len(samples)) or not texts:
                    raise ValueError("SEGMENT_* inputs must have one entry per segment")
                if samples.min() < 0 or samples.sum() != audio.size or samples[-1] != 0:
                    raise ValueError("SEGMENT_AUDIO_SAMPLES must split SEGMENT_AUDIO exactly")
                frames, mask, dropped = self._build(
                    texts, speakers, audio, samples, int(tensor("MAX_NEW_FRAMES")[0])
                )
            except (RuntimeError, ValueError, UnicodeDecodeError) as error:
                responses.append(backend.error_response(error))
                continue
            outputs = [
                pb_utils.Tensor("FRAMES", frames),
                pb_utils.Tensor("FRAME_MASK", mask),
                pb_utils.Tensor("DROPPED_SEGMENTS", np.array([dropped], np.int32)),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
