"""CSM TensorRT engines vs ONNX Runtime on the same inputs (GPU only)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from devtools.tiny_models import make_tiny_csm
from export.__main__ import main as export_main


def _gpu_available() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not _gpu_available(), reason="TensorRT engines need a CUDA GPU and the tensorrt package"
    ),
]


def run_engine(plan: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a serialized engine once with ``feeds`` (torch CUDA tensors as device buffers)."""
    import tensorrt as trt
    import torch

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
        plan.read_bytes()
    )
    context = engine.create_execution_context()
    buffers = {}
    for name, value in feeds.items():
        buffers[name] = torch.from_numpy(np.ascontiguousarray(value)).cuda()
        context.set_input_shape(name, tuple(value.shape))
        context.set_tensor_address(name, buffers[name].data_ptr())
    outputs = {}
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        if engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
            continue
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
        shape = tuple(context.get_tensor_shape(name))
        outputs[name] = torch.from_numpy(np.zeros(shape, dtype)).cuda()
        context.set_tensor_address(name, outputs[name].data_ptr())
    stream = torch.cuda.Stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}


def test_engines_match_onnxruntime(tmp_path: Path) -> None:
    import onnxruntime as ort

    checkpoint = make_tiny_csm(tmp_path / "tiny")
    repository = tmp_path / "repository"
    argv = ["csm", "--checkpoint", str(checkpoint), "--out", str(repository),
            "--name", "csm-trt", "--target", "gpu", "--tensorrt"]
    assert export_main(argv) == 0
    rng = np.random.default_rng(0)
    mask = np.zeros((1, 12, 33), bool)
    mask[..., 32] = True
    feeds = {
        "mimi_encoder": {"audio": (0.1 * rng.standard_normal((1, 1, 1920 * 5))).astype(np.float32)},
        "backbone": {
            "frames": rng.integers(0, 64, (1, 12, 33)),
            "frame_mask": mask,
            "past_keys": rng.standard_normal((2, 1, 2, 3, 16)).astype(np.float32),
            "past_values": rng.standard_normal((2, 1, 2, 3, 16)).astype(np.float32),
        },
        "depth": {
            "last_hidden": rng.standard_normal((1, 64)).astype(np.float32),
            "codebook0": np.array([7]),
            "temperature": np.array([0.0], np.float32),
            "top_k": np.array([64]),
            "uniform_noise": rng.random((31, 64), dtype=np.float32),
        },
        "mimi_decoder": {"audio_codes": rng.integers(0, 64, (1, 32, 6)),
                         "num_quantizers": np.array([32])},
    }
    for role, inputs in feeds.items():
        directory = repository / f"csm-trt_{role}" / "1"
        session = ort.InferenceSession(str(directory / "model.onnx"))
        names = [output.name for output in session.get_outputs()]
        expected = dict(zip(names, session.run(None, inputs), strict=True))
        got = run_engine(directory / "model.plan", inputs)
        assert sorted(got) == sorted(expected)
        for name, value in got.items():
            if np.issubdtype(value.dtype, np.floating):
                np.testing.assert_allclose(value, expected[name], atol=2e-3, rtol=1e-3)
            else:
                np.testing.assert_array_equal(value, expected[name])
