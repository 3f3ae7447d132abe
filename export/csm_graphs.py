"""The four ONNX graphs of a CSM checkpoint, as ``torch.nn.Module`` wrappers.

Reference: transformers ``models/csm`` (``CsmForConditionalGeneration``,
``generation_csm.py``) and ``models/mimi``; SesameAILabs/csm ``models.py``.
Shapes below use F = frames, T = new positions, P = cached positions,
L = backbone layers, H_kv / D = KV heads / head dim, V = codebook vocabulary
(``config.vocab_size``, 2,051 for csm-1b), Q = codebooks (32), C = Q + 1
frame columns (the last one is the text token).

* ``mimi_encoder``: ``audio`` FP32 [1, 1, S] (24 kHz, -1..1) ->
  ``audio_codes`` INT64 [1, Q, ceil(S / 1920)].
* ``backbone``: ``frames`` INT64 [1, T, C], ``frame_mask`` BOOL [1, T, C],
  ``past_keys`` / ``past_values`` FP32 [L, 1, H_kv, P, D] ->
  ``codebook0_logits`` FP32 [1, V] and ``last_hidden`` FP32 [1, H] (last
  position), ``present_keys`` / ``present_values`` FP32 [L, 1, H_kv, P+T, D].
  A position's embedding is the masked sum of its columns' embeddings, as in
  the reference's ``_embed_tokens``; prefill passes the prompt with P = 0,
  decode one frame.
* ``depth``: ``last_hidden`` FP32 [1, H], ``codebook0`` INT64 [1],
  ``temperature`` FP32 [1], ``top_k`` INT64 [1], ``uniform_noise`` FP32
  [Q-1, V] in (0, 1) -> ``codebooks`` INT64 [1, Q-1] (codebooks 1..Q-1).
  All Q-1 depth steps run inside the graph with their own KV cache, so a frame
  costs two calls in all (backbone + depth). Sampling is the Gumbel-max trick
  over the top-k logits scaled by 1/temperature (temperature 0 = argmax),
  the same distribution as softmax + multinomial.
* ``mimi_decoder``: ``audio_codes`` INT64 [1, Q, F], ``num_quantizers``
  INT64 [1] -> ``audio`` FP32 [1, 1, F * 1920]. Codebooks at index >=
  ``num_quantizers`` are masked out of the residual sum, which equals decoding
  the first N codebooks (Mimi's output projections have no bias).
"""

from __future__ import annotations

from typing import Any


def backbone_module(model: Any) -> Any:
    """Backbone step graph module over a ``CsmForConditionalGeneration`` (see module doc)."""
    import torch
    from transformers.cache_utils import DynamicCache

    layers = model.config.num_hidden_layers
    codebooks = model.config.num_codebooks

    class Backbone(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, frames: Any, frame_mask: Any, past_keys: Any, past_values: Any) -> Any:
            audio_embeds = self.model.backbone_model.embed_tokens.embed_audio_tokens(
                frames[..., :codebooks]
                + self.model.backbone_model.embed_tokens.audio_tokens_offsets
            )
            audio_mask = frame_mask[..., :codebooks].unsqueeze(-1).to(audio_embeds.dtype)
            text_mask = frame_mask[..., codebooks:].to(audio_embeds.dtype)
            embeds = (audio_embeds * audio_mask).sum(dim=2) + self.model.embed_text_tokens(
                frames[..., codebooks]
            ) * text_mask
            cache = DynamicCache(
                ddp_cache_data=[(past_keys[i], past_values[i]) for i in range(layers)]
            )
            out = self.model.backbone_model(
                inputs_embeds=embeds, past_key_values=cache, use_cache=True
            )
            last_hidden = out.last_hidden_state[:, -1, :]
            keys = torch.stack([layer.keys for layer in out.past_key_values.layers])
            values = torch.stack([layer.values for layer in out.past_key_values.layers])
            return self.model.lm_head(last_hidden), last_hidden, keys, values

    return Backbone().eval()


