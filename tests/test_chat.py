"""Chat LM: step graph vs transformers, streamed replies through Triton, cancellation, tools,
and how the ``chat`` loop fits a long conversation to its context (outside Triton)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc.aio as triton_grpc
import tritonclient.http as triton_http

from devtools import REPOSITORY
from devtools.local_triton import LocalTriton
from devtools.tiny_models import CHATML_TEMPLATE, IM_END, IM_START
from export.repository import COMMON
from handler.engines.chat import (
    DEFAULT_TOP_K,
    ChatDelta,
    ChatMessage,
    TritonChatModel,
    hermes_messages,
)
from handler.sessions.runner import REPLY_TEMPERATURE
from tests.helpers import TinyTriton

MESSAGES = (
    ChatMessage("system", "You are a cheerful barista."),
    ChatMessage("user", "Hi! What should I drink this morning?"),
)
PENALTY = 1.3


def hf_model(checkpoint: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    return tokenizer, model


async def collect(stream: AsyncIterator[ChatDelta]) -> list[ChatDelta]:
    return [delta async for delta in stream]


def chat_lm_steps(server: LocalTriton) -> int:
    """Executions of ``chat_lm`` so far (Triton's statistics: one per prefill or decode step)."""
    client = triton_http.InferenceServerClient(server.http_url)
    try:
        stats = client.get_inference_statistics("chat_lm")["model_stats"][0]
    finally:
        client.close()
    return int(stats["execution_count"])


@pytest.mark.triton
def test_step_graph_matches_transformers_logits(tiny_triton: TinyTriton) -> None:
    import onnxruntime as ort
    import torch

    tokenizer, model = hf_model(tiny_triton.llama)
    session = ort.InferenceSession(str(tiny_triton.repository / "chat_lm/1/model.onnx"))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}],
                                         add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keys = values = np.zeros((2, 1, 2, 0, 16), np.float32)
    prompt = len(ids) - 5
    steps = [ids[:prompt]] + [[token] for token in ids[prompt:]]
    seen: list[int] = []
    for tokens in steps:
        logits, keys, values = session.run(None, {
            "input_ids": np.array([tokens], np.int64), "past_keys": keys, "past_values": values,
        })
        seen += tokens
        with torch.no_grad():
            expected = model(torch.tensor([seen])).logits[0, -1].numpy()
        np.testing.assert_allclose(logits[0], expected, atol=1e-4, rtol=1e-4)
    assert keys.shape == (2, 1, 2, len(ids), 16)


@pytest.mark.triton
@pytest.mark.parametrize("penalty", [1.0, PENALTY])
def test_streamed_reply_matches_transformers_generate(
    tiny_triton: TinyTriton, penalty: float
) -> None:
    tokenizer, model = hf_model(tiny_triton.llama)
    chat = [{"role": m.role, "content": m.content} for m in MESSAGES]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    generated = model.generate(
        **prompt, max_new_tokens=60, do_sample=False, repetition_penalty=penalty,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END), pad_token_id=tokenizer.pad_token_id,
    )
    expected = tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:],
                                skip_special_tokens=True)

    model_in_triton = TritonChatModel(tiny_triton.server.grpc_url, repetition_penalty=penalty)
    deltas = asyncio.run(collect(model_in_triton.stream(
        MESSAGES, [], max_new_tokens=60, temperature=0.0, seed=0
    )))
    assert all(delta.tool_call is None for delta in deltas)
    assert len(deltas) > 1
    assert "".join(delta.text for delta in deltas) == expected
    assert expected


