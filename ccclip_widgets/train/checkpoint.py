"""Training checkpoints on disk: layout, atomic writes, RNG capture, loading with ``weights_only=True``.

Layout of an output folder::

    OUT/
      run.json                 status, step, latest/best/final pointers, config (rewritten atomically)
      checkpoint-0000200/      resumable: the model (or LoRA adapters) + trainer_state.pt
      checkpoint-0000400/      ...the last ``keep_checkpoints`` are kept
      best/                    the best weights by the early-stopping metric (model or adapters)
      final/                   the finished model: loads with load_model(OUT/final) and plain open_clip

A full-model folder is what :func:`~ccclip_widgets.models.save_checkpoint` writes
(``open_clip_model.safetensors``, ``open_clip_config.json``, ``ccclip.json``); a LoRA folder holds
``adapter_model.safetensors`` + ``ccclip_adapter.json`` (see :mod:`.lora`). ``trainer_state.pt`` holds only
tensors, dicts, lists, numbers and strings, and is read back with ``torch.load(..., weights_only=True)``:
nothing is ever unpickled. Every folder is built under a temporary name and renamed into place.

Integrity: the folder's JSON (``ccclip.json`` or ``ccclip_adapter.json``) lists the BLAKE2b checksum of every
other file (weights, config, trainer state) and carries its own checksum. Loading verifies them: a checkpoint
named explicitly that fails is refused with :class:`~ccclip_widgets.models.CheckpointIntegrityError` (naming the
file and the previous good checkpoint); resuming from a run folder skips a damaged newest checkpoint with a
warning, sets it aside as ``checkpoint-N.corrupt`` and resumes from the previous good one.

Concurrency: a run folder is locked (``run.lock``) by the process training into it; a second one is refused at
once. Holding that lock, the trainer removes temporary folders that a killed run left behind and puts back a
``best/`` or ``final/`` whose replacement was interrupted between its two renames.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_dir, atomic_write_json, clean_stale_temps, record_file_checksums
from .._lock import LockTimeout, file_lock
from ..errors import CheckpointCorruptionWarning, RunInUseError

__all__ = [
    "CHECKPOINT_PREFIX",
    "RUN_FILE",
    "TRAINER_STATE",
    "CheckpointCorruptionWarning",
    "capture_rng",
    "checkpoint_name",
    "find_checkpoint",
    "list_checkpoints",
    "load_trainer_state",
    "prune_checkpoints",
    "resolve_resume",
    "restore_rng",
    "run_lock",
    "verify_checkpoint",
    "write_folder",
    "write_run_file",
]

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.pt"
RUN_FILE = "run.json"
RUN_LOCK = "run.lock"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint after optimizer step ``step``."""
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete ``checkpoint-N`` folders of a run, oldest first (temporary folders are never listed)."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = []
    for child in run.iterdir():
        m = _CKPT_RE.match(child.name)
        if m and child.is_dir() and (child / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | os.PathLike[str]) -> Path | None:
    """The checkpoint to resume from: ``path`` itself if it is one, else the newest one inside it.

    Parameters
    ----------
    path
        A ``checkpoint-N`` folder or a run's output folder.

    Returns
    -------
    Path or None
        None when ``path`` holds no checkpoint.
    """
    p = Path(path)
    if (p / TRAINER_STATE).is_file():
        return p
    found = list_checkpoints(p)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | os.PathLike[str], keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; returns the deleted folders."""
    found = list_checkpoints(run_dir)
    doomed = found[:-keep] if keep > 0 else found
    for p in doomed:
        # Renamed to a temporary name first: a process killed while deleting leaves no half-deleted checkpoint
        # under a checkpoint's name, only a temporary folder that the next run removes.
        trash = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            os.replace(p, trash)
        except OSError:
            trash = p
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


# ----------------------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as weights_only-safe values."""
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 - the legacy global state
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    py = state["python"]
    random.setstate((int(py[0]), tuple(int(x) for x in py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state(  # noqa: NPY002 - the legacy global state
        (
            npst["kind"],
            npst["keys"].numpy().astype(np.uint32),
            int(npst["pos"]),
            int(npst["has_gauss"]),
            float(npst["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


# ----------------------------------------------------------------------------------------------------- I/O
def write_folder(
    folder: str | os.PathLike[str],
    write_model: Any,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Build a checkpoint folder atomically.

    Parameters
    ----------
    folder
        Final path (replaced if it exists, only once the new one is complete).
    write_model
        Callable ``write_model(tmp_folder)`` that writes the model or adapter files into the temporary folder.
    trainer_state
        When given, saved as ``trainer_state.pt`` beside the model.

    Returns
    -------
    Path
    """
    from ..models import CHECKPOINT_META
    from .lora import ADAPTER_META

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        write_model(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        meta = next((m for m in (CHECKPOINT_META, ADAPTER_META) if (tmp / m).is_file()), None)
        if meta is not None:  # the JSON now covers the trainer state too
            record_file_checksums(tmp, meta)
    return folder


def _meta_name(folder: Path) -> str | None:
    from ..models import CHECKPOINT_META
    from .lora import ADAPTER_META

    return next((m for m in (CHECKPOINT_META, ADAPTER_META) if (folder / m).is_file()), None)


def verify_checkpoint(folder: str | os.PathLike[str]) -> None:
    """Check every file of a checkpoint folder against the checksums in its JSON.

    Parameters
    ----------
    folder
        A ``checkpoint-N``, ``best`` or ``final`` folder.

    Raises
    ------
    ccclip_widgets.models.CheckpointIntegrityError
        A file is missing, truncated or altered (the message names it), or the folder has no JSON.
    """
    from ..models import WEIGHTS_FILE, CheckpointIntegrityError, verify_checkpoint_folder
    from .lora import ADAPTER_META, ADAPTER_WEIGHTS

    folder = Path(folder)
    meta = _meta_name(folder)
    if meta is None:
        raise CheckpointIntegrityError(
            f"Checkpoint {folder} cannot be used: it holds neither ccclip.json nor {ADAPTER_META}."
        )
    required = [ADAPTER_WEIGHTS if meta == ADAPTER_META else WEIGHTS_FILE]
    if (folder / TRAINER_STATE).exists():
        required.append(TRAINER_STATE)
    verify_checkpoint_folder(folder, meta, tuple(required))


def _step_of(folder: Path) -> int:
    m = _CKPT_RE.match(folder.name)
    return int(m.group(1)) if m else -1


def _problem(folder: Path) -> str | None:
    from ..models import CheckpointIntegrityError

    try:
        verify_checkpoint(folder)
    except CheckpointIntegrityError as exc:
        return str(exc)
    except OSError as exc:  # vanished or unreadable while checking
        return f"Checkpoint {folder} cannot be read: {exc}"
    return None


def resolve_resume(path: str | os.PathLike[str], *, set_aside: bool = True) -> Path | None:
    """The verified checkpoint to resume from.

    Parameters
    ----------
    path
        A ``checkpoint-N`` folder (used as it is, or refused when damaged) or a run's output folder (its newest
        intact checkpoint: damaged newer ones are skipped with a :class:`CheckpointCorruptionWarning`).
    set_aside
        Rename a damaged checkpoint of a run folder to ``checkpoint-N.corrupt`` so that it is never picked again
        (only the process holding the run's lock should do this).

    Returns
    -------
    Path or None
        None when ``path`` holds no checkpoint at all.

    Raises
    ------
    ccclip_widgets.models.CheckpointIntegrityError
        An explicitly named checkpoint is damaged (the message names the file and the previous good checkpoint),
        or every checkpoint of the run folder is.
    """
    from ..models import CheckpointIntegrityError

    p = Path(path)
    if (p / TRAINER_STATE).is_file() or _CKPT_RE.match(p.name) and p.is_dir():
        problem = _problem(p)
        if problem is None:
            return p
        earlier = [c for c in list_checkpoints(p.parent) if _step_of(c) < _step_of(p) and _problem(c) is None]
        hint = (
            f"The previous good checkpoint is {earlier[-1]}: resume from it (resume_from={str(earlier[-1])!r}), "
            f"or from the run folder {str(p.parent)!r}, which skips damaged checkpoints."
            if earlier
            else f"There is no earlier intact checkpoint in {p.parent}; start the run again."
        )
        raise CheckpointIntegrityError(f"{problem} {hint}")
    found = list_checkpoints(p)
    damaged: list[str] = []
    for folder in reversed(found):
        problem = _problem(folder)
        if problem is None:
            if damaged:
                warnings.warn(
                    f"{'; '.join(damaged)}. Resuming from {folder.name}, the newest intact checkpoint.",
                    CheckpointCorruptionWarning,
                    stacklevel=3,
                )
            return folder
        note = problem
        if set_aside:
            target = folder.with_name(folder.name + ".corrupt")
            with contextlib.suppress(OSError):
                if target.exists():
                    shutil.rmtree(target, ignore_errors=True)
                os.replace(folder, target)
                note += f" It was set aside as {target.name}."
        damaged.append(note)
    if damaged:
        raise CheckpointIntegrityError(
            f"No intact checkpoint in {p}: {'; '.join(damaged)}. Start the run again (in a new folder, or after "
            "removing the damaged ones)."
        )
    return None


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold a run folder's lock (refusing at once when another process trains into it) and tidy the folder.

    Raises
    ------
    RunInUseError
        Another live process holds the lock (a ``LockTimeout`` and a ``RuntimeError``).
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    try:
        with file_lock(run / RUN_LOCK, timeout=0, purpose="fine-tuning"):
            clean_stale_temps(run)
            yield run
    except LockTimeout as exc:
        raise RunInUseError(
            f"Another process is fine-tuning into {run} right now ({exc}). Give this run another out_dir, or "
            "wait for that one to end and resume from its folder."
        ) from exc


def save_model_into(tmp: Path, clip: Any, **kwargs: Any) -> None:
    """Write a full model with :func:`~ccclip_widgets.models.save_checkpoint` directly into ``tmp``."""
    from ..models import save_checkpoint

    inner = tmp / "_model"
    save_checkpoint(clip, inner, **kwargs)
    for item in inner.iterdir():
        os.replace(item, tmp / item.name)
    inner.rmdir()


def load_trainer_state(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``trainer_state.pt`` with ``torch.load(weights_only=True)`` (no arbitrary unpickling).

    The folder's checksums are verified first.

    Raises
    ------
    FileNotFoundError
        When the folder holds no trainer state.
    ccclip_widgets.models.CheckpointIntegrityError
        When a file is damaged (the message names it).
    """
    from ..models import CheckpointIntegrityError

    path = Path(folder) / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a resumable checkpoint (no {TRAINER_STATE})")
    verify_checkpoint(folder)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError) as exc:
        if "weights_only" in str(exc) and "Unsupported" in str(exc):
            raise
        raise CheckpointIntegrityError(
            f"Checkpoint file {path} is unreadable ({exc}); it was not used."
        ) from exc


def load_full_weights(folder: str | os.PathLike[str], model: torch.nn.Module) -> None:
    """Copy a full-model checkpoint's weights into ``model`` (same architecture; strict; checksums verified)."""
    from safetensors.torch import load_file

    from ..models import WEIGHTS_FILE

    verify_checkpoint(folder)
    state = load_file(str(Path(folder) / WEIGHTS_FILE), device="cpu")
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {folder} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for k, v in state.items():
            t = target[k]
            if v.shape != t.shape:
                v = v.reshape(t.shape)
            t.copy_(v.to(t.dtype))


def write_run_file(run_dir: str | os.PathLike[str], info: dict[str, Any]) -> Path:
    """Write ``run.json`` (status and pointers) atomically."""
    return atomic_write_json(Path(run_dir) / RUN_FILE, info)


def read_run_file(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``run.json`` of a run folder, or None."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


# ================================================================================================= a run's files
# What the trainer writes into a run folder, as functions of explicit arguments (the trainer holds the state).


def hardware(device: torch.device, world: int) -> dict[str, Any]:
    """Where a run trained: device, processes, torch version, CPU count, platform (and the GPU's name)."""
    hw: dict[str, Any] = {
        "device": str(device),
        "world_size": world,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(device)
    return hw


def training_meta(
    *,
    config: Any,
    step: int,
    total_steps: int | None,
    epoch: int,
    batch_size: int,
    metrics: dict[str, Any],
    data_fingerprint: str,
    n_train_posts: int,
    base: dict[str, Any],
    device: torch.device,
    world_size: int,
) -> dict[str, Any]:
    """The ``training`` block stored in every model folder's JSON."""
    return {
        "training": {
            "config": config.to_dict(),
            "step": step,
            "total_steps": total_steps,
            "epoch": epoch,
            "batch_size": batch_size,
            "metrics": metrics,
            "data_fingerprint": data_fingerprint,
            "n_train_posts": n_train_posts,
            "base_model": base,
            "hardware": hardware(device, world_size),
        }
    }


def provenance(clip: Any, base: dict[str, Any]) -> dict[str, Any]:
    """Provenance of a fine-tuned full model: the run and the base it started from."""
    return {
        "source": "ccclip_widgets.train.fine_tune",
        "base_spec": base.get("spec"),
        "base_fingerprint": base.get("fingerprint"),
        "base_provenance": clip.provenance,
    }


def model_writer(
    clip: Any,
    lora: Any | None,
    base: dict[str, Any],
    meta: dict[str, Any],
    adapter: dict[str, torch.Tensor] | None = None,
) -> Callable[[Path], None]:
    """A writer for :func:`write_folder`: the LoRA adapters (``adapter``, or the model's now) or the full model."""
    from .lora import adapter_state, save_adapter

    def write(tmp: Path) -> None:
        if lora is not None:
            state = adapter if adapter is not None else adapter_state(clip.model, lora)
            save_adapter(tmp, state, lora, base=base, extra=meta)
        else:
            clip.invalidate_fingerprint()
            save_model_into(tmp, clip, provenance=provenance(clip, base), extra=meta)

    return write


def trainer_state(
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    step: int,
    epoch: int,
    batch_in_epoch: int,
    config: Any,
    data_fingerprint: str,
    base: dict[str, Any],
    history: list[dict[str, Any]],
    eval_history: list[dict[str, Any]],
    best: dict[str, Any],
    nan_count: int,
    failures: dict[str, str],
    batch_size: int,
    world_size: int,
    samples_seen: int,
) -> dict[str, Any]:
    """Everything a resumed run needs to continue bit for bit (the contents of ``trainer_state.pt``).

    Tensors, dicts, lists, numbers and strings only, so that it loads with ``weights_only=True``; the RNG states
    are captured now.
    """
    return {
        "format_version": 1,
        "step": step,
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        "rng": capture_rng(),
        "config": config.to_dict(),
        "data_fingerprint": data_fingerprint,
        "base": base,
        "history": history,
        "eval_history": eval_history,
        "best": best,
        "nan_count": nan_count,
        "failures": [[k, v] for k, v in failures.items()],
        "batch_size": batch_size,
        "world_size": world_size,
        "samples_seen": samples_seen,
        "elapsed_s": float(history[-1]["elapsed_s"]) if history else 0.0,
    }


def write_checkpoint(
    run_dir: Path, step: int, writer: Callable[[Path], None], state: dict[str, Any], keep: int
) -> Path:
    """Write ``checkpoint-N`` (model + trainer state) atomically and prune to the newest ``keep``."""
    folder = run_dir / checkpoint_name(step)
    write_folder(folder, writer, state)
    prune_checkpoints(run_dir, keep)
    return folder


def run_info(
    *,
    status: str,
    step: int,
    total_steps: int | None,
    latest: Path | None,
    best: dict[str, Any] | None,
    final: Path | None,
    data_fingerprint: str,
    config: Any,
) -> dict[str, Any]:
    """The contents of ``run.json``; ``best`` is ``{"metric", "value", "step"}`` or None."""
    return {
        "status": status,
        "step": step,
        "total_steps": total_steps,
        "latest_checkpoint": latest.name if latest is not None else None,
        "best": None if best is None else {"dir": "best", **best},
        "final": final.name if final is not None else None,
        "data_fingerprint": data_fingerprint,
        "config": config.to_dict(),
    }
