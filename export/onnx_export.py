"""ONNX export of one ``torch.nn.Module`` into a Triton version folder (``model.onnx``).

One rule for every exporter: a module whose parameters take more than 2 GiB
(protobuf's limit on one ONNX file) is written with its weights as external
data, ``model.onnx.data`` next to ``model.onnx``, which Triton's onnxruntime
backend and the python-backend onnxruntime model both load from the version
folder.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROTOBUF_LIMIT_BYTES = 2**31


def parameter_bytes(module: Any) -> int:
    """Bytes taken by ``module``'s parameters at their current dtypes."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_onnx(
    module: Any,
    example: tuple[Any, ...],
    version_dir: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_shapes: Any,
    optimize: bool = True,
) -> list[Path]:
    """Export ``module`` with ``torch.onnx.export(dynamo=True)`` to ``version_dir/model.onnx``.

    The graph is written into a scratch folder and moved into place, so no
    half file is left and external data keeps the file name the graph refers to.

    Args:
        module: the ``torch.nn.Module`` in eval mode.
        example: example inputs, in ``input_names`` order (their shapes fix the
            static dimensions).
        version_dir: the model's version folder, e.g. ``<repo>/kokoro_network/1``.
        input_names: ONNX input names, one per ``example`` entry.
        output_names: ONNX output names, in the module's return order.
        dynamic_shapes: ``torch.export`` dynamic shapes, by name or by position.
        optimize: run onnxscript's optimizer (slow on large unrolled graphs).

    Returns:
        The written files: ``model.onnx`` first, then ``model.onnx.data`` when
        the parameters exceed 2 GiB.

    Raises:
        RuntimeError: the exporter left no ``model.onnx`` (another export
            cleared the scratch folder).
    """
    import torch

    scratch = version_dir / ".export"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    with torch.no_grad():
        torch.onnx.export(
            module,
            example,
            str(scratch / "model.onnx"),
            dynamo=True,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=dynamic_shapes,
            external_data=parameter_bytes(module) > PROTOBUF_LIMIT_BYTES,
            optimize=optimize,
        )
    produced_files = sorted(scratch.iterdir())
    if not any(p.name == "model.onnx" for p in produced_files):
        raise RuntimeError(f"torch.onnx.export wrote no model.onnx into {scratch}")
    written = []
    for produced in produced_files:
        produced.replace(version_dir / produced.name)
        written.append(version_dir / produced.name)
    scratch.rmdir()
    return written
