"""TensorRT engine building for exported ONNX graphs (``python -m export csm --tensorrt``).

Uses the ``tensorrt`` Python API (``Builder`` -> ``OnnxParser`` ->
``build_serialized_network``) with one optimization profile per engine:
each dynamic dimension gets min = its ``torch.export.Dim`` lower bound,
opt = the example input's size, max = its upper bound. Engines are GPU-model
specific: build them on the GPU kind that will serve them.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

WORKSPACE_BYTES = 8 << 30


def require_gpu() -> None:
    """Fail early, with the reason, when TensorRT engines cannot be built here.

    Raises:
        RuntimeError: the ``tensorrt`` package is missing or no CUDA GPU is visible.
    """
    try:
        import tensorrt  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            "--tensorrt needs the tensorrt Python package and a CUDA GPU "
            "(pip install tensorrt on a GPU machine); export without --tensorrt "
            "for onnxruntime"
        ) from error
    if shutil.which("nvidia-smi") is None:
        raise RuntimeError("--tensorrt needs a CUDA GPU; none is visible on this machine")


def _profile_shapes(
    example: Any, dynamic: dict[int, Any]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes of one input for the optimization profile."""
    opt = tuple(int(d) for d in example.shape)
    low, high = list(opt), list(opt)
    for axis, dim in dynamic.items():
        low[axis] = int(dim.min)
        high[axis] = int(dim.max)
    return tuple(low), opt, tuple(high)


def build_engine(
    onnx_path: Path, plan_path: Path, dynamic: dict[str, dict[int, Any]], example: tuple[Any, ...]
) -> None:
    """Parse ``onnx_path`` and write a serialized TensorRT engine to ``plan_path``.

    ``dynamic`` maps input names to ``{axis: torch.export.Dim}``; ``example``
    holds the example inputs in graph input order (their shapes are the
    profile's opt shapes).

    Raises:
        RuntimeError: the parser or the builder failed (messages included).
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        if -1 in tuple(tensor.shape):
            profile.set_shape(
                tensor.name, *_profile_shapes(example[index], dynamic[tensor.name])
            )
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan_path.with_name(plan_path.name + ".partial")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(plan_path)