@pytest.mark.triton
def test_a_continued_conversation_matches_transformers_generate(tiny_triton: TinyTriton) -> None:
    # The second request begins with the first's prompt and reply: the chat model's
    # prefix cache prefills only the rest (tests/test_prefix_cache.py).
    model_in_triton = TritonChatModel(tiny_triton.server.grpc_url, repetition_penalty=1.0)

    def reply(messages: tuple[ChatMessage, ...]) -> str:
        deltas = asyncio.run(collect(model_in_triton.stream(
            messages, [], max_new_tokens=20, temperature=0.0, seed=0)))
        return "".join(delta.text for delta in deltas)

    first = reply(MESSAGES)
    conversation = (*MESSAGES, ChatMessage("assistant", first),
                    ChatMessage("user", "And what goes well with it?"))
    tokenizer, model = hf_model(tiny_triton.llama)
    prompt = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in conversation],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(
        **prompt, max_new_tokens=20, do_sample=False,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END), pad_token_id=tokenizer.pad_token_id,
    )
    expected = tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:],
                                skip_special_tokens=True)
    assert first and expected
    assert reply(conversation) == expected


LONG_REPLY = {"max_new_tokens": 900, "temperature": 0.0, "seed": 0}


async def long_reply_under_way(model: TritonChatModel) -> asyncio.Task[None]:
    """A task consuming a ``LONG_REPLY`` stream, returned once two pieces have arrived."""
    received: list[ChatDelta] = []

    async def consume() -> None:
        async for delta in model.stream(MESSAGES, [], **LONG_REPLY):
            received.append(delta)

    task = asyncio.create_task(consume())
    while len(received) < 2:
        await asyncio.sleep(0.001)
    return task


async def final_response(server: LocalTriton, messages: tuple[ChatMessage, ...],
                         max_new_tokens: int) -> dict[str, Any]:
    """The ``chat`` model's final response to ``messages`` (greedy): its outputs by name."""
    model = TritonChatModel(server.grpc_url)
    inputs = model._inputs(hermes_messages(messages, []), max_new_tokens, 0.0, 0)

    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield {"model_name": "chat", "inputs": inputs}

    client = triton_grpc.InferenceServerClient(server.grpc_url)
    try:
        async for result, error in client.stream_infer(requests()):
            assert error is None, error
            if result.as_numpy("FINISH_REASON") is not None:
                return {name: result.as_numpy(name)[0]
                        for name in ("FINISH_REASON", "PROMPT_TOKENS", "CACHED_TOKENS")}
    finally:
        await client.close()
    raise AssertionError("the stream ended without a final response")


@pytest.mark.triton
def test_every_request_finds_the_cache_of_the_one_before(tiny_triton: TinyTriton) -> None:
    """The loop's requests share one prefix cache, whichever of them Triton runs where.

    (With two instances, each process its own cache, a repeated prompt missed
    about every other time.)
    """
    finals = [asyncio.run(final_response(tiny_triton.server, MESSAGES, 5)) for _ in range(4)]
    prompt_tokens = int(finals[0]["PROMPT_TOKENS"])
    assert prompt_tokens > 10
    assert [int(f["PROMPT_TOKENS"]) for f in finals] == [prompt_tokens] * 4
    # A prompt cached whole still prefills its last id.
    assert [int(f["CACHED_TOKENS"]) for f in finals[1:]] == [prompt_tokens - 1] * 3


@pytest.mark.triton
def test_replies_run_side_by_side_and_one_more_waits_its_turn(tiny_triton: TinyTriton) -> None:
    """The loop's one instance runs ``concurrent_replies`` (2) replies at once.

    A short reply is not held up by a long one; a third request, sent while two
    long replies run, waits for a free reply thread and is then answered.
    """
    model = TritonChatModel(tiny_triton.server.grpc_url)

    async def scenario() -> tuple[bool, int, int]:
        first = await long_reply_under_way(model)
        short = await final_response(tiny_triton.server, MESSAGES, 3)
        first_still_running = not first.done()
        second = await long_reply_under_way(model)
        third = await final_response(tiny_triton.server, MESSAGES, 3)
        await asyncio.gather(first, second)
        return first_still_running, int(short["PROMPT_TOKENS"]), int(third["PROMPT_TOKENS"])

    first_still_running, short_tokens, third_tokens = asyncio.run(
        asyncio.wait_for(scenario(), 300))
    assert first_still_running, "the short reply waited for the long one to end"
    assert short_tokens == third_tokens > 0


