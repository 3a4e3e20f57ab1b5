"""The download cache: downloaded bodies stored once by content hash, and a small record per URL.

Shared safely by threads and processes: every write is atomic (temporary file in the cache, fsync, rename), one
small file per URL means no shared index is ever rewritten, and :meth:`DownloadCache.url_lock` lets a process
that is about to download a URL wait for another process already downloading it (then re-check and reuse its
body) instead of downloading it twice.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ._io import DiskFullError, atomic_write_bytes, blake2b_file, blake2b_hex, default_cache_dir
from ._lock import file_lock
from .errors import LockTimeout

__all__ = ["CacheEntry", "DownloadCache"]

logger = logging.getLogger("ccclip_widgets.fetch")  # one logger for downloads and their cache

_TMP_MAX_AGE = 24 * 3600.0
_LOCK_STRIPES = 3  # hex digits of the URL hash naming its lock file: at most 4,096 lock files


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A URL found in the download cache.

    Attributes
    ----------
    url
        The URL.
    key
        BLAKE2b-128 hex digest of the body.
    path
        The body file.
    size
        Body size in bytes.
    content_type, final_url, image_format, fetched_at
        What the server sent and when (ISO 8601, UTC).
    """

    url: str
    key: str
    path: Path
    size: int
    content_type: str | None = None
    final_url: str | None = None
    image_format: str | None = None
    fetched_at: str | None = None


