"""Triton python model ``whisper_asr``: speech -> transcript with word timestamps.

Inputs (``max_batch_size: 0``): ``AUDIO`` FP32 [n_samples], mono, 16 kHz, [-1, 1];
optional ``LANGUAGE`` BYTES [1], an ISO 639-1 code Whisper knows (default ``en``).
Outputs: ``TEXT`` BYTES [1] (UTF-8 transcript) and ``WORDS`` BYTES [1] (UTF-8
JSON list of ``{"word", "start", "end"}``, seconds from the clip's start).
Runs faster-whisper (CTranslate2) on the Whisper-base conversion in
``whisper-base/``; greedy decoding (beam 1) without faster-whisper's sampled
temperature fallback, so a transcript is deterministic.

Encoder window: Whisper pads every clip to 30 s before its encoder, which is
most of the cost of a short clip (on 2 CPU cores ~0.66 s of the ~0.7 s a 2 s
question takes). With the config parameter ``min_encoder_window_s`` below 30,
the encoder sees the clip plus :data:`WINDOW_MARGIN_FRAMES` of the same zero
padding, at least ``min_encoder_window_s`` long: whisper.cpp's ``audio_ctx``
(ggml-org/whisper.cpp#137, sized from the clip's length as in #1855). Cut too
short, Whisper may repeat itself into the padding; those words come out with
no duration, and such a clip is transcribed again with the full 30 s window.
docs/PERFORMANCE.md has the speed and WER of both windows.

Repetition loops: greedy Whisper-base can fall into a loop on repetitive
speech (Kokoro's "Ha ha ha ha ha ha ha ha ha ha." comes out as "Dojojojo..."
888 characters long). A transcript longer than anyone speaks in the clip's
time (:data:`MAX_CHARS_PER_S`, plus :data:`SLACK_CHARS`) is decoded again
with CTranslate2's ``no_repeat_ngram_size`` :data:`LOOP_NGRAM` (full
window), which is kept if it is shorter and not empty. Only then: the option
also thins out repetitions that were really said ("yes, yes, yes, yes" ->
"yes, yes, yes").

Cancellation: faster-whisper decodes a clip lazily, one 30 s window at a time,
so a request that its gRPC client cancelled or whose ``timeout`` passed
(``converse_backend.Budget``) stops after the window in progress and fails
with CANCELLED; a 13-minute history clip no longer holds the one instance for
minutes after its client has gone.
"""

import json

import converse_backend as backend

# isort: split
import numpy as np
import triton_python_backend_utils as pb_utils
from faster_whisper import WhisperModel

# Whisper's window: 30 s of 10 ms log-mel frames (the encoder's trained input).
FULL_WINDOW_FRAMES = 3000
# Log-mel frames per second (hop 160 samples at 16 kHz).
FRAMES_PER_SECOND = 100
# Whisper's input sample rate, Hz.
SAMPLE_RATE = 16_000
# Padding kept after the clip: 256 frames = 128 encoder positions (whisper.cpp#1855).
WINDOW_MARGIN_FRAMES = 256
# A word shorter than this (seconds) was written into the padding, not heard.
MIN_WORD_S = 0.02
# Characters (spaces included) per second of clip beyond any speech: about twice
# the fastest the bundled voice speaks (12-22 characters/s over ten rendered
# phrases, pauses included; docs/author.md). A loop runs far past it.
MAX_CHARS_PER_S = 40
# Allowance on top, for short clips (a single long word, punctuation).
SLACK_CHARS = 20
# Token n-grams that may not repeat in the second decoding of a looping transcript.
LOOP_NGRAM = 3


def encoder_window_frames(samples, min_window_s):
    """Log-mel frames the encoder sees for a clip of ``samples`` 16 kHz samples.

    The clip's frames plus :data:`WINDOW_MARGIN_FRAMES`, at least
    ``min_window_s`` seconds, at most :data:`FULL_WINDOW_FRAMES`.
    """
    frames = samples // 160 + 1 + WINDOW_MARGIN_FRAMES
    return min(FULL_WINDOW_FRAMES, max(frames, int(min_window_s * FRAMES_PER_SECOND)))


class WindowedWhisper(WhisperModel):
    """faster-whisper whose encoder input stops after ``window_frames`` log-mel frames.

    faster-whisper pads each window's features with zeros to 3000 frames; this
    drops the padding past ``window_frames`` (no other change to the features).
    """

    window_frames = FULL_WINDOW_FRAMES

    def encode(self, features):
        """Encode features [80, 3000] (or [1, 80, 3000]) cut to ``window_frames``."""
        return super().encode(features[..., : self.window_frames])


class TritonPythonModel:
    """faster-whisper wrapper (see module docstring for the tensor contract)."""

    def initialize(self, args):
        """Load the CTranslate2 model with the config's device, compute type and window."""
        parameter = backend.parameters(args)
        self.min_window_s = float(parameter["min_encoder_window_s"])
        self.model = WindowedWhisper(
            backend.version_file(args, "whisper-base"),
            device=parameter["device"],
            compute_type=parameter["compute_type"],
            cpu_threads=int(parameter["cpu_threads"]),
        )

    def _decode(self, budget, audio, language, window_frames, no_repeat_ngram_size=0):
        self.model.window_frames = window_frames
        budget.check()
        segments, _ = self.model.transcribe(
            audio, language=language, beam_size=1, temperature=0.0, word_timestamps=True,
            vad_filter=False, no_repeat_ngram_size=no_repeat_ngram_size,
        )
        decoded = []
        for segment in segments:  # decoded lazily, one window at a time
            decoded.append(segment)
            budget.check()
        text = "".join(segment.text for segment in decoded).strip()
        return text, [w for segment in decoded for w in segment.words or []]

    def _transcribe(self, budget, audio, language):
        window = encoder_window_frames(len(audio), self.min_window_s)
        text, words = self._decode(budget, audio, language, window)
        if window < FULL_WINDOW_FRAMES and any(w.end - w.start < MIN_WORD_S for w in words):
            text, words = self._decode(budget, audio, language, FULL_WINDOW_FRAMES)
        if len(text) > MAX_CHARS_PER_S * len(audio) / SAMPLE_RATE + SLACK_CHARS:
            again = self._decode(budget, audio, language, FULL_WINDOW_FRAMES,
                                 no_repeat_ngram_size=LOOP_NGRAM)
            if again[0] and len(again[0]) < len(text):
                text, words = again
        timed = [
            {"word": w.word.strip(), "start": round(w.start, 3), "end": round(w.end, 3)}
            for w in words
        ]
        return text, timed

    def execute(self, requests):
        """One transcription per request."""
        responses = []
        for request in requests:
            audio = pb_utils.get_input_tensor_by_name(request, "AUDIO").as_numpy()
            audio = np.ascontiguousarray(audio.reshape(-1), dtype=np.float32)
            language = pb_utils.get_input_tensor_by_name(request, "LANGUAGE")
            code = "en" if language is None else language.as_numpy().reshape(-1)[0].decode()
            try:
                text, words = self._transcribe(backend.Budget(request), audio, code)
            except backend.Cancelled as error:
                responses.append(backend.cancelled_response(error))
                continue
            except (RuntimeError, ValueError) as error:
                responses.append(backend.error_response(error))
                continue
            outputs = [
                pb_utils.Tensor("TEXT", np.array([text.encode()], dtype=np.object_)),
                pb_utils.Tensor("WORDS", np.array([json.dumps(words).encode()], dtype=np.object_)),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
