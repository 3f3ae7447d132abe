"""The model repository source: one folder per model, one requirements list used everywhere."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

import pytest
import yaml

from devtools import REPOSITORY
from devtools.local_triton import LocalTriton
from export.repository import BACKEND_HELPERS, SOURCE_REPOSITORY

ROOT = SOURCE_REPOSITORY.parent
REQUIREMENTS = SOURCE_REPOSITORY / "requirements.txt"
MODELS = (
    "kokoro", "kokoro_frontend", "kokoro_network", "author", "author_lm", "whisper_asr", "aligner",
    "chat", "chat_lm", "silero_vad",
)
CSM_MODELS = ("ensemble", "prompt", "generator", "network")


def _requirements() -> list[str]:
    lines = REQUIREMENTS.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_local_extra_is_read_from_the_requirements_file() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    local = pyproject["tool"]["setuptools"]["dynamic"]["optional-dependencies"]["local"]
    assert "model_repository/requirements.txt" in local["file"]
    installed = [
        r for r in metadata.requires("converse") or [] if re.search(r"extra\s*==\s*.local", r)
    ]
    names = {_name(r) for r in installed}
    assert {_name(r) for r in _requirements()} <= names
    assert {"nvidia-pytriton", "uvicorn"} <= names


def test_triton_image_installs_the_requirements_file_only() -> None:
    dockerfile = (ROOT / "docker" / "triton.Dockerfile").read_text()
    copied = re.search(r"^COPY model_repository/requirements.txt (\S+)$", dockerfile, re.M)
    assert copied is not None
    installs = re.findall(r"pip install (.*)$", dockerfile, re.M)
    assert installs == [f"--no-cache-dir -r {copied.group(1)}"]


def test_compose_runs_the_triton_image_on_the_built_repository() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    triton, api = services["triton"], services["api"]
    assert triton["build"]["dockerfile"] == "docker/triton.Dockerfile"
    assert "pip" not in triton["command"]
    assert "./build/model_repository:/models:ro" in triton["volumes"]
    assert triton["shm_size"]
    # The API installs from a writable copy and keeps its state on a writable volume.
    assert "pip install --no-cache-dir /tmp/converse" in api["command"]
    state = api["environment"]["CONVERSE_SQLITE_PATH"]
    mounts = [v.split(":") for v in api["volumes"]]
    assert any(state.startswith(target) and mode != ["ro"] for _, target, *mode in mounts)
    # Both of the API's Triton addresses name the Triton service, not the API's own loopback.
    environment = api["environment"]
    assert environment["CONVERSE_TRITON_URL"] == "triton:8000"
    assert environment["CONVERSE_TRITON_GRPC_URL"] == "triton:8001"
    assert environment["CONVERSE_TRITON_PROTOCOL"] == "grpc"


def test_every_model_has_a_source_folder_with_its_config_template() -> None:
    for folder in [*MODELS, *(f"csm_template/{m}" for m in CSM_MODELS)]:
        templates = list((SOURCE_REPOSITORY / folder).glob("config*.pbtxt.template"))
        assert templates, folder
    python_models = sorted(SOURCE_REPOSITORY.rglob("1/model.py"))
    assert len(python_models) == 8
    for path in [*python_models, SOURCE_REPOSITORY / "common" / "onnxruntime_model.py"]:
        imports = re.findall(r"^(?:import|from) (\S+)", path.read_text(), re.M)
        assert "converse_backend" in imports, path
        assert imports.index("converse_backend") < imports.index("numpy"), path


@pytest.mark.triton
def test_built_repository_holds_only_models(triton: LocalTriton) -> None:
    for folder in (p for p in REPOSITORY.iterdir() if p.is_dir()):
        assert (folder / "config.pbtxt").is_file(), folder
        assert (folder / "1").is_dir(), folder
        if (folder / "1" / "model.py").is_file():
            assert (folder / "1" / BACKEND_HELPERS.name).is_file(), folder
    assert not (REPOSITORY / "common").exists()
    assert (REPOSITORY / "kokoro" / "1" / ".keep").is_file()
