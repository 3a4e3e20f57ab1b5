"""Inter-process file locks for the on-disk caches (embedding store, neighbor index, projection cache, runs).

A lock is a small file next to the data it guards, locked with ``fcntl.flock`` on POSIX (shared or exclusive)
or ``msvcrt.locking`` on Windows (always exclusive there). The operating system releases the lock when the holder
exits for any reason, ``SIGKILL`` included, so a crashed process never leaves a stale lock behind and there is
nothing to clean up by hand. The lock file itself stays (deleting it would let two processes lock two different
files of the same name); while held exclusively it names its holder (pid, host, purpose, start time), which a
waiting process quotes in its message.

Locks are re-entrant per thread: a thread that holds a lock can take it again (an exclusive holder may also ask
for a shared lock); asking for an exclusive lock while holding only a shared one is refused, since two threads
doing that at once would deadlock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import LockTimeout

log = logging.getLogger(__name__)

__all__ = ["LockTimeout", "file_lock", "lock_holder"]


_registry_guard = threading.Lock()
#: (lock path, thread id) -> [mode, depth]; mode is "ex" or "sh".
_held: dict[tuple[str, int], list[Any]] = {}


if sys.platform == "win32":  # pragma: no cover - exercised only on Windows
    import msvcrt

    def _try_lock(f: IO[bytes], shared: bool) -> bool:
        f.seek(0)
        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(f: IO[bytes]) -> None:
        f.seek(0)
        with contextlib.suppress(OSError):
            msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(f: IO[bytes], shared: bool) -> bool:
        try:
            fcntl.flock(f.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(f: IO[bytes]) -> None:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def lock_holder(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What an exclusive holder wrote into the lock file (pid, host, purpose, since), or None."""
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
        A shared (reader) lock: many holders at once, none while someone holds it exclusively.
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
    RuntimeError
        When this thread holds the lock shared and asks for it exclusively.
    """
    lock_path = Path(path)
    key = (os.path.abspath(lock_path), threading.get_ident())
    mode = "sh" if shared else "ex"
    with _registry_guard:
        entry = _held.get(key)
        if entry is not None:
            if entry[0] == "sh" and mode == "ex":
                raise RuntimeError(
                    f"This thread holds {lock_path} as a shared lock and asks for it exclusively; release it first"
                )
            entry[1] += 1
    if entry is not None:
        try:
            yield lock_path
        finally:
            with _registry_guard:
                entry[1] -= 1
        return

    f: IO[bytes] | None = None
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock_path, "a+b")  # closed in the finally below
    except OSError as exc:
        if not best_effort or isinstance(exc, FileNotFoundError):
            raise
        log.debug("cannot create lock file %s (%s); reading without a lock", lock_path, exc)
    if f is None:
        yield lock_path
        return
    try:
        start = time.monotonic()
        delay = 0.02
        warned = False
        while not _try_lock(f, shared):
            waited = time.monotonic() - start
            holder = lock_holder(lock_path)
            if timeout is not None and waited >= timeout:
                raise LockTimeout(
                    f"{lock_path} is still locked by {_describe(holder)} after {waited:.0f} s. Wait for it to "
                    "finish (or stop it), then try again; a process that died has already released the lock."
                )
            if not warned:
                msg = (
                    f"Waiting for {lock_path}: {_describe(holder)} is using it. This process continues when it "
                    "is done and then reuses whatever that process finished."
                )
                (on_wait or log.warning)(msg)
                warned = True
            time.sleep(delay if timeout is None else min(delay, max(0.0, timeout - waited)))
            delay = min(0.5, delay * 1.5)
        if not shared:
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "purpose": purpose,
                "since": time.time(),
            }
            with contextlib.suppress(OSError):
                f.seek(0)
                f.truncate()
                f.write(json.dumps(info).encode("utf-8"))
                f.flush()
        with _registry_guard:
            _held[key] = [mode, 1]
        try:
            yield lock_path
        finally:
            with _registry_guard:
                _held.pop(key, None)
            if not shared:
                with contextlib.suppress(OSError):
                    f.seek(0)
                    f.truncate()
                    f.flush()
            _unlock(f)
    finally:
        f.close()
