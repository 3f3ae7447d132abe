"""Chat LM: step graph vs transformers, streamed replies through Triton, cancellation, tools."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc.aio as triton_grpc
import tritonclient.http as triton_http

from devtools import REPOSITORY
from devtools.local_triton import LocalTriton
from devtools.tiny_models import IM_END
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
