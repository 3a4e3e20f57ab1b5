"""Small I/O helpers shared by the backend: atomic writes, hashing, cache folders.

Every artefact the toolkit writes goes through these helpers so that an interrupted process never leaves a
half-written file where a reader would pick it up: data is written to a temporary file in the same folder,
flushed and fsynced, then renamed over the destination (``os.replace`` is atomic on POSIX and Windows).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "DiskFullError",
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "blake2b_file",
    "blake2b_hex",
    "default_cache_dir",
    "repo_data_dir",
]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Files are created with the permissions a plain ``open()`` would give (mkstemp alone gives 0600).
_FILE_MODE = 0o666 & ~_current_umask()


class DiskFullError(OSError):
    """Raised when a write fails because the disk is full; existing files are left untouched."""


def default_cache_dir() -> Path:
    """Return the toolkit's cache folder (``$CCCLIP_CACHE`` or ``~/.cache/ccclip_widgets``).

    Returns
    -------
    Path
        The folder; it is created if missing.
    """
    root = os.environ.get("CCCLIP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ccclip_widgets"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def repo_data_dir() -> Path:
    """Return the ``data/`` folder that ships the demo set and demo weights.

    ``$CCCLIP_DATA_DIR`` overrides it; otherwise it is the ``data`` folder beside the package (a source
    checkout, installed with ``pip install -e .``).

    Returns
    -------
    Path
        The data folder (it may not exist when the package was installed without the repository).
    """
    env = os.environ.get("CCCLIP_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "data"


def blake2b_hex(data: bytes | str, digest_size: int = 16) -> str:
    """Hex digest of ``data`` with BLAKE2b (``digest_size`` bytes)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.blake2b(data, digest_size=digest_size).hexdigest()


def blake2b_file(path: str | os.PathLike[str], digest_size: int = 16, chunk: int = 1 << 20) -> str:
    """Hex BLAKE2b digest of a file's bytes, read in chunks."""
    h = hashlib.blake2b(digest_size=digest_size)
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _raise_disk_full(exc: OSError, path: Path) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFullError(
            exc.errno,
            f"No space left on the device while writing {path}. The previous version of the file (if any) is "
            "unchanged; free some disk space or point the output to another disk, then run again: finished "
            "work is reused.",
        ) from exc


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename).

    Parameters
    ----------
    path
        Destination file.
    data
        Bytes to write.

    Returns
    -------
    Path
        The destination path.

    Raises
    ------
    DiskFullError
        When the disk is full; the destination keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _raise_disk_full(exc, path)
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` atomically; see :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON atomically; see :func:`atomic_write_bytes`."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a folder under a temporary name and move it into place only when the block succeeds.

    An existing folder at ``path`` is replaced (moved aside, then removed) only after the new one is complete,
    so a reader never sees a half-written folder.

    Parameters
    ----------
    path
        The final folder.

    Yields
    ------
    Path
        The temporary folder to fill.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
