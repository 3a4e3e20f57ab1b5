"""Training data: posts -> (image tensor, tokens) pairs, a deterministic epoch order, and the DataLoader.

Determinism is by construction rather than by saved iterator state: the order of epoch ``e`` is a permutation
drawn from ``(seed, e)``, and the augmentation of post ``i`` in epoch ``e`` from ``(seed, e, i)``. So a run
resumed at (epoch, batch) sees exactly the batches and pixels an uninterrupted run would, whatever the number of
worker processes or ranks.

Images that fail to decode while training (a truncated file that passed the header check, say) do not stop the
run: the pair is masked out of its batch (neither anchor nor negative) and reported with its reason.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..images import OPENAI_MEAN, OPENAI_STD, ImageDecodeError, load_image

__all__ = [
    "EpochBatchSampler",
    "PairCollate",
    "PairDataset",
    "RunBatchSampler",
    "PreparedPosts",
    "default_train_workers",
    "make_loader",
    "prepare_posts",
]

_REQUIRED = ("post_id", "text", "image_key", "text_key", "image_path", "image_bytes")


@dataclass
class PreparedPosts:
    """Posts ready for training or evaluation.

    Attributes
    ----------
    table
        The usable rows (same columns as ``Posts.table``).
    sources
        Per row: the image path, or its bytes.
    tokens
        ``N x context_length`` token ids.
    image_ids, text_ids
        ``N`` int64: equal for rows sharing an image (``image_key``) / a text (``text_key``).
    skipped
        Rows left out before training, as dicts with ``post_id``, ``reason``, ``detail``.
    fingerprint
        Hash of the rows' ``post_id``, ``image_key`` and ``text_key`` in order (what was trained on).
    n_truncated
        Texts longer than the model's context (they are cut).
    """

    table: pl.DataFrame
    sources: list[Any]
    tokens: torch.Tensor
    image_ids: torch.Tensor
    text_ids: torch.Tensor
    skipped: list[dict[str, str]] = field(default_factory=list)
    fingerprint: str = ""
    n_truncated: int = 0

    def __len__(self) -> int:
        return self.table.height


def _as_table(posts: Any) -> pl.DataFrame:
    table = getattr(posts, "table", posts)
    if not isinstance(table, pl.DataFrame):
        raise TypeError(
            f"Expected a Posts (from read_posts / posts_from_records) or its polars table, got {type(posts).__name__}"
        )
    missing = [c for c in _REQUIRED if c not in table.columns]
    if missing:
        raise ValueError(
            f"The posts table lacks the columns {missing}; build it with ccclip_widgets.read_posts or "
            "posts_from_records, which add image_path/image_bytes/image_key/text_key."
        )
    return table


def data_fingerprint(table: pl.DataFrame) -> str:
    """Hash of ``post_id``, ``image_key`` and ``text_key`` of every row, in order (32 hex characters)."""
    h = hashlib.blake2b(digest_size=16)
    for pid, ik, tk in zip(table["post_id"], table["image_key"], table["text_key"], strict=True):
        h.update(f"{pid}\x1f{ik}\x1f{tk}\n".encode())
    return h.hexdigest()


def _factorize(values: list[str]) -> torch.Tensor:
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(v, len(index)) for v in values], dtype=torch.int64)


def prepare_posts(posts: Any, clip: Any, *, role: str = "training") -> PreparedPosts:
    """Check and tokenize posts for training or evaluation.

    Parameters
    ----------
    posts
        A :class:`~ccclip_widgets.posts.Posts` (or its table).
    clip
        The :class:`~ccclip_widgets.models.ClipModel` (for its tokenizer).
    role
        ``"training"`` or ``"evaluation"``, for messages.

    Returns
    -------
    PreparedPosts

    Raises
    ------
    ValueError
        When a text is empty (the message names the posts), or required columns are missing.
    """
    table = _as_table(posts)
    texts = table["text"].to_list()
    empty = [i for i, t in enumerate(texts) if t is None or not str(t).strip()]
    if empty:
        ids = table["post_id"].gather(empty[:5]).to_list()
        raise ValueError(
            f"{len(empty)} {role} post(s) have an empty text (e.g. post_id {ids}); a contrastive pair needs both an "
            "image and a text. read_posts rejects such rows; drop them with "
            "posts.filter(pl.col('text').str.strip_chars() != '')."
        )
    skipped: list[dict[str, str]] = []
    keep: list[int] = []
    sources: list[Any] = []
    for i, (path, data) in enumerate(zip(table["image_path"], table["image_bytes"], strict=True)):
        if path is None and data is None:
            skipped.append(
                {
                    "post_id": str(table["post_id"][i]),
                    "reason": "missing_image",
                    "detail": "no image path or bytes",
                }
            )
            continue
        keep.append(i)
        sources.append(path if path is not None else bytes(data))
    if len(keep) != table.height:
        table = table[keep]
    texts = table["text"].to_list()
    chunks = [clip.tokenize(texts[s : s + 4096]) for s in range(0, len(texts), 4096)]
    tokens = torch.cat(chunks) if chunks else torch.zeros(0, clip.context_length, dtype=torch.int64)
    try:
        n_truncated = clip.count_truncated(texts) if len(texts) <= 200_000 else 0
    except Exception:  # counting is informative only
        n_truncated = 0
    return PreparedPosts(
        table=table,
        sources=sources,
        tokens=tokens,
        image_ids=_factorize(table["image_key"].to_list()),
        text_ids=_factorize(table["text_key"].to_list()),
        skipped=skipped,
        fingerprint=data_fingerprint(table),
        n_truncated=n_truncated,
    )


# --------------------------------------------------------------------------------------------------- dataset
def _norm_stats(preprocess_cfg: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = tuple(preprocess_cfg.get("mean") or OPENAI_MEAN)
    std = tuple(preprocess_cfg.get("std") or OPENAI_STD)
    return mean, std


class PairDataset(Dataset):
    """Images of prepared posts as model-ready tensors; keys are ``(row, epoch)``.

    A failed decode returns a blank image with ``valid=False`` and the reason, never an exception.

    Parameters
    ----------
    sources
        Image path or bytes per row.
    image_size
        Model input side.
    preprocess
        The model's evaluation transform (used when ``augment`` is False).
    preprocess_cfg
        The model's preprocessing config (normalization mean/std for the augmented path).
    augment
        Random resized crop (70-100 % of the area, aspect 3/4-4/3) and horizontal flip, drawn from
        ``(seed, epoch, row)``.
    seed
        Run seed.
    normalize
        Return normalised float pixels. ``False``: augmented images come as ``uint8`` (``3 x S x S``, a quarter
        of the bytes to pass between processes, pin and copy) and the caller normalises them on its device with
        :meth:`device_normaliser`; the evaluation transform (``augment=False``) always returns floats.
    """

    def __init__(
        self,
        sources: list[Any],
        image_size: int,
        preprocess: Any,
        preprocess_cfg: dict[str, Any],
        *,
        augment: bool,
        seed: int,
        normalize: bool = True,
    ) -> None:
        self.sources = sources
        self.image_size = image_size
        self.preprocess = preprocess
        mean, std = _norm_stats(preprocess_cfg)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.augment = augment
        self.seed = seed
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def _uint8(self) -> bool:
        return self.augment and not self.normalize

    def device_normaliser(self, device: torch.device) -> Any:
        """``uint8 -> float32`` normalisation on ``device``, the same arithmetic the workers do otherwise."""
        mean = self.mean.to(device)
        std = self.std.to(device)

        def normalise(pixels: torch.Tensor) -> torch.Tensor:
            return (pixels.float().div_(255.0) - mean) / std

        return normalise

    def _augmented(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        w, h = img.size
        area = w * h
        box = None
        for _ in range(10):
            target = area * rng.uniform(0.7, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw = round(math.sqrt(target * ratio))
            ch = round(math.sqrt(target / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                x0 = int(rng.integers(0, w - cw + 1))
                y0 = int(rng.integers(0, h - ch + 1))
                box = (x0, y0, x0 + cw, y0 + ch)
                break
        if box is None:  # extreme aspect ratio: the central square
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        size = self.image_size
        out = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1)
        if self._uint8:
            return arr.contiguous()
        arr = arr.float().div_(255.0)
        return (arr - self.mean) / self.std

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, torch.Tensor, bool, str]:
        index, epoch = key
        try:
            img = load_image(self.sources[index], target_size=self.image_size)
            if self.augment:
                rng = np.random.default_rng([self.seed, epoch, index, 1])
                pixels = self._augmented(img, rng)
            else:
                pixels = self.preprocess(img)
            return index, pixels, True, ""
        except ImageDecodeError as exc:
            reason = f"{exc.reason}: {exc.detail}"
        except Exception as exc:  # one bad image must not end a run
            reason = f"corrupt: {type(exc).__name__}: {exc}"
        dtype = torch.uint8 if self._uint8 else torch.float32
        return index, torch.zeros(3, self.image_size, self.image_size, dtype=dtype), False, reason


def collate_pairs(
    batch: list[tuple[int, torch.Tensor, bool, str]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Stack dataset items into (rows, pixels, valid mask, failure reasons)."""
    rows = torch.tensor([b[0] for b in batch], dtype=torch.int64)
    pixels = torch.stack([b[1] for b in batch])
    valid = torch.tensor([b[2] for b in batch], dtype=torch.bool)
    return rows, pixels, valid, [b[3] for b in batch]


