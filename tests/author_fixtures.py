"""A tiny random Gemma 3 checkpoint with a character tokenizer, for author LM tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHARACTERS = list("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?'—-:0123456789\n[]")
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]


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
