"""CSM TensorRT engines: the pinned TensorRT, strongly typed builds, profiles, plan-only folders.

On CPU a stand-in ``tensorrt`` module records what the builder is asked for
and the ONNX export is stubbed, so the wiring runs in seconds; the engines
themselves are compared with onnxruntime only where a CUDA GPU and TensorRT
are present (marker ``gpu``).
"""

from __future__ import annotations

import enum
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

import export.csm
from devtools.tiny_models import make_tiny_csm
from export.__main__ import main as export_main
from export.csm import CsmExportOptions, export_csm, tensorrt_profiles
from export.tensorrt import (
    TENSORRT_VERSION,
    TRITON_IMAGE,
    TRITON_RELEASE,
    Profile,
    build_engine,
    onnx_beside_plans,
)
from export.tensorrt import main as tensorrt_main
from handler.engines.csm import CsmEngine
from handler.errors import InvalidRequest

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("mimi_encoder", "backbone", "depth", "mimi_decoder")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_csm(tmp_path_factory.mktemp("tiny-csm"))


@pytest.fixture(scope="module")
def tiny_model(checkpoint: Path) -> Any:
    from transformers import CsmForConditionalGeneration

    return CsmForConditionalGeneration.from_pretrained(checkpoint).eval()


def fake_tensorrt(version: str, inputs: dict[str, tuple[int, ...]]) -> tuple[Any, dict[str, list]]:
    """A stand-in ``tensorrt`` module whose parser yields a network with ``inputs``.

    Returns the module and what its builder was asked for: network creation
    flags, builder flags and the optimization profiles' shapes.
    """
    calls: dict[str, list] = {"network_flags": [], "builder_flags": [], "profiles": []}
    module: Any = types.ModuleType("tensorrt")
    module.__version__ = version

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        STRONGLY_TYPED = 1

    class BuilderFlag(enum.IntEnum):
        FP16 = 0
        BF16 = 1

    class Network:
        num_inputs = len(inputs)

        def get_input(self, index: int) -> Any:
            name, shape = list(inputs.items())[index]
            return types.SimpleNamespace(name=name, shape=shape)

    class OnnxParser:
        num_errors = 0

        def __init__(self, network: Network, logger: Any) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            return Path(path).is_file()

    class OptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple] = {}

        def set_shape(self, name: str, low: Any, opt: Any, high: Any) -> None:
            self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

    class BuilderConfig:
        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            pass

        def set_flag(self, flag: BuilderFlag) -> None:
            calls["builder_flags"].append(flag)

        def add_optimization_profile(self, profile: OptimizationProfile) -> int:
            calls["profiles"].append(profile.shapes)
            return len(calls["profiles"]) - 1

    class Builder:
        def __init__(self, logger: Any) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            calls["network_flags"].append(flags)
            return Network()

        def create_builder_config(self) -> BuilderConfig:
            return BuilderConfig()

        def create_optimization_profile(self) -> OptimizationProfile:
            return OptimizationProfile()

        def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes:
            return b"engine"

    module.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    module.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    module.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
    module.BuilderFlag = BuilderFlag
    module.OnnxParser = OnnxParser
    module.Builder = Builder
    return module, calls


# --- one TensorRT: the Triton image's ---------------------------------------------------


