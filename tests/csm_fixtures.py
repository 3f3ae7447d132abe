"""A tiny random CSM checkpoint (backbone, depth decoder, Mimi) with a character tokenizer."""

from __future__ import annotations

from pathlib import Path

from tests.author_fixtures import char_tokenizer

AUDIO_TOKEN, AUDIO_EOS_TOKEN = "<|AUDIO|>", "<|audio_eos|>"
CODEBOOK_VOCAB = 64


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
