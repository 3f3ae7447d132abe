"""Exporter for Silero VAD: the ``silero-vad`` wheel's ONNX file served by a python model.

The ``silero-vad`` package (MIT) ships ``silero_vad/data/silero_vad.onnx``
(inputs ``input`` float32 [B, C + W], ``state`` [2, B, 128], ``sr`` int64;
outputs the speech probability [B, 1] and the new state). The package is
installed with ``--no-deps`` (requirements/weights.txt) because only that
file is used; its torch-based Python code is never imported. The file is
found through the installed distribution's metadata, which does not import
the package. Source: ``model_repository/silero_vad``.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from export.repository import (
    COMMON,
    SOURCE_REPOSITORY,
    ExportOptions,
    copy_atomic,
    export_entry,
    exporter_digests,
    sha256_of_file,
    source_digests,
    write_model,
)

PACKAGE = "silero-vad"
ONNX_FILE = "silero_vad/data/silero_vad.onnx"
# Python-backend instances: each runs windows one after another (~0.1 ms of
# network per 32 ms window), so two serve many sessions.
INSTANCES = 2


def silero_onnx() -> Path:
    """Path of the installed ``silero_vad.onnx``.

    Raises:
        RuntimeError: the ``silero-vad`` package, or its ONNX file, is not installed.
    """
    remedy = "install it with `pip install --no-deps -r requirements/weights.txt`"
    try:
        distribution = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError as error:
        raise RuntimeError(f"vad: the {PACKAGE} package is not installed; {remedy}") from error
    path = Path(str(distribution.locate_file(ONNX_FILE)))
    if not path.is_file():
        raise RuntimeError(f"vad: {PACKAGE} {distribution.version} has no {ONNX_FILE}; {remedy}")
    return path


def export_vad(options: ExportOptions) -> bool:
    """Write ``silero_vad`` (the ONNX file, python model, config) into ``options.out``.

    The model runs on the CPU for both targets.

    Returns:
        True when files were written, False when already up to date.

    Raises:
        RuntimeError: the ``silero-vad`` package or its ONNX file is missing.
    """
    onnx_file = silero_onnx()
    source = SOURCE_REPOSITORY / "silero_vad"
    inputs = {
        "packages": {PACKAGE: metadata.version(PACKAGE)},
        "sha256": sha256_of_file(onnx_file),
        "sources": source_digests(source, COMMON),
        "exporter": exporter_digests("vad.py"),
        "instances": INSTANCES,
    }

    def write() -> list[Path]:
        target = options.out / "silero_vad"
        copy_atomic(onnx_file, target / "1" / "silero_vad.onnx")
        return [target / "1" / "silero_vad.onnx", *write_model(source, target, instances=INSTANCES)]

    return export_entry(options.out, "silero_vad", inputs, write, label="vad")
