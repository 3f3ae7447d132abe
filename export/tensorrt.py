"""TensorRT engines for exported ONNX graphs (``python -m export csm --tensorrt``).

A serialized engine (``model.plan``) deserializes only in the TensorRT version
that built it, so engines are built with exactly the TensorRT of the Triton
image that serves them: :data:`TRITON_RELEASE` is the NGC release
``docker/triton.Dockerfile`` builds ``FROM`` and :data:`TENSORRT_VERSION` the
TensorRT that release ships (NGC release notes, "Triton Inference Server
Release 24.10": TensorRT 10.5.0.18, CUDA 12.6.2, Ubuntu 22.04 / Python 3.10).
``requirements/tensorrt.txt`` pins the same version as a wheel, and ``make
engines`` builds them inside an image made from that Triton release
(``docker/engines.Dockerfile``); tests check that the three agree.

Engines are built with the ``tensorrt`` Python API (``Builder`` ->
``OnnxParser`` -> ``build_serialized_network``) as **strongly typed**
networks: every tensor keeps the type the ONNX graph gives it, so an fp16 or
bf16 export runs in that precision without builder precision flags (TensorRT
developer guide, "Strongly Typed Networks"). Each engine carries the
optimization profiles it is given (:class:`Profile`); Triton picks, per
request, the profile that fits the input shapes among those the model's
``instance_group`` lists.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TRITON_RELEASE = "24.10"
TENSORRT_VERSION = "10.5.0"
TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{TRITON_RELEASE}-py3"
WORKSPACE_BYTES = 8 << 30
PLAN_NAME = "model.plan"

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile.

    Attributes:
        name: what the profile serves (e.g. ``"prefill"``, ``"decode"``); used
            to name the Triton warmup sample that runs it.
        shapes: ``{input name: (min, opt, max)}`` for every input with a
            dynamic dimension; TensorRT picks kernels for ``opt`` and accepts
            any shape between ``min`` and ``max`` (element-wise).

    Raises:
        ValueError: a shape triple whose ranks differ or whose dimensions are
            not ``0 <= min <= opt <= max``.
    """

    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def __post_init__(self) -> None:
        for tensor, (low, opt, high) in self.shapes.items():
            if not len(low) == len(opt) == len(high) or not all(
                0 <= a <= b <= c for a, b, c in zip(low, opt, high, strict=True)
            ):
                raise ValueError(
                    f"profile {self.name!r}, input {tensor!r}: need 0 <= min <= opt <= max of "
                    f"one rank, got {low}, {opt}, {high}"
                )

    def opt_shapes(self) -> dict[str, Shape]:
        """``{input name: opt shape}``: the shapes the profile is tuned for."""
        return {name: opt for name, (_, opt, _) in self.shapes.items()}


def require_tensorrt() -> None:
    """Fail early, with the reason, unless engines built here will load in the Triton image.

    The installed ``tensorrt`` must be :data:`TENSORRT_VERSION` (major.minor.patch;
    the wheel reports ``10.5.0``, the NGC images ``10.5.0.18``) and a CUDA GPU
    must be visible.

    Raises:
        RuntimeError: ``tensorrt`` is missing or another version, or there is no GPU;
            the message says how to build the engines instead.
    """
    remedy = (
        f"install it with `pip install -r requirements/tensorrt.txt` on a GPU machine, or "
        f"build the engines in the {TRITON_IMAGE} image with `make engines` (docs/csm.md); "
        f"export without --tensorrt for onnxruntime"
    )
    try:
        import tensorrt
    except ImportError as error:
        raise RuntimeError(
            f"--tensorrt needs TensorRT {TENSORRT_VERSION} (the version in {TRITON_IMAGE}, "
            f"which serves the engines) and a CUDA GPU: {remedy}"
        ) from error
    installed = str(getattr(tensorrt, "__version__", "unknown"))
    if installed.split(".")[:3] != TENSORRT_VERSION.split("."):
        raise RuntimeError(
            f"--tensorrt needs TensorRT {TENSORRT_VERSION}, the version in {TRITON_IMAGE}: "
            f"a plan loads only in the TensorRT that built it, and {installed} is installed; "
            f"{remedy}"
        )
    if shutil.which("nvidia-smi") is None:
        raise RuntimeError("--tensorrt needs a CUDA GPU; none is visible on this machine")


def build_engine(onnx_path: Path, plan_path: Path, profiles: Sequence[Profile]) -> None:
    """Parse ``onnx_path`` as a strongly typed network and write its engine to ``plan_path``.

    Args:
        onnx_path: the ONNX graph (external data next to it, if any).
        plan_path: where the serialized engine goes (written atomically).
        profiles: the optimization profiles, in the order Triton numbers them
            (``"0"``, ``"1"``...); empty for a graph without dynamic dimensions.

    Raises:
        RuntimeError: the parser or the builder failed (messages included), or a
            dynamic input has no shape in one of ``profiles``.
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    dynamic = [
        network.get_input(i).name
        for i in range(network.num_inputs)
        if -1 in tuple(network.get_input(i).shape)
    ]
    for profile in profiles:
        missing = sorted(set(dynamic) - set(profile.shapes))
        if missing:
            raise RuntimeError(
                f"{onnx_path}: profile {profile.name!r} gives no shapes for {', '.join(missing)}"
            )
        optimization = builder.create_optimization_profile()
        for name in dynamic:
            optimization.set_shape(name, *profile.shapes[name])
        config.add_optimization_profile(optimization)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan_path.with_name(plan_path.name + ".partial")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(plan_path)


def onnx_beside_plans(root: Path) -> list[Path]:
    """ONNX files in the version folders of the TensorRT models under repository ``root``.

    A TensorRT model serves its ``model.plan`` only; an ONNX file next to it
    would be uploaded and stored for nothing (``make upload-models`` refuses).

    Returns:
        The offending files, sorted.
    """
    return sorted(
        onnx
        for plan in root.glob(f"*/*/{PLAN_NAME}")
        for onnx in plan.parent.iterdir()
        if ".onnx" in onnx.name
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m export.tensorrt release | check-upload ROOT``; returns the exit status.

    ``release`` prints :data:`TRITON_RELEASE` (``make engines`` builds its image
    from it); ``check-upload ROOT`` exits 1, listing them, when ONNX files sit
    next to TensorRT plans under the repository ``ROOT``.
    """
    parser = argparse.ArgumentParser(prog="python -m export.tensorrt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("release", help="print the Triton release the engines are built for")
    check = commands.add_parser("check-upload", help="refuse ONNX files next to TensorRT plans")
    check.add_argument("root", type=Path)
    args = parser.parse_args(argv)
    if args.command == "release":
        print(TRITON_RELEASE)
        return 0
    found = onnx_beside_plans(args.root)
    for path in found:
        print(f"{path}: ONNX next to a TensorRT plan; re-export with --tensorrt", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