class DownloadCache:
    """Content-addressed store of downloaded bodies plus a URL -> content-hash map.

    Layout under ``root``: ``objects/<k[:2]>/<k>`` holds a body whose BLAKE2b-128 hex digest is ``k``;
    ``urls/<u[:2]>/<u>.json`` (``u`` = BLAKE2b-128 of the URL) records the URL, its body's key, size, content
    type and final URL; ``tmp/`` holds downloads in progress (same file system, so a finished body is renamed
    into place atomically); ``locks/`` holds the lock files of :meth:`url_lock`. One small file per URL keeps concurrent writers (threads or processes) from ever
    rewriting a shared index. Temporary files older than a day (left by killed processes) are removed when a
    cache is opened.

    Parameters
    ----------
    root
        Cache folder (default: ``downloads`` in the toolkit cache, ``$CCCLIP_CACHE`` or ``~/.cache/ccclip_widgets``).
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir() / "downloads"
        self.objects = self.root / "objects"
        self.urls = self.root / "urls"
        self.tmp = self.root / "tmp"
        self.locks = self.root / "locks"
        for folder in (self.objects, self.urls, self.tmp, self.locks):
            folder.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()

    def __repr__(self) -> str:
        return f"DownloadCache({str(self.root)!r})"

    def _remove_stale_temps(self) -> None:
        cutoff = time.time() - _TMP_MAX_AGE
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.tmp):
                with contextlib.suppress(OSError):
                    if entry.is_file() and entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)

    def body_path(self, key: str) -> Path:
        """Where the body with content hash ``key`` lives (it may not exist)."""
        return self.objects / key[:2] / key

    def _map_path(self, url: str) -> Path:
        digest = blake2b_hex(url)
        return self.urls / digest[:2] / f"{digest}.json"

    def lookup(self, url: str, *, verify: bool = True) -> CacheEntry | None:
        """The cached body of ``url``, or ``None`` when it is not cached (or its copy was corrupt).

        Parameters
        ----------
        url
            The URL exactly as it will be requested.
        verify
            Re-hash the body and compare it with its key (a corrupt copy is deleted and ``None`` returned).

        Returns
        -------
        CacheEntry or None
        """
        entry, _ = self._lookup(url, verify=verify)
        return entry

    def _lookup(self, url: str, *, verify: bool) -> tuple[CacheEntry | None, str | None]:
        """Return (entry, problem): ``problem`` describes a corrupt copy that was discarded."""
        try:
            record = json.loads(self._map_path(url).read_bytes())
        except (OSError, ValueError):  # not cached, or a map file cut short by a crash
            return None, None
        if not isinstance(record, dict) or record.get("url") != url or not isinstance(record.get("key"), str):
            return None, None
        key: str = record["key"]
        path = self.body_path(key)
        try:
            size = path.stat().st_size
        except OSError:
            return None, None  # body deleted (cache pruned by hand, or discarded as corrupt): fetch again
        problem = None
        if size != record.get("size"):
            problem = f"size {size} bytes, expected {record.get('size')}"
        elif verify:
            try:
                actual = blake2b_file(path)
            except OSError as exc:
                return None, f"unreadable ({exc})"
            if actual != key:
                problem = f"content hash {actual}, expected {key}"
        if problem is not None:
            logger.warning(
                "download cache: the cached copy of %s (%s) is corrupt: %s; it is deleted and fetched again",
                url,
                path,
                problem,
            )
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None, problem
        return (
            CacheEntry(
                url=url,
                key=key,
                path=path,
                size=size,
                content_type=record.get("content_type"),
                final_url=record.get("final_url"),
                image_format=record.get("image_format"),
                fetched_at=record.get("fetched_at"),
            ),
            None,
        )

    def new_temp(self) -> tuple[int, Path]:
        """Open a new temporary file in the cache (for a body being downloaded).

        Returns
        -------
        (int, Path)
            An open file descriptor and the file's path.
        """
        fd, name = tempfile.mkstemp(prefix="dl.", suffix=".part", dir=self.tmp)
        return fd, Path(name)

    def commit(
        self,
        url: str,
        temp: Path,
        key: str,
        size: int,
        *,
        content_type: str | None = None,
        final_url: str | None = None,
        image_format: str | None = None,
    ) -> CacheEntry:
        """Move a finished, fsynced temporary body into place and record ``url`` -> ``key``.

        The body is renamed first and the URL record written after it, so a record never points at a body
        that was not there when it was written.

        Parameters
        ----------
        url
            The URL the body was downloaded from.
        temp
            The temporary file from :meth:`new_temp` (consumed).
        key
            BLAKE2b-128 hex digest of the body.
        size
            Body size in bytes.
        content_type, final_url, image_format
            Recorded with the URL.

        Returns
        -------
        CacheEntry
        """
        path = self.body_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(temp, 0o644)
        os.replace(temp, path)  # identical content under the same name: replacing is harmless
        fetched_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record = {
            "url": url,
            "key": key,
            "size": size,
            "content_type": content_type,
            "final_url": final_url,
            "image_format": image_format,
            "fetched_at": fetched_at,
        }
        atomic_write_bytes(self._map_path(url), json.dumps(record, sort_keys=True).encode("utf-8"))
        return CacheEntry(url, key, path, size, content_type, final_url, image_format, fetched_at)

    @contextlib.contextmanager
    def url_lock(self, url: str, *, timeout: float | None = None) -> Iterator[bool]:
        """Hold the inter-process lock for downloading ``url`` (lock, then look in the cache again).

        URLs share one of 4,096 lock files by their hash, so the folder stays small however many URLs pass.
        The lock only saves duplicate downloads (bodies are content-addressed and written atomically, so two
        writers of one URL cannot damage anything): when it stays busy beyond ``timeout`` the block runs anyway.

        Yields
        ------
        bool
            Whether the lock is held.
        """
        path = self.locks / f"{blake2b_hex(url)[:_LOCK_STRIPES]}.lock"
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(
                file_lock(path, timeout=timeout, purpose=f"downloading {url}", on_wait=logger.debug)
            )
            held = True
        except LockTimeout:
            logger.debug("download cache: %s stayed locked; downloading %s without the lock", path, url)
            held = False
        with stack:
            yield held

    def write_chunk(self, fd: int, chunk: bytes | None) -> None:
        """Write a chunk to a temporary body, unbuffered (``None``: fsync); a full disk raises DiskFullError."""
        try:
            if chunk is None:
                os.fsync(fd)
                return
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(
                    exc.errno,
                    f"No space left on the device while downloading into the cache {self.root}; free some "
                    "space or pass another download_cache folder, then run again (finished downloads are kept)",
                ) from exc
            raise
