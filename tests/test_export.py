"""Kokoro export: checksum verification, idempotency, configs; local Triton lifecycle;
what makes an entry stale."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devtools.local_triton import LocalTriton, TritonStartError
from export import kokoro, repository
from export.kokoro import KokoroExportOptions, export_kokoro
from export.repository import (
    EXPORT_PACKAGE,
    SOURCE_REPOSITORY,
    ExportOptions,
    Manifest,
    exclusive_repository,
    render_template,
)
from export.vad import export_vad


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("repository")
    assert export_kokoro(KokoroExportOptions(out=out, target="gpu")) is True
    return out


def test_assembled_onnx_matches_shipped_sha256(exported: Path) -> None:
    expected = kokoro._data_file("model.sha256").read_text().split()[0]
    digest = hashlib.sha256((exported / "kokoro_network/1/model.onnx").read_bytes()).hexdigest()
    assert digest == expected


def test_second_export_does_no_work_and_a_touched_output_is_rebuilt(exported: Path) -> None:
    assert export_kokoro(KokoroExportOptions(out=exported, target="gpu")) is False
    config = exported / "kokoro/config.pbtxt"
    config.write_text("corrupted")
    assert not Manifest.load(exported).is_current("kokoro", {})
    assert export_kokoro(KokoroExportOptions(out=exported, target="gpu")) is True
    assert 'platform: "ensemble"' in config.read_text()


def test_gpu_and_cpu_network_configs_share_the_tensor_contract(exported: Path) -> None:
    gpu = (exported / "kokoro_network/config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in gpu and "KIND_GPU" in gpu
    cpu = render_template(
        SOURCE_REPOSITORY / "kokoro_network" / "config.cpu.pbtxt.template",
        network_instances=1, intra_op_threads=0, warmup="",
    )
    assert 'backend: "python"' in cpu

    def tensors(text: str) -> list[str]:
        return [line.strip() for line in text.splitlines() if line.strip().startswith("{ name:")]

    assert tensors(gpu) == tensors(cpu)


def test_checksum_mismatch_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "model.sha256"
    fake.write_text("0" * 64)
    real = kokoro._data_file
    monkeypatch.setattr(
        kokoro, "_data_file", lambda name: fake if name == "model.sha256" else real(name)
    )
    target = tmp_path / "model.onnx"
    with pytest.raises(RuntimeError, match="sha256"):
        kokoro.assemble_onnx(target)
    assert list(tmp_path.iterdir()) == [fake]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.triton
def test_local_triton_stops_without_orphans(exported: Path) -> None:
    export_kokoro(KokoroExportOptions(out=exported, target="cpu"))
    server = LocalTriton(exported).start()
    assert server.is_ready()
    assert server._process is not None
    group = server._process.pid
    server.stop()
    time.sleep(0.5)
    members = [
        int(p) for p in os.listdir("/proc") if p.isdigit() and _alive(int(p))
        and _pgid(int(p)) == group
    ]
    assert members == []


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return -1


@pytest.mark.triton
def test_broken_repository_fails_with_log_tail(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken/config.pbtxt").write_text('backend: "python"\nthis is not pbtxt')
    with pytest.raises(TritonStartError, match="broken"):
        LocalTriton(tmp_path, ready_timeout_s=60).start()


def test_an_export_waits_for_one_already_running_on_the_repository(tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    command = [sys.executable, "-m", "export", "aligner", "--out", str(repository)]
    with exclusive_repository(repository):
        waiting = subprocess.Popen(command)
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                waiting.wait(timeout=5)
            assert not (repository / "manifest.json").exists()
        except BaseException:
            waiting.kill()
            raise
    assert waiting.wait(timeout=120) == 0
    assert Manifest.load(repository).is_current(
        "aligner", Manifest.load(repository).models["aligner"]["inputs"])


@pytest.mark.parametrize("family", ["csm", "author", "chat"])
@pytest.mark.parametrize("checkpoint", ["missing", "sesame/csm-1b", "empty", "file"])
def test_a_checkpoint_that_is_not_a_local_directory_is_refused_before_any_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], family: str, checkpoint: str,
) -> None:
    """A mistyped path or a hub id is an error on the command line, never a download."""
    from export.__main__ import main

    paths = {"missing": tmp_path / "no-such-checkpoint", "sesame/csm-1b": Path("sesame/csm-1b"),
             "empty": tmp_path / "empty", "file": tmp_path / "weights.safetensors"}
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.safetensors").write_bytes(b"")
    status = main([family, "--checkpoint", str(paths[checkpoint]),
                   "--out", str(tmp_path / "repository")])
    assert status == 2
    message = capsys.readouterr().err
    assert "--checkpoint" in message and str(paths[checkpoint]) in message
    assert not (tmp_path / "repository").exists()


@pytest.mark.parametrize("family", ["author", "chat"])
def test_export_all_keeps_a_user_checkpoint_and_single_export_goes_back_to_the_bundled_lm(
    tmp_path: Path, family: str,
) -> None:
    """Every make target runs ``export all``: it must not put the bundled LM back silently."""
    from export.__main__ import FAMILIES, kept_checkpoint
    from export.causal_lm import LMSource

    checkpoint = tmp_path / "my-lm"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    repository = tmp_path / "repository"
    repository.mkdir()
    manifest = Manifest.load(repository)
    _, kind = FAMILIES[family]
    bundled = kind(out=repository)  # type: ignore[call-arg]
    assert kept_checkpoint(bundled, family) == bundled  # nothing exported yet

    manifest.record(family, {"source": LMSource(checkpoint, None, "my-lm").fingerprint()}, [])
    manifest.save()
    kept = kept_checkpoint(bundled, family)
    assert kept.checkpoint == checkpoint  # type: ignore[attr-defined]

    (checkpoint / "config.json").unlink()  # the checkpoint is gone: the bundled LM again
    assert kept_checkpoint(bundled, family) == bundled
    manifest.record(family, {"source": {"directory": str(tmp_path), "gguf_file": "lm.gguf"}}, [])
    manifest.save()
    assert kept_checkpoint(bundled, family) == bundled


def test_an_edit_to_an_entrys_exporter_rebuilds_that_entry_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = ExportOptions(out=tmp_path / "repository", target="cpu")
    assert export_vad(options) is True
    assert export_vad(options) is False
    package = tmp_path / "export"
    shutil.copytree(EXPORT_PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(repository, "EXPORT_PACKAGE", package)
    with (package / "kokoro.py").open("a") as other:
        other.write("# another entry's exporter\n")
    assert export_vad(options) is False
    with (package / "vad.py").open("a") as own:
        own.write("# how silero_vad is built\n")
    assert export_vad(options) is True
    assert export_vad(options) is False
