"""Symmetric InfoNCE (CLIP) loss over a batch that may span several processes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_gather_no_grad, all_gather_with_grad, dist_info

__all__ = ["ClipLoss"]


class ClipLoss(nn.Module):
    """Symmetric contrastive loss: each image must pick its text among the batch's texts, and vice versa.

    The loss is the mean, over the valid pairs of the (global) batch, of the average of the image-to-text and
    text-to-image cross-entropies, with logits ``logit_scale * cos(image, text)``.

    Under ``torch.distributed`` every rank holds ``B`` pairs; the features of all ranks are gathered so the
    negatives span the global batch, while each rank computes the loss only for its own ``B`` anchors (rows)
    against all ``W * B`` candidates. The gathered copies pass gradients back to the rank they came from, so
    after DistributedDataParallel averages the parameter gradients, the update equals the one-process update on
    the whole global batch. The value returned on each rank is its share scaled by ``W``: the mean over ranks is
    the global loss (in one process it is simply the loss).

    Parameters
    ----------
    rank, world_size
        This process's place; ``None`` reads them from ``torch.distributed`` (one process when uninitialized).
    """

    def __init__(self, rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__()
        info = dist_info()
        self.rank = info.rank if rank is None else rank
        self.world_size = info.world_size if world_size is None else world_size

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        *,
        valid: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        text_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the loss.

        Parameters
        ----------
        image_features, text_features
            ``B x D`` L2-normalized features of this rank's pairs (row ``i`` of both belong together).
        logit_scale
            The temperature's inverse, already exponentiated (what open_clip's ``forward`` returns).
        valid
            Optional ``B`` bool mask: pairs to leave out entirely (e.g. an image that failed to decode); they are
            neither anchors nor negatives.
        image_ids, text_ids
            Optional ``B`` int64 identities of each pair's image and text. Pairs sharing an image or a text with
            an anchor are not used as its negatives (they would be false negatives).

        Returns
        -------
        torch.Tensor
            Scalar loss (see the class notes for the distributed scaling).
        """
        n_local = image_features.shape[0]
        img = image_features.float()
        txt = text_features.float()
        scale = logit_scale.float().reshape(())
        device = img.device
        valid_given = valid
        if valid is None:
            valid = torch.ones(n_local, dtype=torch.bool, device=device)
        valid = valid.to(device=device, dtype=torch.bool)

        all_img = all_gather_with_grad(img) if self.world_size > 1 else img
        all_txt = all_gather_with_grad(txt) if self.world_size > 1 else txt
        if valid_given is None:
            all_valid = torch.ones(all_img.shape[0], dtype=torch.bool, device=device)
        else:
            all_valid = all_gather_no_grad(valid) if self.world_size > 1 else valid

        offset = self.rank * n_local
        labels = torch.arange(n_local, device=device) + offset
        logits_i2t = scale * img @ all_txt.T
        logits_t2i = scale * txt @ all_img.T

        n_all = all_img.shape[0]
        masked = valid_given is not None or image_ids is not None or text_ids is not None
        if masked:
            # Columns never used as negatives: invalid pairs, and pairs sharing this anchor's image or text.
            exclude = (~all_valid).unsqueeze(0).expand(n_local, n_all)
            for ids in (image_ids, text_ids):
                if ids is None:
                    continue
                ids = ids.to(device=device, dtype=torch.int64)
                all_ids = all_gather_no_grad(ids) if self.world_size > 1 else ids
                exclude = exclude | (ids.unsqueeze(1) == all_ids.unsqueeze(0))
            exclude = exclude.contiguous()  # a fresh tensor (the expanded view above must not be written)
            # an anchor's own pair always stays (this also keeps every row finite)
            exclude[:, offset : offset + n_local].diagonal().fill_(False)
            logits_i2t = logits_i2t.masked_fill(exclude, float("-inf"))
            logits_t2i = logits_t2i.masked_fill(exclude, float("-inf"))

        per_pair = 0.5 * (
            F.cross_entropy(logits_i2t, labels, reduction="none")
            + F.cross_entropy(logits_t2i, labels, reduction="none")
        )
        if not masked:
            return per_pair.mean() if self.world_size == 1 else per_pair.sum() * self.world_size / n_all
        # No host sync here: with no valid pair at all, every weight is 0 and so is the loss (and its gradient).
        n_valid = all_valid.sum().clamp_min(1).float()
        return (per_pair * valid.float()).sum() * self.world_size / n_valid