@pytest.mark.triton
def test_sampling_is_reproducible_with_a_seed(tiny_triton: TinyTriton) -> None:
    model = TritonChatModel(tiny_triton.server.grpc_url)

    def reply(seed: int) -> str:
        deltas = asyncio.run(collect(model.stream(MESSAGES, [], max_new_tokens=30,
                                                  temperature=1.0, seed=seed)))
        return "".join(d.text for d in deltas)

    assert reply(5) == reply(5)
    assert len({reply(seed) for seed in range(4)}) > 1


def settled_chat_lm_steps(server: LocalTriton) -> int:
    """``chat_lm_steps`` once it stops growing (bounded wait, no speed asserted)."""
    settled = chat_lm_steps(server)
    for _ in range(50):
        time.sleep(0.2)
        now = chat_lm_steps(server)
        if now == settled:
            break
        settled = now
    return settled


@pytest.mark.triton
def test_cancelling_the_consumer_stops_decoding_in_triton(tiny_triton: TinyTriton) -> None:
    """A cancel that reaches Triton while the reply is written stops it early.

    The tiny model writes the whole reply in a fraction of a second, and on a
    busy machine the cancel can reach Triton only after most of it; such a try
    shows nothing either way. Up to five tries are made: a loop that ignored
    cancellation would run every step in all of them.
    """
    server = tiny_triton.server
    model = TritonChatModel(server.grpc_url)

    before = settled_chat_lm_steps(server)
    full = asyncio.run(collect(model.stream(MESSAGES, [], **LONG_REPLY)))
    full_steps = settled_chat_lm_steps(server) - before
    assert full_steps > 500, "the uncancelled reply must be long for this test to mean anything"
    assert full

    async def cancel_after_two_pieces() -> None:
        task = await long_reply_under_way(model)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    steps_run = []
    for _ in range(5):
        before = settled_chat_lm_steps(server)
        asyncio.run(cancel_after_two_pieces())
        steps_run.append(settled_chat_lm_steps(server) - before)
        if steps_run[-1] < full_steps // 2:
            break
    assert all(0 < steps <= full_steps for steps in steps_run), (steps_run, full_steps)
    assert steps_run[-1] < full_steps // 2, (steps_run, full_steps)


@pytest.mark.triton
def test_bad_messages_fail_with_the_models_message(tiny_triton: TinyTriton) -> None:
    from handler.errors import InferenceError

    model = TritonChatModel(tiny_triton.server.grpc_url)
    with pytest.raises(InferenceError) as raised:
        asyncio.run(collect(model.stream(MESSAGES, [], max_new_tokens=5000, temperature=0.0,
                                         seed=0)))
    assert "MAX_NEW_TOKENS" in (raised.value.detail or "")


@pytest.mark.triton
def test_bundled_chat_model_answers(triton: LocalTriton) -> None:
    model = TritonChatModel(triton.grpc_url)
    deltas = asyncio.run(collect(model.stream(
        [ChatMessage("system", "You are a friendly assistant. Answer in one short sentence."),
         ChatMessage("user", "What is the capital of France?")],
        [], max_new_tokens=24, temperature=0.0, seed=0,
    )))
    text = "".join(d.text for d in deltas).strip()
    assert text
    assert any(c.isalpha() for c in text)


PERSONA = ChatMessage("system", "You are a friendly cooking teacher. Answer in one short sentence.")
QUESTION = ChatMessage("user", "What is the best way to learn to cook?")
# A reply of the bundled LM, sampled, up to where it wrote "expectto" (a session's reply
# that the voice then read as "expecto").
GLUED_REPLY = "It's all about practice, right? You can't just pick up any old recipe and expect"


