"""Fixtures: the real local Triton and its test double (session-scoped), API clients over them.

Tests that need the real tritonserver carry ``@pytest.mark.triton``; the rest
(``make test-fast``: ``-m "not triton and not gpu" --fake-triton``) reach
Triton only through ``triton_url`` / ``client``, which ``--fake-triton`` points
at :class:`devtools.fake_triton.FakeTriton` instead of the real server.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import settings

from devtools import REPOSITORY
from devtools.fake_triton import FakeTriton
from devtools.local_triton import LocalTriton
from devtools.signals import stop_on_signals
from devtools.tiny_models import make_tiny_csm, make_tiny_gemma, make_tiny_llama
from export.__main__ import main as export_main
from export.repository import COMMON
from handler.app import create_app
from tests.helpers import TINY_CSM, TinyRepository, TinyTriton, make_settings

# Hypothesis: no per-example deadline (a timing assertion, and this 2-core machine is
# noisy: speed is measured in benchmarks/), and under CI (HYPOTHESIS_PROFILE=ci, set by
# .ci/run) a seed fixed per test, so a CI failure reruns the same examples.
settings.register_profile("converse", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "converse"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fake-triton", action="store_true",
        help="serve `triton_url` and `client` from the Triton test double (devtools.fake_triton)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (``timeout``, CI cancelling a job) unwinds pytest like Ctrl-C does.

    Python's default SIGTERM ends the process at once, skipping fixture
    teardown: the session's tritonserver and its python stubs were left running.
    """
    stop_on_signals()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test that starts the real server without the ``triton`` mark."""
    unmarked = [
        item.nodeid for item in items
        if {"triton", "tiny_triton", "tiny_repository"} & set(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("triton") is None
    ]
    if unmarked:
        raise pytest.UsageError("tests using the real tritonserver need @pytest.mark.triton: "
                                + ", ".join(unmarked))


@pytest.fixture(scope="session")
def triton() -> Iterator[LocalTriton]:
    """tritonserver on the full local repository, exported first where missing or stale."""
    assert export_main(["all", "--out", str(REPOSITORY), "--target", "cpu"]) == 0
    with LocalTriton(REPOSITORY) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> TinyRepository:
    """Tiny Gemma as ``author``, tiny Llama as ``chat``, tiny CSM and whisper_asr, exported
    into one repository.

    The CSM tests need Whisper (audio-only turns get transcripts); the author
    and chat tests call their models directly, so the tiny families share one repository.
    """
    gemma = make_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma"))
    llama = make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    csm = make_tiny_csm(tmp_path_factory.mktemp("tiny-csm"))
    repository = tmp_path_factory.mktemp("tiny-repository")
    assert export_main(["author", "--checkpoint", str(gemma), "--out", str(repository)]) == 0
    assert export_main(["chat", "--checkpoint", str(llama), "--out", str(repository)]) == 0
    argv = ["csm", "--checkpoint", str(csm), "--out", str(repository), "--name", TINY_CSM]
    assert export_main(argv) == 0
    assert export_main(["asr", "--out", str(repository)]) == 0
    return TinyRepository(gemma, csm, llama, repository)


@pytest.fixture(scope="session")
def tiny_triton(tiny_repository: TinyRepository) -> Iterator[TinyTriton]:
    """One tritonserver on the tiny repository, for the parity tests."""
    tiny = tiny_repository
    with LocalTriton(tiny.repository) as server:
        yield TinyTriton(tiny.gemma, tiny.csm, tiny.llama, tiny.repository, server)


@pytest.fixture(scope="session")
def fake_triton() -> Iterator[FakeTriton]:
    """The Triton test double serving kokoro, whisper_asr, aligner and author."""
    with FakeTriton() as double:
        yield double


@pytest.fixture(scope="session")
def triton_url(request: pytest.FixtureRequest) -> str:
    """``host:port`` the API tests send Triton calls to: real server, or the double."""
    backend = "fake_triton" if request.config.getoption("fake_triton") else "triton"
    return str(request.getfixturevalue(backend).http_url)


@pytest.fixture(scope="session")
def client(triton_url: str) -> Iterator[TestClient]:
    """The API over ``triton_url``."""
    app = create_app(make_settings(triton_url=triton_url))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def real_client(triton: LocalTriton) -> Iterator[TestClient]:
    """The API over the real tritonserver, for tests that listen to what the models produce."""
    app = create_app(make_settings(triton_url=triton.http_url))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def backend() -> Iterator[Any]:
    """converse_backend imported outside Triton (its Triton module stubbed for the import)."""
    stubbed = "triton_python_backend_utils" not in sys.modules
    if stubbed:
        sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
    path = COMMON / "converse_backend.py"
    spec = importlib.util.spec_from_file_location("converse_backend", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    if stubbed:
        del sys.modules["triton_python_backend_utils"]
