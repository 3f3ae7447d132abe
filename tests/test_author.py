"""Author LM: export parity (ONNX vs PyTorch, Triton vs transformers) and authored turns."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from devtools.local_triton import LocalTriton
from handler.author_lm import AuthorParams, clean_turn
from handler.triton import TritonClient
from tests.helpers import AUTH, TinyTriton

PROMPT = "0: Did you end up trying that recipe?\n1: I did, the timing was hard.\n0:"
STOPS = [2, 75]  # <eos> and "\n" in the tiny tokenizer (see devtools.tiny_models)


@pytest.fixture(scope="module")
def tiny(tiny_triton: TinyTriton) -> tuple[Path, Path, LocalTriton]:
    return tiny_triton.gemma, tiny_triton.repository, tiny_triton.server


def hf_model(checkpoint: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()
    return tokenizer, model


def generate_in_triton(server: LocalTriton, prompt: str, params: AuthorParams) -> list[int]:
    async def call() -> list[int]:
        client = TritonClient(server.http_url)
        try:
            outputs = await client.infer("author", {
                "PROMPT": np.array([prompt.encode()], dtype=np.object_),
                "TEMPERATURE": np.array([params.temperature], np.float32),
                "TOP_K": np.array([params.top_k], np.int32),
                "MAX_NEW_TOKENS": np.array([params.max_new_tokens], np.int32),
                "SEED": np.array([params.seed], np.int64),
            }, ["TOKENS"])
        finally:
            await client.close()
        return [int(t) for t in outputs["TOKENS"]]

    return asyncio.run(call())


@pytest.mark.triton
def test_step_graph_matches_pytorch(tiny: Any) -> None:
    import onnxruntime as ort
    import torch

    from export.causal_lm import step_module

    checkpoint, repository, _ = tiny
    _, model = hf_model(checkpoint)
    step = step_module(model)
    session = ort.InferenceSession(str(repository / "author_lm/1/model.onnx"))
    generator = torch.Generator().manual_seed(1)
    for past, tokens in ((0, 9), (7, 1), (7, 4)):
        feeds = {
            "input_ids": torch.randint(4, 70, (1, tokens), generator=generator),
            "past_keys": torch.randn(3, 1, 1, past, 32, generator=generator),
            "past_values": torch.randn(3, 1, 1, past, 32, generator=generator),
        }
        with torch.no_grad():
            expected = step(*feeds.values())
        got = session.run(None, {k: v.numpy() for k, v in feeds.items()})
        for ours, reference in zip(got, expected, strict=True):
            np.testing.assert_allclose(ours, reference.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.triton
@pytest.mark.parametrize("prompt", [PROMPT, "1: Hello there.\n0: Hi!\n1:"])
def test_greedy_tokens_through_triton_equal_transformers(tiny: Any, prompt: str) -> None:
    import torch

    checkpoint, _, server = tiny
    tokenizer, model = hf_model(checkpoint)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=STOPS)
    expected = [t for t in out[0, ids.shape[1]:].tolist()]
    if expected and expected[-1] in STOPS:
        expected = expected[:-1]
    got = generate_in_triton(server, prompt, AuthorParams(0.0, 0, 24, 0))
    assert got == expected and len(got) > 3


@pytest.mark.triton
def test_seeded_sampling_is_reproducible(tiny: Any) -> None:
    _, _, server = tiny
    first = generate_in_triton(server, PROMPT, AuthorParams(1.5, 20, 24, 7))
    again = generate_in_triton(server, PROMPT, AuthorParams(1.5, 20, 24, 7))
    other = generate_in_triton(server, PROMPT, AuthorParams(1.5, 20, 24, 8))
    assert first == again and first != other


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        (" 0: Sure thing. I kept it low and", "Sure thing."),
        ("Speaker 1: Yes! Did you?", "Yes! Did you?"),
        ("  ...  ", None),
        ("Absolutely", "Absolutely"),
        ("word " * 60, None),
    ],
)
def test_clean_turn(raw: str, cleaned: str | None) -> None:
    assert clean_turn(raw) == cleaned


RECIPE = [
    {"speaker": "0", "text": "Did you end up trying that recipe?"},
    {"speaker": "1", "text": "I did — the timing was the hard part."},
    {"speaker": "0"},
]


def test_models_advertise_author_mode(client: TestClient) -> None:
    model = client.get("/v1/models", headers=AUTH).json()["data"][0]
    assert "author" in model["modes"]


@pytest.mark.triton
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_authored_recipe_turn_is_short_english_and_voiced(
    real_client: TestClient, seed: int
) -> None:
    response = real_client.post("/v1/converse", headers=AUTH,
                                json={"conversation": RECIPE, "params": {"seed": seed}})
    assert response.status_code == 200, response.text
    reply = response.json()["reply"]
    words = reply["text"].split()
    assert reply["speaker"] == "0" and 1 <= len(words) <= 40
    assert not re.match(r"^\s*\d\s*:", reply["text"])
    letters = [c for c in reply["text"] if c.isalpha()]
    assert sum(c.isascii() for c in letters) / len(letters) > 0.95
    assert response.json()["usage"]["output_audio_seconds"] > 0.3


@pytest.mark.triton
def test_audio_only_history_is_transcribed_for_authoring(real_client: TestClient) -> None:
    spoken = real_client.post("/v1/converse", headers=AUTH, json={"conversation": [
        {"speaker": "1", "text": "I finally fixed the old bicycle in the garage."}]})
    clip = spoken.json()["reply"]["audio"]["data_b64"]
    response = real_client.post("/v1/converse", headers=AUTH, json={"conversation": [
        {"speaker": "1", "audio_wav_b64": clip}, {"speaker": "0"}]})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["input_audio_seconds"] > 1.0


def test_the_highest_seed_still_gets_its_retries(
    client: TestClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A retry's seed wraps inside int64 instead of overflowing past 2**63 - 1."""
    import handler.author_lm as author_lm

    attempts: list[str] = []

    def first_line_unusable(raw: str) -> str | None:
        attempts.append(raw)
        return None if len(attempts) == 1 else clean_turn(raw)

    monkeypatch.setattr(author_lm, "clean_turn", first_line_unusable)
    response = client.post("/v1/converse", headers=AUTH,
                           json={"conversation": RECIPE, "params": {"seed": 2**63 - 1}})
    assert response.status_code == 200, response.text
    assert len(attempts) == 2


@pytest.mark.parametrize(
    "params", [{"max_new_tokens": 500}, {"temperature": 3}, {"quantizers": 8}]
)
def test_author_params_are_validated(client: TestClient, params: dict[str, Any]) -> None:
    response = client.post("/v1/converse", headers=AUTH,
                           json={"conversation": RECIPE, "params": params})
    assert response.status_code == 400