def chat_parameter(key: str) -> str:
    """A parameter of the exported ``chat`` model's config."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((REPOSITORY / "chat" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    return str(config.parameters[key].string_value)


class BundledChatLM:
    """The exported bundled chat LM outside Triton: tokenizers and its step graph on onnxruntime."""

    def __init__(self) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        version = REPOSITORY / "chat" / "1"
        self.tokenizer = Tokenizer.from_file(str(version / "tokenizer.json"))
        self.templated = PreTrainedTokenizerFast(
            tokenizer_object=self.tokenizer,
            chat_template=(version / "chat_template.jinja").read_text(encoding="utf-8"))
        self.session = ort.InferenceSession(str(REPOSITORY / "chat_lm" / "1" / "model.onnx"))
        self.cache_shape = [d if isinstance(d, int) else 0
                            for d in self.session.get_inputs()[1].shape]
        self.stop_ids = {int(i) for i in chat_parameter("stop_token_ids").split(",") if i}

    def prompt_ids(self, messages: tuple[ChatMessage, ...]) -> list[int]:
        chat = [{"role": m.role, "content": m.content} for m in messages]
        text = self.templated.apply_chat_template(chat, add_generation_prompt=True,
                                                  tokenize=False)
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def step(self, network: str, inputs: dict[str, np.ndarray],
             names: list[str]) -> list[np.ndarray]:
        """``converse_backend.infer`` for the step graph, on onnxruntime."""
        return list(self.session.run(names, inputs))

    def next_logits(self, ids: list[int]) -> np.ndarray:
        empty = np.zeros(self.cache_shape, np.float32)
        [logits] = self.step("chat_lm", {"input_ids": np.array([ids], np.int64),
                                         "past_keys": empty, "past_values": empty}, ["logits"])
        return np.asarray(logits[0])


@pytest.mark.triton
def test_the_bundled_lm_keeps_the_space_before_a_word_it_used_before(
    triton: LocalTriton, backend: Any,
) -> None:
    lm = BundledChatLM()
    ids = lm.prompt_ids((PERSONA, QUESTION)) + lm.tokenizer.encode(
        GLUED_REPLY, add_special_tokens=False).ids
    spaced, glued = lm.tokenizer.token_to_id("Ġto"), lm.tokenizer.token_to_id("to")
    assert spaced in ids and glued not in ids
    logits = lm.next_logits(ids)

    def glued_over_spaced(variants: np.ndarray | None) -> float:
        """P("to") / P(" to") when sampling at the sessions' temperature."""
        penalised = backend.penalise_repetition(logits, ids, PENALTY, variants)
        return float(np.exp((penalised[glued] - penalised[spaced]) / REPLY_TEMPERATURE))

    assert glued_over_spaced(None) > 0.1  # the CTRL rule alone favours gluing here
    assert glued_over_spaced(backend.spelling_variants(lm.tokenizer)) < 0.01


@pytest.mark.triton
def test_the_bundled_chat_model_penalises_both_spellings(
    triton: LocalTriton, backend: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    lm = BundledChatLM()
    monkeypatch.setattr(backend, "infer", lm.step)
    model = TritonChatModel(triton.grpc_url, repetition_penalty=PENALTY, top_k=DEFAULT_TOP_K)
    messages = (PERSONA, QUESTION)
    ids = lm.prompt_ids(messages)

    def outside_triton(seed: int, variants: np.ndarray | None) -> str:
        tokens = backend.generate(
            "chat_lm", lm.cache_shape, ids, max_context=len(ids) + 40, max_new_tokens=40,
            stop_ids=lm.stop_ids, temperature=REPLY_TEMPERATURE, top_k=DEFAULT_TOP_K, seed=seed,
            repetition_penalty=PENALTY, penalty_variants=variants)
        return str(lm.tokenizer.decode(list(tokens)))

    variants = backend.spelling_variants(lm.tokenizer)
    differs = []
    for seed in range(3):
        deltas = asyncio.run(collect(model.stream(
            messages, [], max_new_tokens=40, temperature=REPLY_TEMPERATURE, seed=seed)))
        in_triton = "".join(d.text for d in deltas)
        assert in_triton == outside_triton(seed, variants)
        differs.append(in_triton != outside_triton(seed, None))
    assert any(differs)


def test_hermes_messages_describe_tools_and_wrap_calls_and_results() -> None:
    from handler.engines.chat import ToolCall

    tool = {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }}
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    rendered = hermes_messages([
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage("assistant", "", tool_calls=(call,)),
        ChatMessage("tool", '{"sky": "clear"}', tool_call_id="call_1"),
    ], [tool])
    assert rendered[0]["content"].startswith("Be brief.")
    tools_json = rendered[0]["content"].split("<tools>\n")[1].split("\n</tools>")[0]
    assert json.loads(tools_json) == tool["function"]
    assert rendered[2]["content"] == (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    )
    assert rendered[3] == {"role": "tool", "content": '<tool_response>{"sky": "clear"}'
                                                      '</tool_response>'}
    assert hermes_messages([ChatMessage("user", "hi")], [tool])[0]["role"] == "system"
    assert hermes_messages([ChatMessage("user", "hi")], []) == [{"role": "user", "content": "hi"}]


