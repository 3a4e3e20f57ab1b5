"""torch.distributed collectives for fine-tuning (gathers with and without gradients, means, flags).

The set-up itself (joining ``torchrun``'s process group, rank and size, the barrier) is the toolkit's one
:mod:`ccclip_widgets.distributed`, re-exported here. Without a process group every helper is a no-op, so the
training loop has a single code path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed import DistInfo, barrier, dist_info, init_distributed

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
