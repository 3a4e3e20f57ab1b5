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
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_dir, atomic_write_json

__all__ = [
    "CHECKPOINT_PREFIX",
    "RUN_FILE",
    "TRAINER_STATE",
    "capture_rng",
    "checkpoint_name",
    "find_checkpoint",
    "list_checkpoints",
    "load_trainer_state",
    "prune_checkpoints",
    "restore_rng",
    "write_folder",
    "write_run_file",
]

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.pt"
RUN_FILE = "run.json"
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
        shutil.rmtree(p, ignore_errors=True)
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
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        write_model(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
            with open(tmp / TRAINER_STATE, "rb") as fh:
                os.fsync(fh.fileno())
    return folder


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

    Raises
    ------
    FileNotFoundError
        When the folder holds no trainer state.
    """
    path = Path(folder) / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a resumable checkpoint (no {TRAINER_STATE})")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_full_weights(folder: str | os.PathLike[str], model: torch.nn.Module) -> None:
    """Copy a full-model checkpoint's weights into ``model`` (same architecture; strict)."""
    from safetensors.torch import load_file

    from ..models import WEIGHTS_FILE

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