# Fitting a conversation to the context: ``Prompts`` of model_repository/chat/1/model.py,
# run outside Triton with a byte-level BPE tokenizer (the kind SmolLM2's is) trained here.

CORPUS = [
    "Could you tell me a little more about the book we discussed a moment ago?",
    "Sure, it is a long novel about the sea, whales, and an obsessed captain named Ahab.",
    "You are a terse librarian who answers in one short sentence.",
    '{"temperature": 21, "sky": "clear", "city": "Paris", "wind_kmh": 12}',
] * 20
CONTEXT, REPLY_TOKENS = 512, 64


@pytest.fixture(scope="module")
def chat_loop() -> Iterator[Any]:
    """The ``chat`` python model's module, imported outside Triton (its Triton module stubbed)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "triton_python_backend_utils",
                      types.ModuleType("triton_python_backend_utils"))
        patch.syspath_prepend(str(COMMON))
        spec = importlib.util.spec_from_file_location(
            "chat_model", COMMON.parent / "chat" / "1" / "model.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module


@pytest.fixture(scope="module")
def bpe() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=500, special_tokens=[IM_START, IM_END], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tokenizer


class CountingTokenizer:
    """A tokenizer that counts the characters it is given to encode."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.characters = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> Any:
        self.characters += len(text)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)


# Templates: ChatML (the bundled model's), one that numbers messages (text changes as
# they are dropped), and two whose message after a system message is longer or shorter
# than after any other, so that the tokens summed message by message are too many or too
# few and the fitting has to correct them.
TEMPLATES = {
    "ChatML": CHATML_TEMPLATE,
    "numbered": "{% for m in messages %}{{ loop.index }}. {{ m['role'] }}: {{ m['content'] }}\n"
                "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}",
    "sums too many": "{% for m in messages %}{% if loop.previtem is defined and "
                     "loop.previtem['role'] == 'system' %}{{ 'Note well. ' * 20 }}{% endif %}"
                     "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
    "sums too few": "{% for m in messages %}{% if loop.previtem is defined and "
                    "loop.previtem['role'] != 'system' %}{{ 'Note well. ' * 3 }}{% endif %}"
                    "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
}


def prompts(chat_loop: Any, tokenizer: Any, template: str = CHATML_TEMPLATE) -> Any:
    return chat_loop.Prompts(chat_loop.chat_template(template), tokenizer, {}, CONTEXT)


def one_message_at_a_time(prompts: Any, messages: list[dict[str, str]],
                          max_new_tokens: int) -> list[int]:
    """The reference: drop the oldest message after the system message, render again, until it fits.

    (The ``chat`` loop's rule before it was made linear, kept here as it was.)
    """
    budget = prompts.max_context - max_new_tokens
    keep = 1 if messages[0]["role"] == "system" else 0
    while True:
        ids = list(prompts.ids(messages))
        if len(ids) <= budget:
            return ids
        if len(messages) <= keep + 1:
            raise ValueError(f"the conversation needs {len(ids)} tokens; at most {budget} "
                             f"fit with MAX_NEW_TOKENS {max_new_tokens}")
        messages = messages[:keep] + messages[keep + 1:]


