"""The toolkit's one distributed set-up: join ``torchrun``'s process group, know this process's place, wait.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`init_distributed` starts the process group
(NCCL on GPUs, gloo on CPUs) if nobody has yet. Without it everything degrades to one process and the helpers
are no-ops. Embedding (:func:`ccclip_widgets.embed_posts`), fine-tuning (:mod:`ccclip_widgets.train`) and the
CLI all call these functions; nothing else creates or inspects the process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "barrier",
    "dist_info",
    "finish_distributed",
    "init_distributed",
    "setup_distributed",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly one-process) job.

    Attributes
    ----------
    rank, world_size, local_rank
        As ``torchrun`` defines them.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes files and shows progress)."""
        return self.rank == 0


def dist_info() -> DistInfo:
    """The current process group's rank and size (one process when none is initialized)."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return DistInfo(dist.get_rank(), dist.get_world_size(), local)
    return DistInfo()


def init_distributed(device_type: str | None = None) -> DistInfo:
    """Initialize ``torch.distributed`` from ``torchrun``'s environment variables when they ask for it.

    Parameters
    ----------
    device_type
        ``"cuda"`` selects NCCL, anything else gloo; ``None`` picks NCCL when CUDA is available.

    Returns
    -------
    DistInfo
        The process's place; ``world_size == 1`` when not launched by ``torchrun`` (nothing is initialized).
    """
    if dist.is_available() and dist.is_initialized():
        return dist_info()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_available():  # pragma: no cover - every supported build has it
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    backend = "nccl" if device_type == "cuda" else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    return dist_info()


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def setup_distributed(device: str | None) -> tuple[DistInfo, str | None]:
    """Join the process group when launched by ``torchrun`` and pick this process's device.

    Parameters
    ----------
    device
        The device asked for (``None``, ``"cuda"``, ``"cuda:1"``, ``"cpu"``, ...).

    Returns
    -------
    tuple
        ``(DistInfo, device)``: under torchrun on GPUs, ``None`` and ``"cuda"`` become ``cuda:LOCAL_RANK``.
    """
    kind = None if device is None else ("cuda" if str(device).startswith("cuda") else "cpu")
    info = init_distributed(kind)
    if info.enabled and device in (None, "cuda") and torch.cuda.is_available():
        device = f"cuda:{info.local_rank}"
    return info, device


def finish_distributed(info: DistInfo) -> None:
    """Wait for every process, then leave the process group (no-op for one process)."""
    if info.enabled:
        dist.barrier()
        dist.destroy_process_group()
