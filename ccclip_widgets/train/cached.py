"""Fine-tuning with both towers locked: their outputs are computed once and only the heads train.

When the image trunk and the text transformer are frozen and images are not augmented, what each tower gives
for a post never changes during training. :func:`fine_tune` then encodes every distinct image and text once
(:func:`tower_features`) and each step runs only the heads (image projection, text projection, temperature) on
the stored features: hundreds of epochs cost seconds on a laptop CPU instead of hours. Evaluation during
training uses the same features.

Models qualify when their heads are separate modules: a timm image tower (``visual.trunk`` + ``visual.head``)
and a Hugging Face text tower (``text.transformer`` + ``text.pooler`` + ``text.proj``), as the demo model has.
Other models train through the regular path; the results are the same, only slower.

Features are memoised per process, keyed by a fingerprint of the frozen towers and the image or text key, so a
second run on the same posts (the demo's before/after evaluation, a re-run with another learning rate) encodes
nothing again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import PairDataset, PreparedPosts, make_loader

__all__ = [
    "HeadsForward",
    "TowerFeatures",
    "cached_batches",
    "heads_only",
    "tower_fingerprint",
    "tower_features",
]

_MEMO: dict[tuple[str, str], dict[str, tuple[torch.Tensor, str]]] = {}
_MEMO_LIMIT = 2_000_000  # items per (towers, kind); beyond that the memo is cleared rather than grown


def _split_towers(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module] | None:
    visual = getattr(model, "visual", None)
    text = getattr(model, "text", None)
    if visual is None or text is None:
        return None
    if not (
        isinstance(getattr(visual, "trunk", None), nn.Module)
        and isinstance(getattr(visual, "head", None), nn.Module)
    ):
        return None
    if not all(isinstance(getattr(text, a, None), nn.Module) for a in ("transformer", "pooler", "proj")):
        return None
    return visual.trunk, visual.head, text.transformer, text.proj


def heads_only(model: nn.Module, *, augment: bool, lora: Any = None) -> bool:
    """Whether training ``model`` as configured touches only its heads (so tower outputs can be cached).

    Parameters
    ----------
    model
        The open_clip model, with ``requires_grad`` already set for training.
    augment
        Image augmentation on (then the image tower's output changes from epoch to epoch: no cache).
    lora
        LoRA settings (adapters live inside the towers: no cache).

    Returns
    -------
    bool
    """
    if augment or lora is not None:
        return False
    parts = _split_towers(model)
    if parts is None:
        return False
    _, img_head, _, txt_head = parts
    allowed = {id(p) for m in (img_head, txt_head) for p in m.parameters()}
    scale = getattr(model, "logit_scale", None)
    if scale is not None:
        allowed.add(id(scale))
    trainable = [p for p in model.parameters() if p.requires_grad]
    return bool(trainable) and all(id(p) in allowed for p in trainable)


def tower_fingerprint(model: nn.Module) -> str:
    """A cheap fingerprint of the frozen trunk and text transformer (shapes, dtypes and per-tensor sums)."""
    parts = _split_towers(model)
    if parts is None:
        raise ValueError("the model has no separate trunk/head modules")
    trunk, _, transformer, _ = parts
    h = hashlib.blake2b(digest_size=12)
    with torch.no_grad():
        for prefix, module in (("i", trunk), ("t", transformer)):
            for name, t in module.state_dict().items():
                h.update(f"{prefix}{name}{tuple(t.shape)}{t.dtype}".encode())
                if t.is_floating_point() and t.numel():
                    flat = t.detach().reshape(-1).float()
                    h.update(np.float64(flat.sum().item()).tobytes())
                    h.update(
                        np.float64(
                            (flat * torch.linspace(-1, 1, flat.numel(), device=flat.device)).sum().item()
                        ).tobytes()
                    )
    return h.hexdigest()


@dataclass
class TowerFeatures:
    """Frozen tower outputs for one :class:`~.data.PreparedPosts`.

    Attributes
    ----------
    image
        ``I x D_img`` trunk outputs, one row per distinct image (``data.image_ids``), float32 on the device.
    text
        ``T x D_txt`` pooled text-transformer outputs, one row per distinct text (``data.text_ids``).
    image_ok
        ``I`` bool: the image decoded.
    image_reason
        Per distinct image, why it failed ("" when it did not).
    """

    image: torch.Tensor
    text: torch.Tensor
    image_ok: torch.Tensor
    image_reason: list[str]


def _first_rows(ids: torch.Tensor) -> list[int]:
    first: dict[int, int] = {}
    for row, v in enumerate(ids.tolist()):
        first.setdefault(v, row)
    return [first[k] for k in range(len(first))]


@torch.no_grad()
def tower_features(
    clip: Any,
    data: PreparedPosts,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    precision: str = "fp32",
    show_progress: bool = True,
) -> TowerFeatures:
    """Encode every distinct image (trunk only) and text (transformer + pooler only) of ``data`` once.

    Parameters
    ----------
    clip
        The :class:`~ccclip_widgets.models.ClipModel`; its model must have separate heads (:func:`heads_only`).
    data
        From :func:`~.data.prepare_posts`.
    batch_size
        Images or texts per forward pass.
    num_workers
        Image-decoding workers.
    precision
        Autocast precision (``"fp32"``, ``"bf16"``, ``"fp16"``).
    show_progress
        A progress bar (tqdm.auto).

    Returns
    -------
    TowerFeatures
    """
    from tqdm.auto import tqdm

    from .evaluation import _autocast

    model = clip.model
    parts = _split_towers(model)
    if parts is None:
        raise ValueError("tower_features needs a model with separate trunk/head modules")
    trunk, _, transformer, _ = parts
    device = clip.device
    fp = tower_fingerprint(model)
    img_memo = _MEMO.setdefault((fp, "image"), {})
    txt_memo = _MEMO.setdefault((fp, "text"), {})
    for memo in (img_memo, txt_memo):
        if len(memo) > _MEMO_LIMIT:
            memo.clear()
    keys_img = data.table["image_key"].to_list()
    keys_txt = data.table["text_key"].to_list()
    img_rows = _first_rows(data.image_ids)
    txt_rows = _first_rows(data.text_ids)
    todo_img = [r for r in img_rows if keys_img[r] not in img_memo]
    todo_txt = [r for r in txt_rows if keys_txt[r] not in txt_memo]
    was_training = model.training
    model.eval()
    bar = tqdm(
        total=len(todo_img) + len(todo_txt),
        desc="tower features",
        unit="item",
        disable=not show_progress or not (todo_img or todo_txt),
        dynamic_ncols=True,
    )
    try:
        if todo_img:
            dataset = PairDataset(
                data.sources, clip.image_size, clip.preprocess, clip.preprocess_cfg, augment=False, seed=0
            )
            batches = [
                [(r, 0) for r in todo_img[s : s + batch_size]] for s in range(0, len(todo_img), batch_size)
            ]
            loader = make_loader(dataset, batches, num_workers=num_workers, pin_memory=False, seed=0)
            for rows, pixels, valid, reasons in loader:
                pixels = pixels.to(device, non_blocking=True)
                with _autocast(device, precision):
                    feats = trunk(pixels).float().cpu()
                for r, f, ok, why in zip(rows.tolist(), feats, valid.tolist(), reasons, strict=True):
                    img_memo[keys_img[r]] = (f, "" if ok else (why or "undecodable"))
                bar.update(len(rows))
        if todo_txt:
            pad = int(getattr(getattr(model.text, "config", None), "pad_token_id", 0) or 0)
            tokens = data.tokens[todo_txt]
            lengths = (tokens != pad).sum(1)
            order = torch.argsort(
                lengths, stable=True
            ).tolist()  # similar lengths share a batch: less padding
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                batch = tokens[idx]
                width = max(1, int(lengths[idx].max()))
                batch = batch[:, :width].to(device, non_blocking=True)
                mask = (batch != pad).long()
                with _autocast(device, precision):
                    out = transformer(input_ids=batch, attention_mask=mask)
                    pooled = model.text.pooler(out, mask).float().cpu()
                for i, f in zip(idx, pooled, strict=True):
                    txt_memo[keys_txt[todo_txt[i]]] = (f, "")
                bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    image = torch.stack([img_memo[keys_img[r]][0] for r in img_rows]).to(device)
    reasons = [img_memo[keys_img[r]][1] for r in img_rows]
    text = torch.stack([txt_memo[keys_txt[r]][0] for r in txt_rows]).to(device)
    ok = torch.tensor([not why for why in reasons], dtype=torch.bool)
    return TowerFeatures(image=image, text=text, image_ok=ok, image_reason=reasons)


class HeadsForward(nn.Module):
    """The training forward on cached tower outputs: both heads and the temperature.

    It takes the places of images and tokens in the regular step, so the loop, the loss, checkpoints and resume
    are shared with the full path.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, image_trunk: torch.Tensor, text_pooled: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = F.normalize(self.model.visual.head(image_trunk), dim=-1)
        text = F.normalize(self.model.text.proj(text_pooled), dim=-1)
        return image, text, self.model.logit_scale.exp()


def project(model: nn.Module, feats: TowerFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised embeddings of the distinct images and texts under the current heads (CPU, float32)."""
    with torch.no_grad():
        image = F.normalize(model.visual.head(feats.image).float(), dim=-1).cpu()
        text = F.normalize(model.text.proj(feats.text).float(), dim=-1).cpu()
    return image, text


def encode_posts_cached(
    clip: Any, posts: Any, *, show_progress: bool = True
) -> tuple[Any, np.ndarray, np.ndarray]:
    """Per-post image and text vectors through memoised tower outputs and the model's current heads.

    Parameters
    ----------
    clip
        A :class:`~ccclip_widgets.models.ClipModel` with separate heads (the demo model).
    posts
        :class:`~ccclip_widgets.posts.Posts` (or its table).
    show_progress
        Progress bar while towers encode.

    Returns
    -------
    (table, image_vectors, text_vectors)
        The rows that were encoded (posts without an image are left out) and ``N x D`` float32 arrays.
    """
    from .data import prepare_posts

    prepared = prepare_posts(posts, clip, role="evaluation")
    feats = tower_features(clip, prepared, show_progress=show_progress)
    img, txt = project(clip.model, feats)
    return prepared.table, img[prepared.image_ids].numpy(), txt[prepared.text_ids].numpy()


def cached_batches(
    feats: TowerFeatures, data: PreparedPosts, sampler: Any
) -> Iterator[
    tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str], torch.Tensor, torch.Tensor, torch.Tensor]
]:
    """Training batches shaped like the regular loader's, with tower features in place of pixels and tokens."""
    for keys in sampler:
        rows = torch.tensor([k[0] for k in keys], dtype=torch.int64)
        img = data.image_ids[rows]
        txt = data.text_ids[rows]
        idx_img = img.to(feats.image.device)
        valid = feats.image_ok[img]
        reasons = [feats.image_reason[i] for i in img.tolist()]
        yield rows, feats.image[idx_img], valid, reasons, feats.text[txt.to(feats.text.device)], img, txt
