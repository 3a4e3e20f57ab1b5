"""One stage of the toolkit, run as a separate process that tests/test_reliability.py kills and runs again.

Usage::

    python reliability_worker.py STAGE INPUTS WORK [--kill-at N] [--role first|second]
    python reliability_worker.py --serve     # import once, then fork one process per run (see serve())

STAGE is ``embed`` (embed_posts into a store, then compact it), ``index`` (NeighborIndex.load_or_build),
``projection`` (cached_projection of a UMAP layout), ``finetune`` (fine_tune, resuming from WORK's run folder
when it holds a checkpoint) or ``embed-concurrent`` (embed a subset of posts while another process does the same;
``--role`` decides who goes first). Every stage is written the way a notebook would be: run it again and it
reuses what is finished.

Fault injection: with ``--kill-at N`` the process sends itself SIGKILL at the N-th *I/O event* of the toolkit:
before and after every rename (``os.replace``/``os.rename``), before every ``fsync``, ``unlink``, ``rmdir``,
``mkdir`` and ``rmtree``, and after every lock acquisition, counted only when called from ``ccclip_widgets`` (and
the standard library helpers it calls). A kill before an ``fsync`` first cuts the file being synced to half its
size, as a kill in the middle of writing it would. Between two events the toolkit only writes into files that are
then synced, so these kills reach every on-disk state a kill at an arbitrary instant could leave. Before dying
it prints ``KILLED at event N (<event>)`` on stderr. At the end it writes ``WORK/result-<stage>.json`` with the
number of events and any corruption warnings seen (a kill must never produce one).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

_STDLIB_HELPERS = {
    "os",
    "posixpath",
    "ntpath",
    "genericpath",
    "pathlib",
    "shutil",
    "tempfile",
    "contextlib",
    "io",
    "filelock",  # ccclip_widgets._lock takes its locks through filelock
}
_state = {"events": 0, "kill_at": -1}


def _counted() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("ccclip_widgets"):
            return True
        if module.split(".")[0] not in _STDLIB_HELPERS:
            return False
        frame = frame.f_back
    return False


def _event(name: str, torn_fd: int | None = None) -> None:
    _state["events"] += 1
    if _state["events"] == _state["kill_at"]:
        if torn_fd is not None:  # as if killed halfway through writing the file about to be synced
            size = os.fstat(torn_fd).st_size // 2
            try:
                os.ftruncate(torn_fd, size)
            except OSError:  # opened read-only just to be synced: cut it by its name
                os.truncate(os.readlink(f"/proc/self/fd/{torn_fd}"), size)
            name += " (torn to half its size)"
        sys.stderr.write(f"KILLED at event {_state['events']} ({name})\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _wrap(module: Any, name: str, saved: list[tuple[Any, str, Any]], *, after: bool = False) -> None:
    original = getattr(module, name)
    saved.append((module, name, original))

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counted = _counted()
        if counted:
            target = args[0] if args else ""
            torn = None
            if name == "fsync" and isinstance(target, int):
                torn = target
                if os.path.isdir("/proc/self/fd"):
                    target = os.readlink(f"/proc/self/fd/{target}")
            _event(f"before {name} {target}", torn)
        out = original(*args, **kwargs)
        if counted and after:
            _event(f"after {name} {args[0] if args else ''}")
        return out

    setattr(module, name, wrapper)


def install_fault_points(kill_at: int) -> Callable[[], None]:
    """Count the toolkit's I/O events and SIGKILL this process at event ``kill_at`` (-1: only count).

    Returns a function that removes the hooks again (for counting inside the test process).
    """
    _state["kill_at"] = kill_at
    _state["events"] = 0
    saved: list[tuple[Any, str, Any]] = []
    _wrap(os, "replace", saved, after=True)
    _wrap(os, "rename", saved, after=True)
    for name in ("fsync", "unlink", "remove", "rmdir", "mkdir"):
        _wrap(os, name, saved)
    _wrap(shutil, "rmtree", saved)
    if sys.platform != "win32":
        import fcntl

        original = fcntl.flock
        saved.append((fcntl, "flock", original))

        def flock(fd: Any, op: int) -> Any:
            out = original(fd, op)
            if not op & fcntl.LOCK_UN and _counted():
                _event("after lock")
            return out

        fcntl.flock = flock

    def remove() -> None:
        for module, name, original in reversed(saved):
            setattr(module, name, original)

    return remove


def run_stage(stage: str, inputs: Path, work: Path, role: str = "first") -> dict[str, Any]:
    """Run one stage (hooks already installed) and write ``WORK/result-<stage>.json``."""
    work.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if stage == "embed":
            out = stage_embed(inputs, work)
        elif stage == "embed-concurrent":
            out = stage_embed_concurrent(inputs, work, role)
        elif stage == "index":
            out = stage_index(inputs, work)
        elif stage == "projection":
            out = stage_projection(inputs, work)
        elif stage == "finetune":
            out = stage_finetune(inputs, work)
        else:
            raise SystemExit(f"unknown stage {stage!r}")
    corruption = [
        f"{w.category.__name__}: {w.message}" for w in caught if "Corruption" in w.category.__name__
    ]
    out.update(events=_state["events"], corruption_warnings=corruption)
    name = f"result-{stage}{'-' + role if stage == 'embed-concurrent' else ''}.json"
    (work / name).write_text(json.dumps(out, indent=1))
    return out


# ------------------------------------------------------------------------------------------------- stages
def _model(inputs: Path) -> Any:
    import torch

    from ccclip_widgets.models import load_model

    torch.set_num_threads(1)  # the same arithmetic in every process, the test process included
    return load_model(inputs / "model", device="cpu")


def stage_embed(inputs: Path, work: Path) -> dict[str, Any]:
    from ccclip_widgets.embed import embed_posts
    from ccclip_widgets.posts import read_posts
    from ccclip_widgets.store import EmbeddingStore

    posts = read_posts(inputs / "posts.csv", image_root=inputs / "imgs")
    model = _model(inputs)
    emb = embed_posts(
        posts, model, store=work / "store", part_size=8, batch_size=8, num_workers=0, show_progress=False
    )
    store = EmbeddingStore.open(work / "store", model.fingerprint, model.embed_dim)
    store.compact("images")
    store.compact("texts")
    return {"stats": {k: v for k, v in emb.stats.items() if k != "seconds"}, "posts": len(emb)}


def stage_embed_concurrent(inputs: Path, work: Path, role: str) -> dict[str, Any]:
    """Two of these run at once on overlapping posts; ``first`` pauses inside the store lock until told."""
    import logging

    import ccclip_widgets.store as S
    from ccclip_widgets.embed import embed_posts
    from ccclip_widgets.posts import read_posts

    sync = work / "sync"
    posts = read_posts(inputs / f"posts-{role}.csv", image_root=inputs / "imgs")
    model = _model(inputs)

    def wait_for(path: Path, limit: float = 240.0) -> None:
        deadline = time.monotonic() + limit
        while not path.exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"{role}: gave up waiting for {path}")
            time.sleep(0.05)

    if role == "first":
        original = S.EmbeddingStore.write_part
        done = {"n": 0}

        def write_part(self: Any, kind: str, keys: list[str], vectors: Any, **kw: Any) -> Any:
            out = original(self, kind, keys, vectors, **kw)
            if kind == "images":
                done["n"] += 1
                if done["n"] == 1:  # inside the lock, one part written: let the others queue up
                    (sync / "first_has_lock").touch()
                    wait_for(sync / "release")
            return out

        S.EmbeddingStore.write_part = write_part  # type: ignore[method-assign]
    else:

        class Signal(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "Waiting for" in record.getMessage():
                    (sync / f"{role}_waiting").touch()

        logging.getLogger("ccclip_widgets._lock").addHandler(Signal())
        wait_for(sync / "first_has_lock")
    emb = embed_posts(
        posts, model, store=work / "store", part_size=8, batch_size=8, num_workers=0, show_progress=False
    )
    return {
        "stats": {k: v for k, v in emb.stats.items() if k != "seconds"},
        "posts": len(emb),
        "pid": os.getpid(),
    }


def stage_index(inputs: Path, work: Path) -> dict[str, Any]:
    import numpy as np

    from ccclip_widgets.neighbors import NeighborIndex

    data = np.load(inputs / "vectors.npz")
    ids = [f"p{i:04d}" for i in range(len(data["image"]))]
    index = NeighborIndex.load_or_build(
        work / "index",
        ids,
        data["image"],
        data["text"],
        image_keys=[f"img{i // 2}" for i in range(len(ids))],
        fingerprint="vectors-1",
        show_progress=False,
    )
    return {"n": index.n}


def stage_projection(inputs: Path, work: Path) -> dict[str, Any]:
    import numpy as np

    from ccclip_widgets.projection import cached_projection, fit_umap

    x = np.load(inputs / "vectors.npz")["image"]
    params = {"kind": "image", "n_neighbors": 10, "seed": 0, "n_epochs": 40}
    xy = cached_projection(
        work / "proj",
        "vectors-1",
        params,
        lambda: fit_umap(x, n_neighbors=10, seed=0, n_epochs=40, show_progress=False),
    )
    return {"shape": list(xy.shape)}


FINETUNE = {
    "epochs": 3,
    "batch_size": 8,
    "lr": 1e-3,
    "warmup_steps": 1,
    "checkpoint_every_steps": 2,
    "keep_checkpoints": 2,
    "eval_at_start": False,
    "show_progress": False,
    "num_workers": 0,
}


def stage_finetune(inputs: Path, work: Path) -> dict[str, Any]:
    from ccclip_widgets.posts import read_posts
    from ccclip_widgets.train import FineTuneConfig, fine_tune
    from ccclip_widgets.train.checkpoint import find_checkpoint, read_run_file

    run = work / "run"
    info = read_run_file(run) if (run / "run.json").is_file() else None
    if info is not None and info.get("status") == "finished" and (run / "final").is_dir():
        return {"steps": info["step"], "reused": True}
    posts = read_posts(inputs / "posts-train.csv", image_root=inputs / "imgs")
    clip = _model(inputs)
    resume = run if find_checkpoint(run) is not None else None
    result = fine_tune(clip, posts, FineTuneConfig(**FINETUNE), out_dir=run, resume_from=resume)
    return {"steps": result.steps, "reused": False, "resumed": resume is not None}


def _child(request: dict[str, Any]) -> None:
    """In a forked child: send output to the request's log, install the fault points, run, exit."""
    code = 0
    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        install_fault_points(int(request.get("kill_at", -1)))
        run_stage(
            request["stage"], Path(request["inputs"]), Path(request["work"]), request.get("role", "first")
        )
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> int:
    """Import everything once, then fork one child per run (JSON requests on stdin, one reply line each).

    ``{"op": "start", "stage", "inputs", "work", "kill_at", "role", "log"}`` forks a run and replies its pid;
    ``{"op": "wait", "pid", "timeout"}`` replies its exit code (``-9`` when it was SIGKILLed), or ``"timeout"``
    after SIGKILLing a run that is still going after ``timeout`` seconds. Each run is a process of its own, killed
    as such; forking only saves it the seconds of importing torch and open_clip (as DataLoader workers do).
    """
    import faiss  # noqa: F401
    import open_clip  # noqa: F401
    import polars  # noqa: F401
    import torch  # noqa: F401
    import umap  # noqa: F401

    import ccclip_widgets.embed
    import ccclip_widgets.neighbors
    import ccclip_widgets.projection
    import ccclip_widgets.train  # noqa: F401

    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "start":
            pid = os.fork()
            if pid == 0:
                _child(request)
            reply: dict[str, Any] = {"pid": pid}
        else:
            pid, deadline = int(request["pid"]), time.monotonic() + float(request.get("timeout", 300))
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    reply = {"returncode": os.waitstatus_to_exitcode(status)}
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    reply = {"returncode": "timeout"}
                    break
                time.sleep(0.02)
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


def main() -> int:
    if sys.argv[1:] == ["--serve"]:
        return serve()
    stage, inputs, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    kill_at = int(sys.argv[sys.argv.index("--kill-at") + 1]) if "--kill-at" in sys.argv else -1
    role = sys.argv[sys.argv.index("--role") + 1] if "--role" in sys.argv else "first"
    install_fault_points(kill_at)
    run_stage(stage, inputs, work, role)
    return 0


if __name__ == "__main__":
    sys.exit(main())
