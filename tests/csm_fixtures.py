"""A tiny random CSM checkpoint (backbone, depth decoder, Mimi) with a character tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tests.author_fixtures import char_tokenizer

AUDIO_TOKEN, AUDIO_EOS_TOKEN = "<|AUDIO|>", "<|audio_eos|>"
CODEBOOK_VOCAB = 64
FRAME_SAMPLES = 1920


def make_tiny_csm(directory: Path, seed: int = 0) -> Path:
    """Save a 2-layer random CSM (32 codebooks of 64 codes, Mimi at 24 kHz / 12.5 Hz).

    ``max_position_embeddings`` is 1,024 frames so that prompts can overflow in tests.
    """
    import torch
    from transformers import CsmConfig, CsmForConditionalGeneration, MimiConfig

    tokenizer, vocab = char_tokenizer((AUDIO_TOKEN, AUDIO_EOS_TOKEN))
    torch.manual_seed(seed)
    codec = MimiConfig(
        hidden_size=64, num_filters=8, num_residual_layers=1, codebook_size=CODEBOOK_VOCAB,
        codebook_dim=32, vector_quantization_hidden_dimension=32, num_quantizers=32,
        upsample_groups=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=4, sliding_window=250,
    )
    config = CsmConfig(
        num_codebooks=32, vocab_size=CODEBOOK_VOCAB, text_vocab_size=len(vocab), hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, pad_token_id=vocab["<pad>"],
        codebook_pad_token_id=CODEBOOK_VOCAB - 1, codebook_eos_token_id=0,
        bos_token_id=vocab["<bos>"], audio_token_id=vocab[AUDIO_TOKEN],
        audio_eos_token_id=vocab[AUDIO_EOS_TOKEN],
        depth_decoder_config={
            "num_codebooks": 32, "backbone_hidden_size": 64, "vocab_size": CODEBOOK_VOCAB,
            "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 33,
        },
        codec_config=codec.to_dict(),
    )
    model = CsmForConditionalGeneration(config)
    # Random init leaves Mimi's codebooks at zero (they are k-means statistics,
    # not parameters): give every codebook random centroids so codes matter.
    quantizer = model.codec_model.quantizer
    for rvq in (
        quantizer.semantic_residual_vector_quantizer,
        quantizer.acoustic_residual_vector_quantizer,
    ):
        for layer in rvq.layers:
            layer.codebook.embed_sum.copy_(torch.randn_like(layer.codebook.embed_sum) * 0.5)
            layer.codebook.cluster_usage.fill_(1.0)
            layer.codebook.initialized.fill_(True)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def speech(seconds: float, seed: int) -> np.ndarray:
    """Speech-like test audio at 24 kHz: a gliding harmonic tone with noise, float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * 24_000)) / 24_000
    pitch = 140 + 40 * np.sin(2 * np.pi * 1.5 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / 24_000
    wave = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (0.3 * wave + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def transformers_prompt(
    tokenizer: Any, model: Any, segments: list[tuple[str, str, np.ndarray | None]]
) -> dict[str, Any]:
    """transformers' own 2-D prompt: text tokens, audio placeholders, audio merged by the model.

    Layout per SesameAILabs/csm generator.py and transformers' CsmProcessor chat
    template: BOS ``[speaker]text`` EOS, then one ``<|AUDIO|>`` per Mimi frame
    and ``<|audio_eos|>``; the model Mimi-encodes ``input_values`` itself.
    """
    import torch

    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    audio_eos_id = tokenizer.convert_tokens_to_ids(AUDIO_EOS_TOKEN)
    ids: list[int] = []
    clips, cutoffs = [], []
    for speaker, text, audio in segments:
        text_ids = tokenizer(f"[{speaker}]{text}", add_special_tokens=False)["input_ids"]
        ids += [tokenizer.bos_token_id, *text_ids, tokenizer.eos_token_id]
        if audio is not None:
            frames = -(-len(audio) // FRAME_SAMPLES)
            ids += [audio_id] * frames + [audio_eos_id]
            clips.append(audio)
            cutoffs.append(sum(map(len, clips)))
    prompt: dict[str, Any] = {"input_ids": torch.tensor([ids])}
    if clips:
        prompt["input_values"] = torch.from_numpy(np.concatenate(clips))[None, None]
        prompt["input_values_cutoffs"] = torch.tensor([cutoffs])
    return prompt