def turns(count: int) -> list[dict[str, str]]:
    """``count`` user/assistant exchanges; the last ones are the same whatever ``count``."""
    messages = []
    for n in range(count, 0, -1):
        messages += [{"role": "user", "content": f"Question {n}: " + CORPUS[n % 4]},
                     {"role": "assistant", "content": f"Answer {n}. " + CORPUS[(n + 1) % 4]}]
    return messages


SYSTEM = {"role": "system", "content": CORPUS[2]}
BIG = "Result: " + " ".join(CORPUS[3] for _ in range(60))  # ~4,000 characters, ~1,400 tokens


def with_tool_results(results: int, size: int) -> list[dict[str, str]]:
    messages = [SYSTEM]
    for n in range(results):
        messages += [{"role": "user", "content": f"Look {n} up."},
                     {"role": "assistant", "content": "Checking."},
                     {"role": "tool", "content": BIG[:size] + str(n)},
                     {"role": "assistant", "content": "Done."}]
    return messages


CONVERSATIONS = {
    "fits whole": [SYSTEM, *turns(3)],
    "many turns": [SYSTEM, *turns(40)],
    "no system message": turns(40),
    "one message": [{"role": "user", "content": CORPUS[0]}],
    "a big result in the middle": [SYSTEM, *turns(5), {"role": "tool", "content": BIG[:900]},
                                   *turns(4)],
    "big results": with_tool_results(6, len(BIG)),
    "results that just fit": with_tool_results(6, 600),
    "too big a last message": [SYSTEM, *turns(5), {"role": "tool", "content": BIG}],
    "too big a system message": [{"role": "system", "content": BIG}, *turns(5)],
}


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("max_new_tokens", [REPLY_TOKENS, 300])
@pytest.mark.parametrize("template", TEMPLATES)
def test_the_fitted_prompt_is_the_one_dropping_a_message_at_a_time_gives(
    chat_loop: Any, bpe: Any, name: str, max_new_tokens: int, template: str,
) -> None:
    fitting = prompts(chat_loop, bpe, TEMPLATES[template])
    messages = CONVERSATIONS[name]
    try:
        expected = one_message_at_a_time(fitting, messages, max_new_tokens)
    except ValueError as error:
        with pytest.raises(ValueError) as raised:
            fitting.fit(messages, max_new_tokens, lambda: None)
        assert str(raised.value) == str(error)
        return
    assert list(fitting.fit(messages, max_new_tokens, lambda: None)) == expected
    assert len(expected) <= CONTEXT - max_new_tokens


def test_fitting_tokenizes_what_is_kept_not_what_is_dropped(chat_loop: Any, bpe: Any) -> None:
    """Ten times the turns before the same recent ones: the same characters are tokenized.

    (Dropping one message at a time and rendering again tokenized the whole
    conversation once per message dropped: work quadratic in its length.)
    """
    tokenized = []
    for count in (100, 1000):
        counting = CountingTokenizer(bpe)
        ids = prompts(chat_loop, counting).fit([SYSTEM, *turns(count)], REPLY_TOKENS,
                                               lambda: None)
        tokenized.append((counting.characters, list(ids)))
    assert tokenized[0] == tokenized[1]
    kept = bpe.decode(tokenized[0][1], skip_special_tokens=False)
    assert tokenized[0][0] < 4 * len(kept)


def test_fitting_tokenizes_a_big_result_at_most_twice(chat_loop: Any, bpe: Any) -> None:
    """Six results that cannot fit: only the newest is tokenized, and at most twice."""
    counting = CountingTokenizer(bpe)
    prompts(chat_loop, counting).fit(with_tool_results(6, len(BIG)), REPLY_TOKENS, lambda: None)
    assert counting.characters < 3 * len(BIG)


def test_fitting_checks_the_budget_as_it_goes(chat_loop: Any, bpe: Any) -> None:
    checks = []

    def check() -> None:
        checks.append(len(checks))
        if len(checks) == 3:
            raise chat_loop.backend.Cancelled("the request was cancelled")

    with pytest.raises(chat_loop.backend.Cancelled):
        prompts(chat_loop, bpe).fit([SYSTEM, *turns(1000)], REPLY_TOKENS, check)
    assert len(checks) == 3