def depth_module(model: Any) -> Any:
    """Depth-decoder frame graph module: codebooks 1..Q-1 in one call (see module doc)."""
    import torch
    from transformers.cache_utils import DynamicCache

    steps = model.config.num_codebooks - 1
    tiny = torch.finfo(torch.float32).tiny

    def pick(logits: Any, temperature: Any, top_k: Any, noise: Any) -> Any:
        ordered = torch.sort(logits, dim=-1, descending=True).values
        kth = ordered.gather(-1, (top_k - 1).clamp(0, logits.shape[-1] - 1).view(1, 1))
        kept = torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits)
        gumbel = -torch.log(-torch.log(noise.clamp(tiny, 1.0 - 1e-7)))
        sampled = kept / temperature.clamp(min=1e-5) + gumbel
        scores = torch.where(temperature > 0, sampled, logits)
        return scores.argmax(dim=-1)

    class Depth(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.depth = model.depth_decoder

        def forward(
            self, last_hidden: Any, codebook0: Any, temperature: Any, top_k: Any, noise: Any
        ) -> Any:
            cache = DynamicCache()
            ids = torch.stack([torch.zeros_like(codebook0), codebook0], dim=1)
            out = self.depth(
                input_ids=ids, backbone_last_hidden_state=last_hidden,
                past_key_values=cache, use_cache=True, logits_to_keep=1,
            )
            chosen = []
            for step in range(steps):
                token = pick(out.logits[:, -1, :], temperature, top_k, noise[step : step + 1])
                chosen.append(token)
                if step + 1 < steps:
                    out = self.depth(
                        input_ids=token.view(1, 1), past_key_values=out.past_key_values,
                        use_cache=True, logits_to_keep=1,
                    )
            return torch.stack(chosen, dim=1)

    return Depth().eval()


def _nearest_centroid(codebook: Any) -> Any:
    """``MimiEuclideanCodebook.quantize`` without ``torch.cdist`` (not exportable).

    Same arithmetic as ``torch.cdist``'s matrix-product path (``_euclidean_dist``
    in ATen, used for more than 25 vectors): ``[-2x, |x|^2, 1] @ [e, 1, |e|^2]^T``,
    then the nearest centroid index.
    """
    import torch

    def quantize(hidden_states: Any) -> Any:
        x = hidden_states.float()
        embed = codebook.embed.float()
        x_norm = x.pow(2).sum(dim=-1, keepdim=True)
        e_norm = embed.pow(2).sum(dim=-1, keepdim=True)
        x_pad = torch.cat([-2 * x, x_norm, torch.ones_like(x_norm)], dim=-1)
        e_pad = torch.cat([embed, torch.ones_like(e_norm), e_norm], dim=-1)
        return (x_pad @ e_pad.T).clamp_min(1e-30).argmin(dim=-1)

    return quantize


def mimi_encoder_module(model: Any) -> Any:
    """Mimi encoder graph module: 24 kHz audio -> all Q codebooks (see module doc).

    The module's codebooks quantize with :func:`_nearest_centroid` (argmin of
    squared distances, the same order as ``cdist``'s distances).
    """
    import torch

    quantizer = model.codec_model.quantizer
    for rvq in (
        quantizer.semantic_residual_vector_quantizer,
        quantizer.acoustic_residual_vector_quantizer,
    ):
        for layer in rvq.layers:
            layer.codebook.quantize = _nearest_centroid(layer.codebook)

    class MimiEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.codec = model.codec_model

        def forward(self, audio: Any) -> Any:
            return self.codec.encode(audio).audio_codes

    return MimiEncoder().eval()


def mimi_decoder_module(model: Any) -> Any:
    """Mimi decoder graph module: the first N of Q codebooks -> 24 kHz audio (see module doc)."""
    import torch

    quantizer = model.codec_model.quantizer
    semantic = quantizer.semantic_residual_vector_quantizer
    acoustic = quantizer.acoustic_residual_vector_quantizer
    first_acoustic = quantizer.num_semantic_quantizers

    def residual_sum(rvq: Any, codes: Any, first_index: int, num_quantizers: Any) -> Any:
        total = None
        for offset, layer in enumerate(rvq.layers):
            embedded = layer.decode(codes[:, first_index + offset])
            keep = (num_quantizers > first_index + offset).to(embedded.dtype)
            total = embedded * keep if total is None else total + embedded * keep
        return total if rvq.output_proj is None else rvq.output_proj(total)

    class MimiDecoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.codec = model.codec_model

        def forward(self, audio_codes: Any, num_quantizers: Any) -> Any:
            latents = residual_sum(semantic, audio_codes, 0, num_quantizers) + residual_sum(
                acoustic, audio_codes, first_acoustic, num_quantizers
            )
            return self.codec.decoder(latents).audio_values.to(torch.float32)

    return MimiDecoder().eval()
