"""Helpers shared by converse's python-backend models.

Not a Triton model: ``python -m export`` copies this file next to every python
model's ``model.py`` in the built repository (Triton's python backend puts the
version folder on ``sys.path``). A ``model.py`` imports it before numpy and
``triton_python_backend_utils``, because importing it puts the project's
site-packages first on ``sys.path``: the local tritonserver's stub interpreter
ignores PYTHONPATH, so the launcher passes them in ``CONVERSE_SITE_PACKAGES``
(and the stub gets numpy 1.26; with numpy 2 it returns empty tensors). The
variable is unset in the NGC container, where this is a no-op.
"""

import collections
import itertools
import json
import os
import sys
import threading
import time

sys.path[:0] = [p for p in os.environ.get("CONVERSE_SITE_PACKAGES", "").split(os.pathsep) if p]

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


def parameters(args):
    """The model config's ``parameters`` as ``{key: string_value}``."""
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def version_file(args, name):
    """Path of the file ``name`` in this model's version folder."""
    return os.path.join(args["model_repository"], args["model_version"], name)


def error_response(error):
    """An ``InferenceResponse`` carrying ``error``'s message (the request fails, not the model)."""
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))


class Cancelled(Exception):
    """The request was cancelled by its client or ran past its timeout; stop working on it."""


# Request parameter the API sends: the request's deadline, Unix microseconds
# (handler/triton.py, DEADLINE_PARAMETER).
DEADLINE_PARAMETER = "converse_deadline_unix_us"


class Budget:
    """When a generation loop must stop: client cancellation or the request's own timeout.

    Triton marks a request cancelled when its gRPC client cancels the call
    (Triton docs, "Request Cancellation", r23.10+); its HTTP endpoint does not
    (a closed connection leaves the request running). The request's deadline
    is therefore also honoured here: :data:`DEADLINE_PARAMETER` (Unix
    microseconds, from the API) when the request carries it, which counts the
    time it waited in Triton's queue; else the ``timeout`` request parameter
    (microseconds, 0 = none) as the whole budget, counted from ``execute``.

    Args:
        request: the ``pb_utils.InferenceRequest`` being generated for.
    """

    def __init__(self, request):
        self.request = request
        deadline_us = _deadline_us(request)
        timeout_us = int(request.timeout() or 0)
        if deadline_us is not None:
            self.ends = time.monotonic() + deadline_us / 1e6 - time.time()
        elif timeout_us > 0:
            self.ends = time.monotonic() + timeout_us / 1e6
        else:
            self.ends = None

    def check(self):
        """Raise :class:`Cancelled` if the request was cancelled or its timeout has passed."""
        if self.request.is_cancelled():
            raise Cancelled("the request was cancelled")
        if self.ends is not None and time.monotonic() > self.ends:
            raise Cancelled("the request ran past its timeout")


def _deadline_us(request):
    """The request's :data:`DEADLINE_PARAMETER`, or None when it has none (or not an int)."""
    try:
        value = json.loads(request.parameters() or "{}").get(DEADLINE_PARAMETER)
    except (AttributeError, ValueError):  # a request without parameters(), or bad JSON
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def cancelled_response(error):
    """An ``InferenceResponse`` failing the request with Triton's CANCELLED code."""
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(str(error), pb_utils.TritonError.CANCELLED)
    )


def infer(model_name, inputs, output_names):
    """One BLS call: run ``model_name`` on ``inputs`` ({name: array}); the named outputs.

    Outputs are asked for in CPU memory: on a GPU a network's outputs would
    otherwise stay on the device, where ``as_numpy()`` raises.

    Raises:
        RuntimeError: the called model answered with an error (its message).
    """
    request = pb_utils.InferenceRequest(
        model_name=model_name,
        requested_output_names=list(output_names),
        inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()],
        preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
    )
    response = request.exec()
    if response.has_error():
        raise RuntimeError(response.error().message())
    return [pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in output_names]


def sample_top_k(logits, temperature, top_k, rng):
    """One id from ``logits`` [V]: top-k softmax sampling of ``logits / temperature``.

    ``temperature`` <= 0 is greedy (argmax); ``top_k`` 0 or >= V keeps the whole
    vocabulary. ``rng`` is a ``numpy.random.Generator`` (one draw per call).
    """
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    if 0 < top_k < scaled.size:
        cutoff = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled >= cutoff, scaled, -np.inf)
    probabilities = np.exp(scaled - np.max(scaled))
    probabilities /= probabilities.sum()
    return int(rng.choice(scaled.size, p=probabilities))


