"""Inter-process file locks for the on-disk caches (embedding store, neighbor index, projection cache, runs).

The locking itself is :class:`filelock.FileLock` (``fcntl.flock`` on POSIX, ``msvcrt`` on Windows): the
operating system releases the lock when the holder exits for any reason, ``SIGKILL`` included, so a crashed
process never leaves a stale lock behind. The lock file stays in place on release (deleting it would let two
processes lock two different files of the same name).

What this module adds is what a user waiting on a lock needs to read: while held, the lock file names its holder
(pid, host, purpose, start time); a process that has to wait logs one message quoting it, and
:class:`~ccclip_widgets.errors.LockTimeout` names it too.

Locks are exclusive and re-entrant per thread (a thread that holds a lock can take it again); different threads
exclude each other like different processes do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import filelock

from .errors import LockTimeout

log = logging.getLogger(__name__)

__all__ = ["LockTimeout", "file_lock", "lock_holder"]


def lock_holder(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What the holder wrote into the lock file (pid, host, purpose, since), or None."""
    try:
        text = Path(path).read_text("utf-8").strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    since = holder.get("since")
    when = time.strftime("%H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    what = f", {holder['purpose']}" if holder.get("purpose") else ""
    return f"process {holder.get('pid')} on {holder.get('host')} (since {when}{what})"


_acquiring = threading.local()  # the purpose of the lock this thread is acquiring (read by _write_holder)


def _write_holder(fd: int) -> None:
    """filelock's ``on_acquired`` hook: name this process in the lock file it now holds."""
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "purpose": getattr(_acquiring, "purpose", ""),
        "since": time.time(),
    }
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)


@contextlib.contextmanager
def file_lock(
    path: str | os.PathLike[str],
    *,
    shared: bool = False,
    timeout: float | None = None,
    purpose: str = "",
    on_wait: Callable[[str], None] | None = None,
    best_effort: bool = False,
) -> Iterator[Path]:
    """Hold an inter-process lock on ``path`` for the duration of the block.

    Parameters
    ----------
    path
        The lock file (created, with its folder, if missing).
    shared
        Accepted for readers; the lock is taken exclusively all the same (readers of one folder then take
        turns, which costs little next to what they read).
    timeout
        Seconds to wait for a busy lock; ``None`` waits as long as it takes, ``0`` does not wait.
    purpose
        What the holder is doing, shown to processes that have to wait (e.g. ``"embedding 4,000 posts"``).
    on_wait
        Called once with the waiting message when the lock is busy (default: a ``logging`` warning, which
        appears on stderr when logging is not configured).
    best_effort
        When the lock file cannot be created (a read-only folder), go on without the lock instead of failing:
        for readers of data that nobody can be writing there.

    Yields
    ------
    Path
        The lock file.

    Raises
    ------
    LockTimeout
        When the lock is still busy after ``timeout`` seconds; the message names the holder.
    """
    del shared  # see the docstring: one kind of lock
    lock_path = Path(path)
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(
            lock_path,
            is_singleton=True,  # one instance per path: re-entrant in the thread that holds it
            preserve_lock_file=True,
            on_acquired=_write_holder,
            poll_interval=0.05,
        )
        _acquiring.purpose = purpose
        acquired = _acquire(lock, lock_path, timeout, on_wait)
    except OSError as exc:
        if not best_effort or isinstance(exc, FileNotFoundError):
            raise
        log.debug("cannot lock %s (%s); reading without a lock", lock_path, exc)
        yield lock_path
        return
    try:
        yield lock_path
    finally:
        if acquired.lock_counter == 1:  # the outermost hold: the file no longer names a holder
            with contextlib.suppress(OSError):
                os.truncate(lock_path, 0)
        lock.release()


def _acquire(
    lock: filelock.FileLock, lock_path: Path, timeout: float | None, on_wait: Callable[[str], None] | None
) -> filelock.FileLock:
    start = time.monotonic()
    try:
        lock.acquire(timeout=0)
        return lock
    except filelock.Timeout:
        pass
    (on_wait or log.warning)(
        f"Waiting for {lock_path}: {_describe(lock_holder(lock_path))} is using it. This process continues "
        "when it is done and then reuses whatever that process finished."
    )
    try:
        lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout - (time.monotonic() - start)))
    except filelock.Timeout:
        waited = time.monotonic() - start
        raise LockTimeout(
            f"{lock_path} is still locked by {_describe(lock_holder(lock_path))} after {waited:.0f} s. Wait for "
            "it to finish (or stop it), then try again; a process that died has already released the lock."
        ) from None
    return lock
