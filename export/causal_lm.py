"""Shared by the LM exporters (author, chat): a causal LM -> one ONNX step graph with a KV cache.

The step graph: ``input_ids`` INT64 [1, T], ``past_keys`` / ``past_values``
FP32 [L, 1, H_kv, P, D] -> ``logits`` FP32 [1, V] (last position),
``present_keys`` / ``present_values`` FP32 [L, 1, H_kv, P+T, D]. Prefill
passes the prompt with P = 0; each decode step passes one token. The BLS loop
that drives it is ``generate`` in ``model_repository/common/converse_backend.py``.
A family (``author``, ``chat``) is a python loop model plus its step-graph
network; :func:`write_lm` writes both from their ``model_repository/`` folders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.onnx_export import export_onnx
from export.repository import (
    SOURCE_REPOSITORY,
    place_onnxruntime_model,
    progress,
    write_atomic,
    write_model,
)


@dataclass(frozen=True)
class LMSource:
    """Where an LM comes from: a transformers directory, optionally with a GGUF file in it."""

    directory: Path
    gguf_file: str | None
    display_name: str

    def fingerprint(self) -> dict[str, Any]:
        """Manifest input: the source files' sizes and mtimes (cheap, changes with content)."""
        files = sorted(p for p in self.directory.iterdir() if p.is_file())
        if self.gguf_file is not None:
            files = [self.directory / self.gguf_file]
        return {
            "directory": str(self.directory.resolve()),
            "gguf_file": self.gguf_file,
            "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
        }


@dataclass(frozen=True)
class CacheGeometry:
    """Shape facts of a step graph: layers L, KV heads H_kv, head size D, vocabulary V."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, model: Any) -> CacheGeometry:
        """Read from a transformers causal LM's (text) config."""
        config = model.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        return cls(config.num_hidden_layers, config.num_key_value_heads, head_dim,
                   config.vocab_size)

    def io_block(self) -> str:
        """The ``input``/``output`` blocks of the step graph's Triton config."""
        cache = f"[ {self.layers}, 1, {self.kv_heads}, -1, {self.head_dim} ]"
        return (
            "input [\n"
            '  { name: "input_ids" data_type: TYPE_INT64 dims: [ 1, -1 ] },\n'
            f'  {{ name: "past_keys" data_type: TYPE_FP32 dims: {cache} }},\n'
            f'  {{ name: "past_values" data_type: TYPE_FP32 dims: {cache} }}\n'
            "]\n"
            "output [\n"
            f'  {{ name: "logits" data_type: TYPE_FP32 dims: [ 1, {self.vocab} ] }},\n'
            f'  {{ name: "present_keys" data_type: TYPE_FP32 dims: {cache} }},\n'
            f'  {{ name: "present_values" data_type: TYPE_FP32 dims: {cache} }}\n'
            "]"
        )


def load_lm(source: LMSource, label: str) -> tuple[Any, Any]:
    """``(tokenizer, model)`` of ``source`` with transformers, float32, eager attention."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(f"{label}: loading {source.display_name} with transformers (slow for GGUF)")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(source.directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        source.directory, dtype=torch.float32, attn_implementation="eager", **kwargs
    ).eval()
    return tokenizer, model


def step_module(model: Any) -> Any:
    """Wrap a transformers causal LM as ``(input_ids, past_keys, past_values) -> step``.

    Returns a ``torch.nn.Module`` whose forward returns ``(logits[:, -1], present_keys,
    present_values)`` with the cache stacked over layers ([L, 1, H_kv, P, D]).
    """
    import torch
    from transformers.cache_utils import DynamicCache

    layers = model.config.get_text_config().num_hidden_layers

    class LMStep(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, past_keys: Any, past_values: Any) -> Any:
            cache = DynamicCache(
                ddp_cache_data=[(past_keys[i], past_values[i]) for i in range(layers)]
            )
            out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True)
            keys = torch.stack([layer.keys for layer in out.past_key_values.layers])
            values = torch.stack([layer.values for layer in out.past_key_values.layers])
            return out.logits[:, -1, :], keys, values

    return LMStep().eval()


def stop_token_ids(tokenizer: Any, extra_tokens: tuple[str, ...] = (),
                   line_breaks: bool = False) -> list[int]:
    """Sorted ids generation stops at.

    EOS, each of ``extra_tokens`` that the vocabulary has and, with
    ``line_breaks``, every vocabulary entry whose text contains a line break.
    """
    stops = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    stops |= {int(vocab[token]) for token in extra_tokens if token in vocab}
    if line_breaks:
        for token, index in vocab.items():
            if "\n" in tokenizer.convert_tokens_to_string([token]):
                stops.add(int(index))
    return sorted(stops)


@dataclass(frozen=True)
class LMFamily:
    """One LM family's Triton models: the python loop ``loop`` over the step graph ``network``.

    Attributes:
        loop: name of the python BLS model (and of its ``model_repository/`` folder).
        network: name of the step-graph model (and of its folder).
        label: progress-line prefix.
    """

    loop: str
    network: str
    label: str


def write_lm(
    family: LMFamily,
    out: Path,
    target: str,
    tokenizer: Any,
    model: Any,
    max_context: int,
    loop_values: Callable[[Path], tuple[dict[str, Any], list[Path]]],
) -> list[Path]:
    """Export ``model``'s step graph and write the family's two Triton models under ``out``.

    Writes ``<network>/1/model.onnx`` (dynamic T and P up to ``max_context``),
    ``<loop>/1/tokenizer.json`` and both configs; the loop's template gets
    ``num_layers``, ``kv_heads``, ``head_dim``, ``max_context`` plus what
    ``loop_values(loop_version_dir)`` returns (it may write more files there
    and returns them too).

    Returns:
        Every written file.
    """
    import torch

    geometry = CacheGeometry.of(model)
    progress(f"{family.label}: {geometry.layers} layers, context {max_context} tokens")
    network_dir, loop_dir = out / family.network, out / family.loop
    progress(f"{family.label}: exporting the step graph to ONNX (torch.export, dynamic T and P)")
    tokens = torch.export.Dim("tokens", min=1, max=max_context)
    past = torch.export.Dim("past", min=0, max=max_context)
    cache = torch.zeros(geometry.layers, 1, geometry.kv_heads, 2, geometry.head_dim)
    outputs = export_onnx(
        step_module(model),
        (torch.ones(1, 4, dtype=torch.int64), cache, cache.clone()),
        network_dir / "1",
        ["input_ids", "past_keys", "past_values"],
        ["logits", "present_keys", "present_values"],
        {"input_ids": {1: tokens}, "past_keys": {3: past}, "past_values": {3: past}},
    )
    progress(f"{family.label}: writing tokenizer and configs")
    tokenizer_path = loop_dir / "1" / "tokenizer.json"
    tokenizer_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(tokenizer_path, lambda tmp: tokenizer.backend_tokenizer.save(str(tmp)))
    values, extra = loop_values(loop_dir / "1")
    outputs += [
        tokenizer_path,
        *extra,
        *write_model(SOURCE_REPOSITORY / family.network, network_dir, target,
                     io=geometry.io_block()),
        *write_model(
            SOURCE_REPOSITORY / family.loop,
            loop_dir,
            num_layers=geometry.layers,
            kv_heads=geometry.kv_heads,
            head_dim=geometry.head_dim,
            max_context=max_context,
            **values,
        ),
    ]
    if target == "cpu":
        outputs += place_onnxruntime_model(network_dir)
    return outputs
