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
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import CacheCorruptionWarning, DiskFullError

log = logging.getLogger(__name__)

__all__ = [
    "CacheCorruptionWarning",
    "DiskFullError",
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "blake2b_file",
    "blake2b_hex",
    "check_seal",
    "clean_stale_temps",
    "default_cache_dir",
    "folder_checksum_problem",
    "is_disk_full",
    "raise_if_disk_full",
    "record_file_checksums",
    "repo_data_dir",
    "seal",
]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Files are created with the permissions a plain ``open()`` would give (mkstemp alone gives 0600).
_FILE_MODE = 0o666 & ~_current_umask()


#: Temporary names made by this module: ``.<name>.<random>.tmp`` (files and folders) and ``.<name>.<hex>.old``
#: (a folder moved aside by :func:`atomic_dir` just before its replacement is renamed into place).
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<rand>[A-Za-z0-9_]+)\.(?P<kind>tmp|old)$")


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


def source_checkout() -> Path | None:
    """The repository folder when the package runs from a source checkout (editable install), else ``None``."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "tools").is_dir() else None


def repo_data_dir() -> Path:
    """Return the ``data/`` folder that ships the demo set and demo weights.

    ``$CCCLIP_DATA_DIR`` overrides it; otherwise it is the ``data`` folder of a source checkout (``pip install
    -e .``), else the copy installed with the package (``ccclip_widgets/data``: a plain ``pip install .`` ships
    the demo posts, thumbnails and weights as package data).

    Returns
    -------
    Path
        The data folder (it may not exist when the package was installed without its data).
    """
    env = os.environ.get("CCCLIP_DATA_DIR")
    if env:
        return Path(env)
    checkout = source_checkout()
    if checkout is not None and (checkout / "data").is_dir():
        return checkout / "data"
    return Path(__file__).resolve().parent / "data"


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


#: Key under which :func:`seal` stores a JSON document's own checksum.
SEAL_KEY = "json_blake2b"


def _canonical(obj: dict[str, Any]) -> str:
    body = {k: v for k, v in obj.items() if k != SEAL_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def seal(obj: dict[str, Any]) -> dict[str, Any]:
    """Return ``obj`` with its own BLAKE2b checksum added under ``"json_blake2b"``.

    The checksum covers the canonical JSON of every other key (sorted keys, no whitespace), so a document
    whose values were altered, even to other valid JSON, is caught by :func:`check_seal`.
    """
    out = {k: v for k, v in obj.items() if k != SEAL_KEY}
    out[SEAL_KEY] = blake2b_hex(_canonical(json.loads(json.dumps(out, default=str))))
    return out


def check_seal(obj: Any, path: str | os.PathLike[str]) -> str | None:
    """Why the sealed JSON document ``obj`` read from ``path`` is not intact, or None when it is.

    A document without a seal (written by an older version) is accepted.
    """
    if not isinstance(obj, dict):
        return f"{path} does not hold a JSON object"
    if SEAL_KEY not in obj:
        return None
    if obj[SEAL_KEY] != blake2b_hex(_canonical(obj)):
        return f"{path} was altered after it was written (its {SEAL_KEY} does not match its content)"
    return None


#: Key of the ``{file name: BLAKE2b}`` table that :func:`record_file_checksums` adds to a folder's JSON.
FILES_KEY = "files_blake2b"


def record_file_checksums(folder: str | os.PathLike[str], meta_name: str) -> dict[str, Any]:
    """Add the checksum of every other file in ``folder`` to its JSON ``meta_name``, and seal that JSON.

    Meant for a folder that is still being built under a temporary name (see :func:`atomic_dir`): the JSON is
    rewritten in place.

    Parameters
    ----------
    folder
        The folder (only its top-level files are covered; a subfolder carries its own JSON).
    meta_name
        The JSON file that describes the folder (it must exist).

    Returns
    -------
    dict
        The sealed JSON written.
    """
    root = Path(folder)
    meta_path = root / meta_name
    meta = json.loads(meta_path.read_text("utf-8"))
    files = {
        child.name: blake2b_file(child)
        for child in sorted(root.iterdir())
        if child.is_file() and child.name != meta_name and not child.name.startswith(".")
    }
    meta[FILES_KEY] = files
    sealed = seal(meta)
    meta_path.write_text(json.dumps(sealed, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return sealed


def read_sealed_json(path: str | os.PathLike[str]) -> tuple[dict[str, Any], str | None]:
    """Read a JSON written with :func:`seal`; return it and what is wrong with it (None when it is intact).

    Parameters
    ----------
    path
        The JSON file.

    Returns
    -------
    (meta, problem)
        ``meta`` is ``{}`` when the file is missing or unreadable; ``problem`` names the file and the damage.
    """
    path = Path(path)
    try:
        meta = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return {}, f"{path} is missing"
    except (OSError, ValueError) as exc:
        return {}, f"{path} is unreadable ({exc})"
    return meta, check_seal(meta, path)


def folder_checksum_problem(
    folder: str | os.PathLike[str], meta_name: str, required: Collection[str] = ()
) -> str | None:
    """What is wrong with a folder described by a sealed JSON with checksums, or None when it is intact.

    Parameters
    ----------
    folder
        The folder.
    meta_name
        Its JSON (as written by :func:`record_file_checksums`). A JSON without checksums (written by an older
        version) is accepted as it is: there is nothing to check it against.
    required
        Files that must be listed in the JSON (when it lists checksums at all).

    Returns
    -------
    str or None
        A sentence naming the damaged file and the damage.
    """
    root = Path(folder)
    meta_path = root / meta_name
    meta, problem = read_sealed_json(meta_path)
    if problem is not None:
        return problem
    files = meta.get(FILES_KEY)
    if files is None:
        return None
    if not isinstance(files, dict):
        return f"{meta_path} has a malformed {FILES_KEY}"
    for name in required:
        if name not in files:
            return f"{root / name} is not covered by the checksums in {meta_path}"
    for name, digest in files.items():
        path = root / name
        if not path.is_file():
            return f"{path} is missing"
        if blake2b_file(path) != digest:
            return f"{path} is damaged (checksum mismatch: truncated or altered after it was written)"
    return None


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` reports a full disk or an exhausted quota.

    ``OSError`` carries ``errno``; libraries that write from C or Rust (FAISS, safetensors, Arrow) raise their own
    exception types whose message holds the system's text, so that is checked too.
    """
    if isinstance(exc, DiskFullError):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return any(
        s in text for s in ("No space left on device", "Disk quota exceeded", "os error 28", "errno 28")
    )


