"""torch.distributed plumbing for fine-tuning: set-up from ``torchrun``'s environment, and small collectives.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`init_distributed` starts the process group
(NCCL on GPUs, gloo on CPUs) if nobody has yet. Without it everything degrades to one process and the helpers
are no-ops, so the training loop has a single code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "barrier",
    "broadcast_flag",
    "dist_info",
    "init_distributed",
    "mean_across_ranks",
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


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns this rank's share of the summed gradient.

    Every rank computes its loss against the gathered features of all ranks, so the gradient of rank ``r``'s
    features is the sum of what every rank's loss says about them: an all-reduce (sum) of the incoming
    gradient, then this rank's slice. (gloo has no reduce-scatter, so the sum is an all-reduce.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        ctx.rank = dist.get_rank()
        ctx.n = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.n
        return grad[start : start + ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank (rank order) with gradients flowing back to each rank's own part.

    Parameters
    ----------
    x
        ``B x ...``; the same shape on every rank.

    Returns
    -------
    torch.Tensor
        ``(world_size * B) x ...``; ``x`` itself when not distributed.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank (rank order), without gradients (masks, ids)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (a copy; the input is untouched)."""
    out = value.detach().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (e.g. "stop now"); the input itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