class PairCollate:
    """Collate for training: :func:`collate_pairs` plus the batch's tokens and image/text ids.

    It runs in the loader's worker processes, so the training process gets every tensor ready (and pinned)
    and does no per-batch work on the CPU.
    """

    def __init__(self, tokens: torch.Tensor, image_ids: torch.Tensor, text_ids: torch.Tensor) -> None:
        self.tokens = tokens
        self.image_ids = image_ids
        self.text_ids = text_ids

    def __call__(
        self, batch: list[tuple[int, torch.Tensor, bool, str]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, pixels, valid, reasons = collate_pairs(batch)
        return rows, pixels, valid, reasons, self.tokens[rows], self.image_ids[rows], self.text_ids[rows]


# --------------------------------------------------------------------------------------------------- order
class EpochBatchSampler:
    """This rank's share of each global batch of one epoch, as lists of ``(row, epoch)`` keys.

    The epoch's order is a permutation drawn from ``(seed, epoch)``; global batch ``b`` is positions
    ``[b * B, (b + 1) * B)`` of it (an incomplete last batch is dropped) and rank ``r`` takes the ``r``-th
    contiguous slice of ``B / world_size``, so gathering the ranks' features in rank order rebuilds the global
    batch exactly.

    Parameters
    ----------
    n
        Number of rows.
    batch_size
        Global batch size (a multiple of ``world_size``, at most ``n``).
    epoch
        Epoch number.
    seed
        Run seed.
    start_batch
        First global batch to yield (to resume mid-epoch).
    rank, world_size
        This process's place.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        epoch: int,
        seed: int,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not a multiple of the {world_size} processes")
        self.n = n
        self.batch_size = batch_size
        self.epoch = epoch
        self.seed = seed
        self.start_batch = start_batch
        self.rank = rank
        self.world_size = world_size

    @property
    def batches_per_epoch(self) -> int:
        """Global batches in one epoch."""
        return self.n // self.batch_size

    def order(self) -> np.ndarray:
        """The epoch's permutation of rows."""
        return np.random.default_rng([self.seed, self.epoch, 0]).permutation(self.n)

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = self.order()
        local = self.batch_size // self.world_size
        for b in range(self.start_batch, self.batches_per_epoch):
            start = b * self.batch_size + self.rank * local
            yield [(int(i), self.epoch) for i in perm[start : start + local]]


class RunBatchSampler:
    """Every epoch's :class:`EpochBatchSampler` batches, one epoch after the other, from a resume position.

    One DataLoader iterates over the whole run, so its worker processes start once instead of once per epoch.

    Parameters
    ----------
    n, batch_size, seed, rank, world_size
        As for :class:`EpochBatchSampler`.
    start_epoch, start_batch
        Where to begin (0, 0 for a new run).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        start_epoch: int = 0,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.args = (n, batch_size, seed, rank, world_size)
        self.start_epoch = start_epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        n, batch_size, seed, rank, world_size = self.args
        epoch, start = self.start_epoch, self.start_batch
        while True:
            sampler = EpochBatchSampler(n, batch_size, epoch, seed, start, rank, world_size)
            if sampler.batches_per_epoch == 0:
                return
            yield from sampler
            epoch, start = epoch + 1, 0


def default_train_workers(device: torch.device, n_items: int) -> int:
    """Decoding workers: none for small sets or 1-2 core machines, all but two cores (at most 12) next to a GPU,
    half the cores on a CPU-only machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n_items < 256 or cores <= 2:
        return 0
    if device.type == "cuda":  # leave two cores to the training process (kernel launches, pinning)
        return max(1, min(cores - 2, 12))
    return max(1, cores // 2)


def make_loader(
    dataset: PairDataset,
    sampler: EpochBatchSampler | RunBatchSampler | list[list[tuple[int, int]]],
    *,
    num_workers: int,
    pin_memory: bool,
    seed: int,
    collate_fn: Any = None,
) -> DataLoader:
    """A DataLoader over ``dataset`` in ``sampler``'s order (its own generator: the global RNG is untouched)."""
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["prefetch_factor"] = 4
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn or collate_pairs,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