def penalise_repetition(logits, seen_ids, penalty, variants=None):
    """``logits`` [V] with every id in ``seen_ids`` made less likely by ``penalty`` (>= 1).

    The CTRL rule as transformers' ``RepetitionPenaltyLogitsProcessor`` applies
    it (Keskar et al. 2019): a positive logit is divided by ``penalty``, a
    negative one multiplied. ``penalty`` 1 returns ``logits`` unchanged.
    ``variants`` (INT64, from :func:`spelling_variants`; None for none)
    names a second id penalised with each seen one: the same word with the
    other leading-space form (ids past its end, e.g. a padded vocabulary's,
    have none).
    """
    if penalty == 1.0 or not seen_ids:
        return logits
    logits = np.array(logits, dtype=np.float32)
    ids = np.unique(np.asarray(seen_ids, dtype=np.int64))
    if variants is not None:
        twins = variants[ids[ids < len(variants)]]
        ids = np.union1d(ids, twins[twins >= 0])
    scores = logits[ids]
    logits[ids] = np.where(scores < 0, scores * penalty, scores / penalty)
    return logits


def spelling_variants(tokenizer):
    """INT64 [max id + 1]: each word token's id with the other leading-space form, else -1.

    A byte-level BPE vocabulary holds most words twice, " to" (``Ġto``) and
    "to"; the second follows a word only to glue onto it ("expectto"). The
    CTRL penalty on a seen " to" alone makes the glued form the likelier one
    once the spaced one has been used: with SmolLM2-135M-Instruct at
    temperature 0.7 a spaced word used before falls from about 0.97 to 0.01
    and its glued twin rises 60-fold (docs/sessions-models.md), so long
    replies came out with glued words that the voice then mispronounced.
    Penalising both forms together keeps the model's own choice between them.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``. Its space marker is what its
            pre-tokenizer (else its normalizer) adds in front of "a" when it
            writes " a" (``Ġ`` byte-level, ``▁`` SentencePiece); one that keeps
            the space apart (e.g. a character-level vocabulary) gives no variants.

    Returns:
        The table for :func:`penalise_repetition`, one entry per id up to the
        vocabulary's largest; only tokens whose text without the marker is ASCII
        letters and digits are paired (a byte-level vocabulary writes newlines and
        UTF-8 fragments as letters too, "Ċ", "Ã").
    """
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    variants = np.full(max(vocab.values()) + 1, -1, dtype=np.int64)
    if tokenizer.pre_tokenizer is not None:
        def probe(text):
            return "".join(piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text))
    elif tokenizer.normalizer is not None:
        probe = tokenizer.normalizer.normalize_str
    else:
        return variants
    spaced_a, plain_a = probe(" a"), probe("a")
    marker = spaced_a[: len(spaced_a) - len(plain_a)]
    if not marker.strip() or not spaced_a.endswith(plain_a):
        return variants
    for token, index in vocab.items():
        spaced = token.startswith(marker)
        bare = token[len(marker):] if spaced else token
        if bare.isascii() and bare.isalnum():
            twin = vocab.get(bare if spaced else marker + bare)
            if twin is not None:
                variants[index] = twin
    return variants


def empty_cache_shape(parameter):
    """The KV cache shape [L, 1, H_kv, 0, D] of a step graph, from an LM loop's config parameters.

    ``parameter`` is :func:`parameters`' dict with ``num_layers``, ``kv_heads``
    and ``head_dim`` (written by ``export/causal_lm.py``).
    """
    return (int(parameter["num_layers"]), 1, int(parameter["kv_heads"]), 0,
            int(parameter["head_dim"]))