def raise_if_disk_full(exc: BaseException, path: str | os.PathLike[str], what_to_do: str = "") -> None:
    """Raise :class:`DiskFullError` (chained to ``exc``) when ``exc`` means the disk is full; else return.

    Parameters
    ----------
    exc
        The exception a write raised.
    path
        The file or folder being written (named in the message).
    what_to_do
        Extra advice appended to the message.
    """
    if isinstance(exc, DiskFullError):
        raise exc
    if not is_disk_full(exc):
        return
    code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.ENOSPC
    raise DiskFullError(
        code,
        f"No space left on the device while writing {path}. The previous version of the file (if any) is "
        "unchanged and nothing half-written was left behind; free some disk space or point the output to "
        "another disk, then run again: finished work is reused." + (f" {what_to_do}" if what_to_do else ""),
    ) from exc


def _raise_disk_full(exc: OSError, path: Path) -> None:
    raise_if_disk_full(exc, path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Open a temporary file next to ``path`` for writing; on success fsync it and rename it onto ``path``.

    Readers see the old file or the complete new one, never a partial write; on an error (or an
    interruption) the temporary file is removed and ``path`` is untouched.

    Raises
    ------
    DiskFullError
        When the disk is full; the destination keeps its previous content.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        _raise_disk_full(exc, path)
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
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
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


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
    so a reader never sees a half-written folder. A process killed between the two renames leaves the previous
    version as ``.<name>.<hex>.old``; :func:`clean_stale_temps` puts it back.

    Parameters
    ----------
    path
        The final folder.

    Yields
    ------
    Path
        The temporary folder to fill.

    Raises
    ------
    DiskFullError
        When the disk fills up while the block writes; the previous folder (if any) is unchanged.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise_if_disk_full(exc, path)
        raise
    try:
        yield tmp
        for child in sorted(tmp.rglob("*")):  # the data reaches the disk before the rename makes it visible
            if child.is_file() and not child.is_symlink():
                with open(child, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_disk_full(exc, path)
        raise


def clean_stale_temps(folder: str | os.PathLike[str], only: Collection[str] | None = None) -> list[Path]:
    """Remove what killed writers left in ``folder``: temporary files and folders, folders moved aside.

    Only call it while holding the lock that every writer of ``folder`` holds (so no temporary name belongs to
    a write still in progress). A ``.<name>.<hex>.old`` folder whose ``<name>`` no longer exists is the previous
    complete version of a folder whose replacement was interrupted between two renames: it is renamed back.

    Parameters
    ----------
    folder
        The folder to tidy (missing: nothing happens).
    only
        Restrict it to the temporary names of these entries (when other entries of the folder are guarded by
        other locks).

    Returns
    -------
    list of Path
        The entries removed or restored.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    done: list[Path] = []
    for entry in sorted(root.iterdir()):
        m = _TEMP_RE.match(entry.name)
        if m is None or (only is not None and m.group("name") not in only):
            continue
        target = root / m.group("name")
        if m.group("kind") == "old" and entry.is_dir() and not target.exists():
            os.replace(entry, target)
            log.warning("Restored %s from %s (its replacement was interrupted)", target, entry.name)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        done.append(entry)
    return done