class CancelledWhileFitting:
    """A request Triton marks cancelled after its first look (while its prompt is built)."""

    def __init__(self) -> None:
        self.looks = 0

    def is_cancelled(self) -> bool:
        self.looks += 1
        return self.looks > 1

    def timeout(self) -> int:
        return 0

    def parameters(self) -> str:
        return "{}"


def test_a_request_cancelled_while_its_prompt_is_built_ends_cancelled(
    chat_loop: Any, bpe: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    inputs = {
        "MESSAGES": np.array([json.dumps([SYSTEM, *turns(1000)]).encode()], np.object_),
        "MAX_NEW_TOKENS": np.array([REPLY_TOKENS], np.int32),
        "REPETITION_PENALTY": np.array([1.0], np.float32),
    }
    monkeypatch.setattr(chat_loop.pb_utils, "get_input_tensor_by_name",
                        lambda request, name: types.SimpleNamespace(as_numpy=lambda: inputs[name]),
                        raising=False)
    model = chat_loop.TritonPythonModel()
    model.prompts = prompts(chat_loop, bpe)
    usage = {"prompt_tokens": 0, "cached_tokens": 0}
    assert model._stream(CancelledWhileFitting(), None, usage) == "cancelled"
    assert usage == {"prompt_tokens": 0, "cached_tokens": 0}


def bundled_prompts(chat_loop: Any) -> Any:
    """The chat model's ``Prompts`` over the exported SmolLM2 tokenizer and template."""
    from tokenizers import Tokenizer

    version = REPOSITORY / "chat" / "1"
    return chat_loop.Prompts(
        chat_loop.chat_template((version / "chat_template.jinja").read_text(encoding="utf-8")),
        Tokenizer.from_file(str(version / "tokenizer.json")),
        {"bos_token": chat_parameter("bos_token"), "eos_token": chat_parameter("eos_token")},
        int(chat_parameter("max_context")))


@pytest.mark.triton
def test_the_bundled_chat_model_fits_long_conversations_as_before(
    triton: LocalTriton, chat_loop: Any,
) -> None:
    """With SmolLM2's own tokenizer and template, on conversations past its context."""
    fitting = bundled_prompts(chat_loop)
    tool = {"role": "tool", "content": "x" * 20_000}
    for messages in ([SYSTEM, *turns(150)], turns(150), [SYSTEM, *turns(40), tool, *turns(2)],
                     [SYSTEM, *turns(3), {"role": "user", "content": "€ " * 5000}]):
        try:
            expected = one_message_at_a_time(fitting, messages, REPLY_TOKENS)
        except ValueError as error:
            with pytest.raises(ValueError, match="needs") as raised:
                fitting.fit(messages, REPLY_TOKENS, lambda: None)
            assert str(raised.value) == str(error)
            continue
        assert list(fitting.fit(messages, REPLY_TOKENS, lambda: None)) == expected


@pytest.mark.triton
def test_a_persona_at_the_create_limit_leaves_the_bundled_model_room_for_turns(
    triton: LocalTriton, chat_loop: Any,
) -> None:
    """3,968 characters of English persona (handler/sessions/service.py) and tools take
    at most about 1,200 of SmolLM2's tokens: a long user turn still fits beside them."""
    fitting = bundled_prompts(chat_loop)
    persona = " ".join(CORPUS)[:3968]
    tools = [{"type": "function", "function": {
        "name": "weather", "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    system = hermes_messages([ChatMessage("system", persona)], tools)[0]["content"][:3968]
    thirty_seconds = " ".join(CORPUS[:2] * 3)  # about 80 words, 450 characters
    messages = [{"role": "system", "content": system}, *turns(3),
                {"role": "user", "content": thirty_seconds}]
    kept = fitting.fit(messages, REPLY_TOKENS, lambda: None)
    assert len(fitting.ids(messages[:1], False)) < 1250
    assert list(kept) == list(fitting.ids(messages))