def test_pinned_tensorrt_is_the_one_of_the_triton_image() -> None:
    served = re.findall(r"^FROM\s+(\S+)", (ROOT / "docker" / "triton.Dockerfile").read_text(), re.M)
    assert served == [TRITON_IMAGE]
    requirements = [
        line.strip() for line in (ROOT / "requirements" / "tensorrt.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert requirements == [f"tensorrt-cu12=={TENSORRT_VERSION}"]


def test_make_engines_builds_in_the_triton_release() -> None:
    dockerfile = (ROOT / "docker" / "engines.Dockerfile").read_text()
    assert re.findall(r"^FROM\s+(\S+)", dockerfile, re.M) == [
        "nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3"
    ]
    assert re.search(r"pip install .*-r requirements/tensorrt\.txt", dockerfile)
    make = subprocess.run(["make", "-n", "engines", "CHECKPOINT=/checkpoints/csm-1b"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"--build-arg TRITON_RELEASE={TRITON_RELEASE}" in make
    assert "-f docker/engines.Dockerfile" in make
    assert re.search(r"python -m export csm .*--tensorrt", make.replace("\\\n", " "))


def test_engines_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "warning", str(ROOT / "docker" / "engines.Dockerfile")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("installed", ["10.9.0", "10.4.0.26", "8.6.1"])
def test_export_refuses_another_tensorrt(
    installed: str, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    module, _ = fake_tensorrt(installed, {})
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    out = tmp_path / "repository"
    argv = ["csm", "--checkpoint", str(checkpoint), "--out", str(out), "--target", "gpu",
            "--tensorrt"]
    assert export_main(argv) == 2
    error = capsys.readouterr().err
    assert f"--tensorrt needs TensorRT {TENSORRT_VERSION}" in error
    assert installed in error and TRITON_IMAGE in error and "make engines" in error
    assert list(tmp_path.iterdir()) == []


def test_export_without_tensorrt_or_gpu_refuses(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["csm", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "r"), "--tensorrt"]
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    assert export_main(argv) == 2
    assert "requirements/tensorrt.txt" in capsys.readouterr().err
    module, _ = fake_tensorrt(f"{TENSORRT_VERSION}.18", {})  # the NGC images' four-part form
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr("export.tensorrt.shutil.which", lambda _: None)
    assert export_main(argv) == 2
    assert "--tensorrt needs a CUDA GPU" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# --- the builder: strongly typed, the given profiles ------------------------------------


def test_build_engine_is_strongly_typed_with_every_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, calls = fake_tensorrt(TENSORRT_VERSION, {"x": (1, -1, 4), "n": (1,)})
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    onnx = tmp_path / "graph.onnx"
    onnx.write_bytes(b"onnx")
    short = Profile("short", {"x": ((1, 1, 4), (1, 2, 4), (1, 8, 4))})
    long = Profile("long", {"x": ((1, 8, 4), (1, 64, 4), (1, 99, 4))})
    build_engine(onnx, tmp_path / "1" / "model.plan", [short, long])
    strongly_typed = 1 << int(module.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert calls["network_flags"] == [strongly_typed]
    # The ONNX graph carries the precision: no FP16/BF16 (or any) builder flag.
    assert calls["builder_flags"] == []
    assert calls["profiles"] == [short.shapes, long.shapes]
    assert (tmp_path / "1" / "model.plan").read_bytes() == b"engine"


def test_build_engine_refuses_a_profile_missing_a_dynamic_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, _ = fake_tensorrt(TENSORRT_VERSION, {"x": (1, -1), "y": (-1,)})
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    (tmp_path / "graph.onnx").write_bytes(b"onnx")
    with pytest.raises(RuntimeError, match="profile 'only_x' gives no shapes for y"):
        build_engine(tmp_path / "graph.onnx", tmp_path / "model.plan",
                     [Profile("only_x", {"x": ((1, 1), (1, 1), (1, 2))})])
    assert not (tmp_path / "model.plan").exists()


def test_profile_refuses_unordered_shapes() -> None:
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Profile("bad", {"x": ((1, 4), (1, 2), (1, 8))})


# --- profiles from the API's limits ----------------------------------------------------


def test_profiles_follow_the_generation_limits(tiny_model: Any) -> None:
    config = tiny_model.config
    seq = config.max_position_embeddings
    frame = round(config.codec_config.sampling_rate / config.codec_config.frame_rate)
    engine = CsmEngine("tiny", config.codec_config.sampling_rate, config.num_codebooks, [], seq)
    rule = next(r for r in engine.param_rules() if r.name == "max_new_frames")
    low, high, default = int(rule.low), int(rule.high), int(rule.default)
    kv = (config.num_hidden_layers, 1, config.num_key_value_heads)
    columns, head_dim = config.num_codebooks + 1, config.head_dim
    profiles = tensorrt_profiles(tiny_model)
    assert sorted(profiles) == sorted(ROLES)
    assert profiles["depth"] == []

    prefill, decode = profiles["backbone"]
    assert prefill.shapes["frames"] == ((1, 1, columns), (1, seq - default, columns),
                                        (1, seq - low, columns))
    assert prefill.shapes["frame_mask"] == prefill.shapes["frames"]
    assert prefill.shapes["past_keys"] == ((*kv, 0, head_dim),) * 3
    assert decode.shapes["frames"] == ((1, 1, columns),) * 3
    assert decode.shapes["past_values"] == (
        (*kv, 1, head_dim), (*kv, seq - default // 2, head_dim), (*kv, seq - 1, head_dim)
    )
    (reply,) = profiles["mimi_decoder"]
    assert reply.shapes["audio_codes"] == (
        (1, config.num_codebooks, 1), (1, config.num_codebooks, default),
        (1, config.num_codebooks, min(high, seq - 1)),
    )
    (clip,) = profiles["mimi_encoder"]
    # The longest clip a prompt holds: the budget left by the fewest new frames, less
    # its EOS frame and two BOS/EOS pairs (its turn's text and the open turn's).
    assert clip.shapes["audio"] == (
        (1, 1, frame), (1, 1, default * frame), (1, 1, (seq - low - 5) * frame)
    )


def test_profiles_cover_what_the_handler_lets_through(tiny_model: Any) -> None:
    """The extreme requests the API accepts fit the engines; the next ones are refused."""
    seq = tiny_model.config.max_position_embeddings
    engine = CsmEngine("tiny", 24000, 32, [], seq)
    values = {"temperature": 0.0, "depth_temperature": None, "top_k": 50,
              "repetition_penalty": 1.0, "penalty_window": 20, "num_codebooks": 32, "seed": 0}
    rule = next(r for r in engine.param_rules() if r.name == "max_new_frames")
    fewest = rule.low
    engine.check_params({**values, "max_new_frames": fewest})
    with pytest.raises(InvalidRequest):
        engine.check_params({**values, "max_new_frames": seq})
    prefill, decode = tensorrt_profiles(tiny_model)["backbone"]
    # A prompt may take every position max_new_tokens leaves; decode attends to all but one.
    assert prefill.shapes["frames"][2][1] >= seq - fewest
    assert decode.shapes["past_keys"][2][3] + 1 >= seq
    (reply,) = tensorrt_profiles(tiny_model)["mimi_decoder"]
    assert reply.shapes["audio_codes"][2][2] >= min(seq - 1, rule.high)


# --- the exported repository: plans only -----------------------------------------------


def stub_onnx(graph: Any, dtype: Any, directory: Path) -> list[Path]:
    """Stands in for the ONNX export (minutes on CPU): one small file where it would be."""
    path = directory / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"onnx " + graph.role.encode())
    return [path]


def parse_config(path: Path) -> Any:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_tensorrt_export_writes_plans_only(
    checkpoint: Path, tiny_model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    monkeypatch.setattr(export.csm, "_export_graph", stub_onnx)
    repository = tmp_path / "repository"
    options = {"checkpoint": str(checkpoint), "out": repository, "name": "trt", "target": "gpu"}
    # An earlier onnxruntime export of the same name leaves model.onnx files behind.
    assert export_csm(CsmExportOptions(**options)) is True
    assert (repository / "trt_backbone" / "1" / "model.onnx").is_file()

    built: dict[str, tuple[bytes, Path, list[Profile]]] = {}

    def stub_engine(onnx: Path, plan: Path, profiles: Any) -> None:
        built[plan.parent.parent.name] = (onnx.read_bytes(), onnx, list(profiles))
        plan.write_bytes(b"plan")

    assert export_csm(CsmExportOptions(**options, tensorrt=True), build_engine=stub_engine)
    assert sorted(built) == sorted(f"trt_{role}" for role in ROLES)
    expected = tensorrt_profiles(tiny_model)
    for role in ROLES:
        graph_bytes, onnx, profiles = built[f"trt_{role}"]
        assert graph_bytes == b"onnx " + role.encode()
        assert not onnx.is_relative_to(repository)
        assert profiles == expected[role]
        folder = repository / f"trt_{role}"
        assert sorted(p.name for p in (folder / "1").iterdir()) == ["model.plan"]
        config = parse_config(folder / "config.pbtxt")
        assert config.platform == "tensorrt_plan"
        assert list(config.instance_group[0].profile) == [str(i) for i in range(len(profiles))]
        # One warmup per profile, at its opt shapes: every execution context runs at load.
        warmups = {w.name: {k: list(v.dims) for k, v in w.inputs.items()}
                   for w in config.model_warmup}
        wanted = [f"zeros_{p.name}" for p in profiles] or ["zeros"]
        assert sorted(warmups) == sorted(wanted)
        dims = {tensor.name: list(tensor.dims) for tensor in config.input}
        for profile in profiles:
            for tensor, shape in profile.opt_shapes().items():
                assert warmups[f"zeros_{profile.name}"][tensor] == list(shape)
            # Every dynamic input is in the profile, and its static dimensions are the config's.
            assert {n for n, d in dims.items() if -1 in d} == set(profile.shapes)
            for tensor, triple in profile.shapes.items():
                for shape in triple:
                    assert [d if d == -1 else s for d, s in zip(dims[tensor], shape, strict=True)] \
                        == dims[tensor]
    assert onnx_beside_plans(repository) == []
    assert list(repository.rglob("*.onnx")) == []
    assert [p.name for p in tmp_path.iterdir()] == ["repository"]  # scratch folder removed
    record = json.loads((repository / "manifest.json").read_text())["models"]["csm:trt"]
    assert record["inputs"]["tensorrt"] == TENSORRT_VERSION
    assert not any(".onnx" in path for path in record["outputs"])


def test_upload_refuses_onnx_beside_a_plan(tmp_path: Path) -> None:
    plan_folder = tmp_path / "csm_backbone" / "1"
    plan_folder.mkdir(parents=True)
    (plan_folder / "model.plan").write_bytes(b"plan")
    onnx_folder = tmp_path / "kokoro_network" / "1"
    onnx_folder.mkdir(parents=True)
    (onnx_folder / "model.onnx").write_bytes(b"onnx")  # an onnxruntime model: uploaded
    assert onnx_beside_plans(tmp_path) == []
    assert tensorrt_main(["check-upload", str(tmp_path)]) == 0
    for name in ("model.onnx", "model.onnx.data"):
        (plan_folder / name).write_bytes(b"onnx")
    assert onnx_beside_plans(tmp_path) == [
        plan_folder / "model.onnx", plan_folder / "model.onnx.data"
    ]
    assert tensorrt_main(["check-upload", str(tmp_path)]) == 1


def test_make_upload_models_checks_the_repository_it_syncs() -> None:
    make = subprocess.run(["make", "-n", "upload-models"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True).stdout.splitlines()
    check = next(i for i, line in enumerate(make) if "-m export.tensorrt check-upload" in line)
    sync = next(i for i, line in enumerate(make) if line.startswith("aws s3 sync"))
    assert check < sync
    synced = next(word for word in shlex.split(make[sync])[3:] if not word.startswith("-"))
    assert shlex.split(make[check])[-1] == synced == "build/model_repository"


# --- real engines (GPU) -----------------------------------------------------------------


def _gpu_available() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def run_engine(plan: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a serialized engine once with ``feeds``, in the profile that fits them."""
    import tensorrt as trt
    import torch

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
        plan.read_bytes()
    )
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    for index in range(engine.num_optimization_profiles):
        fits = all(
            all(lo <= d <= hi for lo, d, hi in zip(
                engine.get_tensor_profile_shape(name, index)[0], value.shape,
                engine.get_tensor_profile_shape(name, index)[2], strict=True))
            for name, value in feeds.items() if -1 in tuple(engine.get_tensor_shape(name))
        )
        if fits:
            context.set_optimization_profile_async(index, stream.cuda_stream)
            break
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
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_available(),
                    reason="TensorRT engines need a CUDA GPU and the tensorrt package")
def test_engines_match_onnxruntime(checkpoint: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    onnx_repository, plan_repository = tmp_path / "onnx", tmp_path / "plans"
    common = ["csm", "--checkpoint", str(checkpoint), "--name", "csm-trt", "--target", "gpu"]
    assert export_main([*common, "--out", str(onnx_repository)]) == 0
    assert export_main([*common, "--out", str(plan_repository), "--tensorrt"]) == 0
    rng = np.random.default_rng(0)
    mask = np.zeros((1, 12, 33), bool)
    mask[..., 32] = True
    cache = (2, 1, 2)
    feeds = {
        "mimi_encoder": [
            {"audio": (0.1 * rng.standard_normal((1, 1, 1920 * 5))).astype(np.float32)}
        ],
        "backbone": [
            {  # prefill: a 12-frame prompt, empty KV cache
                "frames": rng.integers(0, 64, (1, 12, 33)),
                "frame_mask": mask,
                "past_keys": np.zeros((*cache, 0, 16), np.float32),
                "past_values": np.zeros((*cache, 0, 16), np.float32),
            },
            {  # decode: one frame after 12 positions
                "frames": rng.integers(0, 64, (1, 1, 33)),
                "frame_mask": np.ones((1, 1, 33), bool),
                "past_keys": rng.standard_normal((*cache, 12, 16)).astype(np.float32),
                "past_values": rng.standard_normal((*cache, 12, 16)).astype(np.float32),
            },
        ],
        "depth": [{
            "last_hidden": rng.standard_normal((1, 64)).astype(np.float32),
            "codebook0": np.array([7]),
            "temperature": np.array([0.0], np.float32),
            "top_k": np.array([64]),
            "uniform_noise": rng.random((31, 64), dtype=np.float32),
        }],
        "mimi_decoder": [{"audio_codes": rng.integers(0, 64, (1, 32, 6)),
                          "num_quantizers": np.array([32])}],
    }
    for role, calls in feeds.items():
        folder = f"csm-trt_{role}"
        session = ort.InferenceSession(str(onnx_repository / folder / "1" / "model.onnx"))
        names = [output.name for output in session.get_outputs()]
        for inputs in calls:
            expected = dict(zip(names, session.run(None, inputs), strict=True))
            got = run_engine(plan_repository / folder / "1" / "model.plan", inputs)
            assert sorted(got) == sorted(expected)
            for name, value in got.items():
                if np.issubdtype(value.dtype, np.floating):
                    np.testing.assert_allclose(value, expected[name], atol=2e-3, rtol=1e-3)
                else:
                    np.testing.assert_array_equal(value, expected[name])
