"""The model farmesh_ws ships: SmolLM2-135M-Instruct, converted once into FARMESH_HOME.

Preparation is idempotent and safe across processes: it runs under an exclusive file lock,
converts into a temporary folder beside the target and renames it into place, and records
a marker (GGUF sha256, size, mtime, converter version) as the last file written. A folder
with a current marker is reused; only when the GGUF's size or mtime changed is the file
hashed again to decide.
"""

import fcntl
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from farmesh_ws.models.errors import ModelPreparationError
from farmesh_ws.models.gguf_source import GGUFSource, locate_bundled_gguf, sha256_of, verify_source
from farmesh_ws.models.hf_folder import FOLDER_FILES, write_hf_folder
from farmesh_ws.models.names import BUNDLED_MODEL_ID

logger = logging.getLogger(__name__)

CONVERTER_VERSION = "2"
MARKER_FILE = "farmesh-conversion.json"


def prepare_bundled_model(home: Path, *, progress: bool = True) -> Path:
    """Make sure `home/models/SmolLM2-135M-Instruct` holds the converted model; return it."""
    folder = Path(home) / "models" / BUNDLED_MODEL_ID
    return prepare_model_folder(locate_bundled_gguf(), folder, progress=progress)


def prepare_model_folder(source: GGUFSource, folder: Path, *, progress: bool = True) -> Path:
    """Convert `source` into `folder` unless a current conversion of it is already there."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(folder.parent / f".{folder.name}.lock"):
        if _is_current(folder, source):
            logger.debug("model folder %s is up to date", folder)
            return folder
        _remove_leftovers(folder)
        started = time.monotonic()
        logger.info("converting %s into %s", source.path, folder)
        sha256 = verify_source(source)
        stat = source.path.stat()
        staging = _make_sibling_dir(folder, "partial")
        try:
            write_hf_folder(source.path, staging, progress=progress)
            _apply_umask_to_files(staging)
            _write_marker(
                staging,
                {
                    "converter_version": CONVERTER_VERSION,
                    "gguf_sha256": sha256,
                    "gguf_size": stat.st_size,
                    "gguf_mtime_ns": stat.st_mtime_ns,
                    "gguf_path": str(source.path),
                },
            )
            _move_into_place(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("converted model into %s in %.1f s", folder, time.monotonic() - started)
        return folder


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` so two processes never convert at once."""
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The conversion marker of `folder`, or None if absent or unreadable."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _write_marker(folder: Path, marker: dict[str, Any]) -> None:
    """Write the marker atomically, so a reader never sees half of it."""
    temporary = folder / f".{MARKER_FILE}.tmp"
    temporary.write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, folder / MARKER_FILE)


def _is_current(folder: Path, source: GGUFSource) -> bool:
    """Whether `folder` is a complete conversion of `source` by this converter version."""
    marker = read_marker(folder)
    if marker is None or marker.get("converter_version") != CONVERTER_VERSION:
        return False
    if not all((folder / name).is_file() for name in FOLDER_FILES):
        return False
    if not source.path.is_file():
        raise ModelPreparationError(f"GGUF file not found: {source.path}")
    stat = source.path.stat()
    if marker.get("gguf_size") == stat.st_size and marker.get("gguf_mtime_ns") == stat.st_mtime_ns:
        return source.expected_sha256 in (None, marker.get("gguf_sha256"))
    if stat.st_size != marker.get("gguf_size"):
        return False
    sha256 = sha256_of(source.path)
    if sha256 != marker.get("gguf_sha256"):
        return False
    logger.info("GGUF %s was touched but is unchanged; keeping %s", source.path, folder)
    _write_marker(folder, {**marker, "gguf_mtime_ns": stat.st_mtime_ns})
    return True


def _remove_leftovers(folder: Path) -> None:
    """Delete staging folders that a crashed conversion left beside `folder`."""
    for pattern in (f".{folder.name}.partial-*", f".{folder.name}.stale-*"):
        for leftover in folder.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _make_sibling_dir(folder: Path, role: str) -> Path:
    """A new hidden directory beside `folder`, with umask-respecting permissions.

    `tempfile.mkdtemp` would make it 0700, which would leave the final model folder
    unreadable to other users; the caller holds the lock, so the name cannot collide.
    """
    path = folder.parent / f".{folder.name}.{role}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    return path


def _apply_umask_to_files(folder: Path) -> None:
    """Give every file the mode a plain `open` would (some writers create files 0600)."""
    file_mode = folder.stat().st_mode & 0o666
    for child in folder.iterdir():
        child.chmod(file_mode)


def _move_into_place(staging: Path, folder: Path) -> None:
    """Rename `staging` to `folder`, first moving any outdated `folder` out of the way."""
    if folder.exists():
        stale = _make_sibling_dir(folder, "stale")
        os.replace(folder, stale / folder.name)
        os.replace(staging, folder)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(staging, folder)