class PrefixCache:
    """Recent generations' KV caches: a prompt is prefilled only past what it shares with one.

    A live session's prompts grow turn by turn: each is the one before, its
    reply and the next user turn, after the same persona. Without this each
    reply prefills the whole conversation again, and prefill time grows with
    its length. An entry holds the ids fed to the step graph and the cache they
    produced (FP32 [L, 1, H_kv, P, D] keys and values, P = ids fed); the least
    recently used entry goes when ``capacity`` are held. With causal attention
    the cache of a prefix does not depend on what follows it, so a hit changes
    logits by float rounding at most (the vLLM / SGLang prefix-caching idea,
    for one sequence at a time). One cache may serve generations running in
    several threads of a model instance: its methods hold a lock.

    Args:
        capacity: entries kept (0 keeps none); each costs P x L x H_kv x D x 8 bytes.
    """

    def __init__(self, capacity):
        self.capacity = capacity
        self._entries = collections.OrderedDict()  # slot -> (ids fed, keys, values)
        self._slots = itertools.count()
        self._lock = threading.Lock()

    def longest_prefix(self, ids):
        """The longest cached prefix of ``ids`` that leaves at least one id to prefill.

        Returns:
            ``(n, keys, values)``: n ids of ``ids`` are cached, with their keys and
            values (FP32 [L, 1, H_kv, n, D]); ``(0, None, None)`` when none are.
        """
        with self._lock:
            best_slot, best = None, 0
            for slot, (fed, keys, _) in self._entries.items():
                limit = min(keys.shape[3], len(ids) - 1)
                differ = np.flatnonzero(np.asarray(fed[:limit]) != np.asarray(ids[:limit]))
                shared = int(differ[0]) if differ.size else limit
                if shared > best:
                    best_slot, best = slot, shared
            if best_slot is None:
                return 0, None, None
            self._entries.move_to_end(best_slot)
            _, keys, values = self._entries[best_slot]
        return best, keys[:, :, :, :best], values[:, :, :, :best]

    def new_slot(self):
        """A new slot id for one generation's entry (stored by its first :meth:`put`)."""
        with self._lock:
            return next(self._slots)

    def put(self, slot, fed, keys, values):
        """Hold ``keys``/``values`` [L, 1, H_kv, P, D] of the first P ids of ``fed`` in ``slot``.

        ``fed`` may grow afterwards (only its first P ids count). A slot's first
        put drops the entries whose ids all begin ``fed`` (the new one holds
        everything they did: typically the conversation's turn before), then
        the least recently used ones until there is room; so a conversation
        holds one entry, and ``capacity`` conversations taking turns all find
        theirs.
        """
        with self._lock:
            if slot not in self._entries:
                for other in [s for s, (ids, k, _) in self._entries.items()
                              if k.shape[3] <= len(fed) and ids[:k.shape[3]] == fed[:k.shape[3]]]:
                    del self._entries[other]
                while self._entries and len(self._entries) >= self.capacity:
                    self._entries.popitem(last=False)
                if self.capacity < 1:
                    return
            self._entries[slot] = (fed, keys, values)
            self._entries.move_to_end(slot)


def generate(network, cache_shape, prompt_ids, *, max_context, max_new_tokens, stop_ids,
             temperature, top_k, seed, repetition_penalty=1.0, penalty_variants=None,
             prefix_cache=None, usage=None):
    """Yield generated token ids one by one: the BLS prefill/decode loop over a step graph.

    ``network`` is a step graph exported by ``export/causal_lm.py`` (``input_ids``
    INT64 [1, T] and the KV cache ``past_keys`` / ``past_values`` FP32
    ``cache_shape`` with P = 0 -> ``logits`` [1, V] and the grown cache). One
    prefill call with ``prompt_ids``, then one decode call per token, each
    only after the consumer asked for the next id, so a consumer that stops
    iterating stops the work. Each id is drawn by :func:`sample_top_k` from
    the logits after :func:`penalise_repetition` over prompt and generated
    ids (and their ``penalty_variants``), with one
    ``numpy.random.default_rng(seed)``. Stops before yielding a
    ``stop_ids`` member, after ``max_new_tokens`` ids, or when the context
    reaches ``max_context`` tokens. With a :class:`PrefixCache`, the prefill
    starts past the longest cached prefix of ``prompt_ids``, and the cache
    this generation builds is kept there after every step. A ``usage`` dict
    gets ``prompt_tokens`` and ``cached_tokens`` (prompt ids not prefilled)
    before the first step.

    Raises:
        RuntimeError: a step call failed (the network's message).
    """
    rng = np.random.default_rng(seed)
    seen = list(prompt_ids)
    cached, keys, values = 0, None, None
    if prefix_cache is not None:
        cached, keys, values = prefix_cache.longest_prefix(prompt_ids)
        slot = prefix_cache.new_slot()
    if keys is None:
        keys = np.zeros(cache_shape, np.float32)
        values = np.zeros(cache_shape, np.float32)
    if usage is not None:
        usage.update(prompt_tokens=len(prompt_ids), cached_tokens=cached)
    fed = list(prompt_ids[:cached])
    tokens = list(prompt_ids[cached:])
    for _ in range(max_new_tokens):
        logits, keys, values = infer(
            network,
            {"input_ids": np.asarray([tokens], dtype=np.int64),
             "past_keys": np.ascontiguousarray(keys), "past_values": np.ascontiguousarray(values)},
            ["logits", "present_keys", "present_values"],
        )
        fed += tokens
        if prefix_cache is not None:
            prefix_cache.put(slot, fed, keys, values)
        logits = penalise_repetition(logits[0], seen, repetition_penalty, penalty_variants)
        token = sample_top_k(logits, temperature, top_k, rng)
        if token in stop_ids:
            return
        yield token
        seen.append(token)
        if len(seen) >= max_context:
            return
        tokens = [token]
