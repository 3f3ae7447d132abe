"""Triton python model ``whisper_asr``: speech -> transcript with word timestamps.

Inputs (``max_batch_size: 0``): ``AUDIO`` FP32 [n_samples], mono, 16 kHz, [-1, 1];
optional ``LANGUAGE`` BYTES [1], an ISO 639-1 code Whisper knows (default ``en``).
Outputs: ``TEXT`` BYTES [1] (UTF-8 transcript) and ``WORDS`` BYTES [1] (UTF-8
JSON list of ``{"word", "start", "end"}``, seconds from the clip's start).
Runs faster-whisper (CTranslate2) on the Whisper-base conversion in
``whisper-base/``; greedy decoding (beam 1) without faster-whisper's sampled
temperature fallback, so a transcript is deterministic.
"""

import json

import converse_backend as backend

# isort: split
import numpy as np
import triton_python_backend_utils as pb_utils
from faster_whisper import WhisperModel


class TritonPythonModel:
    """faster-whisper wrapper (see module docstring for the tensor contract)."""

    def initialize(self, args):
        """Load the CTranslate2 model with the config's device and compute type."""
        parameter = backend.parameters(args)
        self.model = WhisperModel(
            backend.version_file(args, "whisper-base"),
            device=parameter["device"],
            compute_type=parameter["compute_type"],
            cpu_threads=int(parameter["cpu_threads"]),
        )

    def _transcribe(self, audio, language):
        segments, _ = self.model.transcribe(
            audio, language=language, beam_size=1, temperature=0.0, word_timestamps=True,
            vad_filter=False,
        )
        segments = list(segments)
        text = "".join(segment.text for segment in segments).strip()
        words = [
            {"word": w.word.strip(), "start": round(w.start, 3), "end": round(w.end, 3)}
            for segment in segments
            for w in segment.words or []
        ]
        return text, words

    def execute(self, requests):
        """One transcription per request."""
        responses = []
        for request in requests:
            audio = pb_utils.get_input_tensor_by_name(request, "AUDIO").as_numpy()
            audio = np.ascontiguousarray(audio.reshape(-1), dtype=np.float32)
            language = pb_utils.get_input_tensor_by_name(request, "LANGUAGE")
            code = "en" if language is None else language.as_numpy().reshape(-1)[0].decode()
            try:
                text, words = self._transcribe(audio, code)
            except (RuntimeError, ValueError) as error:
                responses.append(backend.error_response(error))
                continue
            outputs = [
                pb_utils.Tensor("TEXT", np.array([text.encode()], dtype=np.object_)),
                pb_utils.Tensor("WORDS", np.array([json.dumps(words).encode()], dtype=np.object_)),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
