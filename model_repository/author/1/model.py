"""Triton python model ``author``: BLS generation loop over ``author_lm``.

Inputs (``max_batch_size: 0``): ``PROMPT`` BYTES [1] (UTF-8 text, tokenized
here with the exported ``tokenizer.json``, special tokens added);
``TEMPERATURE`` FP32 [1] (0 = greedy); ``TOP_K`` INT32 [1] (0 = whole
vocabulary); ``MAX_NEW_TOKENS`` INT32 [1]; ``SEED`` INT64 [1].
Outputs: ``TEXT`` BYTES [1], the decoded continuation without its stop token;
``TOKENS`` INT64 [n], the generated ids (stop token excluded).

Loop: ``converse_backend.generate`` (one prefill call with the whole prompt
and an empty cache, then one decode call per token, each an
``InferenceRequest`` to ``author_lm`` carrying the KV cache). Generation
stops at any ``stop_token_ids`` entry (EOS and every token containing a line
break), at ``MAX_NEW_TOKENS``, or at ``max_context``.
A prompt longer than ``max_context - MAX_NEW_TOKENS`` keeps its first token
(BOS) and its most recent tokens. Before each call the loop checks the
request's budget (``converse_backend.Budget``: client cancellation, request
timeout) and fails the request with CANCELLED once it is spent.
"""

import converse_backend as backend

# isort: split
import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer


class TritonPythonModel:
    """Author LM generation loop (see module docstring)."""

    def initialize(self, args):
        """Load the tokenizer and read the cache geometry from the config."""
        parameter = backend.parameters(args)
        self.tokenizer = Tokenizer.from_file(backend.version_file(args, "tokenizer.json"))
        self.network = parameter["network"]
        self.cache_shape = backend.empty_cache_shape(parameter)
        self.max_context = int(parameter["max_context"])
        self.stop_ids = {int(i) for i in parameter["stop_token_ids"].split(",") if i}

    def _generate(self, budget, prompt, temperature, top_k, max_new_tokens, seed):
        ids = self.tokenizer.encode(prompt).ids
        room = self.max_context - max_new_tokens
        if room < 2:
            raise ValueError(f"max_new_tokens must be below {self.max_context - 1}")
        if len(ids) > room:
            ids = ids[:1] + ids[len(ids) - room + 1:]
        budget.check()
        generated = []
        for token in backend.generate(
            self.network, self.cache_shape, ids, max_context=self.max_context,
            max_new_tokens=max_new_tokens, stop_ids=self.stop_ids, temperature=temperature,
            top_k=top_k, seed=seed,
        ):
            generated.append(token)
            budget.check()
        return self.tokenizer.decode(generated), generated

    def execute(self, requests):
        """Generate one continuation per request."""
        responses = []
        for request in requests:

            def scalar(name, request=request):
                return pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)[0]

            try:
                text, tokens = self._generate(
                    backend.Budget(request),
                    scalar("PROMPT").decode("utf-8"),
                    float(scalar("TEMPERATURE")),
                    int(scalar("TOP_K")),
                    int(scalar("MAX_NEW_TOKENS")),
                    int(scalar("SEED")),
                )
            except backend.Cancelled as error:
                responses.append(backend.cancelled_response(error))
                continue
            except (RuntimeError, ValueError, UnicodeDecodeError) as error:
                responses.append(backend.error_response(error))
                continue
            outputs = [
                pb_utils.Tensor("TEXT", np.array([text.encode("utf-8")], dtype=np.object_)),
                pb_utils.Tensor("TOKENS", np.asarray(tokens, dtype=np.int64)),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
