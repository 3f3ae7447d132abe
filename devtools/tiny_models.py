"""Tiny random checkpoints for tests and benchmarks: Gemma 3 (author LM), Llama (chat LM), CSM.

Both use one character-level tokenizer, so token ids are easy to reason about
(``<eos>`` is id 2, a newline id 75). Nothing is downloaded: weights are random
and seeded. Also here: speech-like test audio and transformers' own CSM prompt,
the independent reference the CSM parity tests and benchmark compare against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

CHARACTERS = list("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?'—-:0123456789\n[]")
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
AUDIO_TOKEN, AUDIO_EOS_TOKEN = "<|AUDIO|>", "<|audio_eos|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML as SmolLM2-135M-Instruct's GGUF carries it (its default system prompt shortened).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CODEBOOK_VOCAB = 64
# Samples of one Mimi frame: 80 ms at 24 kHz.
FRAME_SAMPLES = 1920


def char_tokenizer(extra_special: tuple[str, ...] = ()) -> tuple[Any, dict[str, int]]:
    """A character-level ``PreTrainedTokenizerFast`` (BOS added) and its vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL + list(extra_special) + CHARACTERS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=list(extra_special),
    )
    return wrapped, vocab


def make_tiny_gemma(directory: Path, seed: int = 0) -> Path:
    """Save a 3-layer random Gemma 3 causal LM and its tokenizer into ``directory``."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    wrapped, vocab = char_tokenizer()
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=512,
        max_position_embeddings=1024,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"], pad_token_id=vocab["<pad>"],
    )
    model = Gemma3ForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    wrapped.save_pretrained(directory)
    return directory


def make_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """Save a 2-layer random Llama chat LM (ChatML, ``<|im_end|>`` as EOS) into ``directory``.

    The architecture of SmolLM2 (grouped-query attention, tied embeddings) at
    toy size; the tokenizer is :func:`char_tokenizer` with the two ChatML tokens.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    wrapped, vocab = char_tokenizer((IM_START, IM_END))
    wrapped.eos_token = IM_END
    wrapped.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=vocab["<bos>"], eos_token_id=vocab[IM_END],
        pad_token_id=vocab["<pad>"],
    )
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    wrapped.save_pretrained(directory)
    return directory


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
    """Speech-like test audio: a gliding harmonic tone with a little noise.

    Args:
        seconds: duration in seconds.
        seed: seed of the noise.

    Returns:
        float32 mono samples at 24 kHz in about [-0.6, 0.6], shape [round(seconds * 24000)].
    """
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * 24_000)) / 24_000
    pitch = 140 + 40 * np.sin(2 * np.pi * 1.5 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / 24_000
    wave = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (0.3 * wave + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def transformers_prompt(
    tokenizer: Any, model: Any, segments: list[tuple[str, str, np.ndarray | None]]
) -> dict[str, Any]:
    """The 2-D CSM prompt as transformers builds it: text tokens, audio placeholders, audio.

    Layout per SesameAILabs/csm generator.py and transformers' CsmProcessor chat
    template: BOS ``[speaker]text`` EOS, then one ``<|AUDIO|>`` per Mimi frame
    and ``<|audio_eos|>``; the model Mimi-encodes ``input_values`` itself.

    Args:
        tokenizer: the checkpoint's tokenizer (from :func:`make_tiny_csm`).
        model: the ``CsmForConditionalGeneration`` it belongs to.
        segments: ``(speaker, text, audio)`` per turn; audio float32 [n] at 24 kHz or None.

    Returns:
        ``input_ids`` int64 [1, T]; with any audio also ``input_values`` float32
        [1, 1, total samples] and ``input_values_cutoffs`` int64 [1, clips]
        (cumulative sample counts).
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
