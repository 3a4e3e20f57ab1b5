"""Embedding posts: batched image and text encoding with a resumable, content-keyed cache.

``embed_posts(posts, model, store=...)`` finds which images and texts already have vectors in the store,
encodes only the rest (images decoded in DataLoader worker processes, texts tokenized in batches), writes
them in parts as it goes, and returns an :class:`Embeddings` aligned with the posts. Interrupt it at any
point and run it again: finished parts are reused, nothing half-written is read back.

Under ``torchrun`` (or any initialised ``torch.distributed`` process group) each rank encodes a disjoint
share of the missing images and texts into the same store, then every rank reads the merged result.

Two independent processes (two notebooks, two jobs) embedding into the same store do not duplicate work or
damage the store: the second waits for the store's writer lock, with a message naming the first, then finds
what the first stored and encodes only what is still missing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ._io import blake2b_hex, default_cache_dir
from .images import ImageDecodeError, load_image
from .models import ClipModel
from .posts import Posts
from .store import EmbeddingStore

log = logging.getLogger(__name__)

__all__ = ["Embeddings", "embed_posts", "encode_images", "encode_texts"]


def _tqdm(*args: Any, **kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(*args, **kwargs)


# --------------------------------------------------------------------------------------------- low level
@torch.no_grad()
def encode_texts(
    model: ClipModel, texts: Sequence[str], *, batch_size: int = 256, show_progress: bool = False
) -> np.ndarray:
    """Encode texts to L2-normalised vectors.

    Texts longer than the model's context are truncated (count them with ``model.count_truncated``).

    Parameters
    ----------
    model
        The model.
    texts
        Texts to encode.
    batch_size
        Texts per forward pass.
    show_progress
        Show a progress bar.

    Returns
    -------
    numpy.ndarray
        ``len(texts) x embed_dim`` float32, rows of unit length.
    """
    out = np.zeros((len(texts), model.embed_dim), dtype=np.float32)
    starts = range(0, len(texts), batch_size)
    it = _tqdm(starts, desc="texts", unit="batch", disable=not show_progress)
    for start in it:
        batch = list(texts[start : start + batch_size])
        tokens = model.tokenize(batch).to(model.device)
        with model.autocast():
            feats = model.model.encode_text(tokens)
        out[start : start + len(batch)] = _normalise(feats)
    return out


@torch.no_grad()
def encode_images(
    model: ClipModel,
    images: Sequence[Any] | torch.Tensor,
    *,
    batch_size: int = 64,
    show_progress: bool = False,
) -> np.ndarray:
    """Encode images to L2-normalised vectors.

    Parameters
    ----------
    model
        The model.
    images
        PIL images, paths/bytes (decoded safely), or an already preprocessed ``N x C x H x W`` tensor.
    batch_size
        Images per forward pass.
    show_progress
        Show a progress bar.

    Returns
    -------
    numpy.ndarray
        ``N x embed_dim`` float32, rows of unit length.

    Raises
    ------
    ImageDecodeError
        When a path or bytes input cannot be decoded (use :func:`embed_posts` to collect failures instead).
    """
    n = len(images)
    out = np.zeros((n, model.embed_dim), dtype=np.float32)
    it = _tqdm(range(0, n, batch_size), desc="images", unit="batch", disable=not show_progress)
    for start in it:
        chunk = images[start : start + batch_size]
        if isinstance(chunk, torch.Tensor):
            pixels = chunk
        else:
            pixels = torch.stack([model.preprocess(_as_pil(img, model.image_size)) for img in chunk])
        out[start : start + len(pixels)] = _forward_images(model, pixels)
    return out


def _as_pil(img: Any, target: int) -> Any:
    from PIL import Image

    if isinstance(img, Image.Image):
        return img.convert("RGB") if img.mode != "RGB" else img
    return load_image(img, target_size=target)


@torch.no_grad()
def _forward_images(model: ClipModel, pixels: torch.Tensor) -> np.ndarray:
    pixels = pixels.to(model.device, non_blocking=True)
    if model.device.type == "cuda":
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    with model.autocast():
        feats = model.model.encode_image(pixels)
    return _normalise(feats)


def _normalise(feats: torch.Tensor) -> np.ndarray:
    feats = feats.detach().float()
    feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return feats.cpu().numpy()


# --------------------------------------------------------------------------------------------- dataset
class _ImageDataset(Dataset):
    """Decodes and preprocesses images in worker processes; a failure is returned, never raised."""

    def __init__(self, sources: list[Any], preprocess: Any, target_size: int) -> None:
        self.sources = sources
        self.preprocess = preprocess
        self.target_size = target_size
        self._blank: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        try:
            img = load_image(self.sources[i], target_size=self.target_size)
            return i, self.preprocess(img), ""
        except ImageDecodeError as exc:
            reason = f"{exc.reason}: {exc}"
        except Exception as exc:
            reason = f"corrupt_image: {type(exc).__name__}: {exc}"
        if self._blank is None:
            self._blank = torch.zeros(3, self.target_size, self.target_size)
        return i, self._blank, reason


def _collate(batch: list[tuple[int, torch.Tensor, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    idx = torch.tensor([b[0] for b in batch], dtype=torch.long)
    pixels = torch.stack([b[1] for b in batch])
    return idx, pixels, [b[2] for b in batch]


def default_num_workers(device: torch.device, n_items: int) -> int:
    """DataLoader workers: none for tiny jobs, most cores on GPU machines, half of them on CPU-only ones."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n_items < 64 or cores <= 1:
        return 0
    if device.type == "cuda":
        return max(1, min(cores - 1, 16))
    return max(1, cores // 2)


# --------------------------------------------------------------------------------------------- result
@dataclass
class Embeddings:
    """Image and text vectors aligned with the rows of ``posts``.

    Attributes
    ----------
    posts
        The posts that were embedded (rows whose image failed to decode are moved to ``rejects``).
    image, text
        ``N x D`` float32, L2-normalised, row ``i`` belongs to ``posts.table[i]``.
    model_fingerprint, model_spec
        Which model made them.
    rejects
        Posts dropped during embedding (``post_id``, ``row``, ``column``, ``reason``, ``detail``).
    stats
        Counts: images/texts encoded now, reused from the store, rejected, truncated texts.
    """

    posts: Posts
    image: np.ndarray
    text: np.ndarray
    model_fingerprint: str
    model_spec: str
    rejects: pl.DataFrame
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def post_ids(self) -> list[str]:
        """Post ids in row order."""
        return self.posts.table["post_id"].to_list()

    @property
    def image_keys(self) -> np.ndarray:
        """Image content keys in row order (posts that share an image share a key)."""
        return self.posts.table["image_key"].to_numpy()

    @property
    def fingerprint(self) -> str:
        """Identity of these vectors: model fingerprint + the posts' content keys."""
        t = self.posts.table
        rows = (t["post_id"] + "\t" + t["image_key"] + "\t" + t["text_key"]).to_list()
        return blake2b_hex(self.model_fingerprint + "\n" + "\n".join(rows))

    def __len__(self) -> int:
        return len(self.posts)

    def summary(self) -> str:
        """One paragraph: how many posts, what was encoded now, reused, rejected, truncated."""
        s = self.stats
        return (
            f"{len(self)} posts embedded with {self.model_spec} ({self.model_fingerprint[:12]}): "
            f"{s.get('images_encoded', 0)} images and {s.get('texts_encoded', 0)} texts encoded now, "
            f"{s.get('images_reused', 0)} images and {s.get('texts_reused', 0)} texts reused from the cache, "
            f"{len(self.rejects)} posts rejected, {s.get('texts_truncated', 0)} texts truncated to "
            f"{s.get('context_length', '?')} tokens."
        )

    def to_frame(self) -> pl.DataFrame:
        """One row per embedded post: ``post_id``, the two vectors, the store keys, then the posts' own columns.

        Returns
        -------
        polars.DataFrame
            ``post_id``; ``image_embedding`` and ``text_embedding`` as fixed-size float32 arrays (Arrow
            ``fixed_size_list<float32>[D]``, L2-normalised); ``image_key`` and ``text_key`` (the content keys the
            embedding store files vectors under); then every other column of ``posts.table`` except the raw
            ``image_bytes`` (``image`` still says where the image came from). This is the frame
            :meth:`write_parquet` writes (``ccclip embed``'s ``embeddings.parquet``).
        """
        d = self.image.shape[1] if self.image.ndim == 2 else 0
        t = self.posts.table
        lead = ["post_id", "image_embedding", "text_embedding", "image_key", "text_key"]
        rest = [c for c in t.columns if c not in lead and c not in PER_POST_DROPPED]
        return t.with_columns(
            pl.Series("image_embedding", np.asarray(self.image, np.float32), dtype=pl.Array(pl.Float32, d)),
            pl.Series("text_embedding", np.asarray(self.text, np.float32), dtype=pl.Array(pl.Float32, d)),
        ).select([*lead, *rest])

    def write_parquet(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_frame` to a Parquet file atomically (temporary file, then rename).

        Any Parquet reader opens it without the toolkit (polars, pandas with pyarrow, DuckDB, Spark); the
        file's key-value metadata records ``ccclip.model_spec``, ``ccclip.model_fingerprint`` and
        ``ccclip.dim``.

        Parameters
        ----------
        path
            Destination, e.g. ``runs/emb/embeddings.parquet``.

        Returns
        -------
        Path
            The written path.
        """
        import pyarrow.parquet as pq

        from ._io import atomic_file

        # the oldest Arrow layout (large_string, not string_view) that every Parquet reader understands
        table = self.to_frame().to_arrow(compat_level=pl.CompatLevel.oldest())
        meta = dict(table.schema.metadata or {})
        meta.update(
            {
                b"ccclip.model_spec": str(self.model_spec).encode(),
                b"ccclip.model_fingerprint": str(self.model_fingerprint).encode(),
                b"ccclip.dim": str(self.image.shape[1] if self.image.ndim == 2 else 0).encode(),
            }
        )
        with atomic_file(path) as f:
            pq.write_table(table.replace_schema_metadata(meta), f, compression="zstd")
        return Path(path)


#: Posts columns left out of the per-post frame: raw image bytes belong in the source, not beside vectors.
PER_POST_DROPPED = ("image_bytes",)


# --------------------------------------------------------------------------------------------- driver
def _dist_info() -> tuple[int, int]:
    from .distributed import dist_info

    info = dist_info()
    return info.rank, info.world_size


def _barrier() -> None:
    from .distributed import barrier

    barrier()


def _chunks(seq: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def embed_posts(
    posts: Posts,
    model: ClipModel,
    *,
    store: str | os.PathLike[str] | EmbeddingStore | None = None,
    batch_size: int | None = None,
    text_batch_size: int = 256,
    num_workers: int | None = None,
    part_size: int = 2048,
    show_progress: bool = True,
    decode: str = "auto",
    lock_timeout: float | None = None,
) -> Embeddings:
    """Embed every post's image and text, reusing and filling an on-disk store.

    Parameters
    ----------
    posts
        From :func:`ccclip_widgets.read_posts`.
    model
        From :func:`ccclip_widgets.load_model`.
    store
        Store root folder (default: ``~/.cache/ccclip_widgets/embeddings``) or an open store.
    batch_size
        Images per forward pass (default 256 on GPU, 32 on CPU).
    text_batch_size
        Texts per forward pass.
    num_workers
        Image-decoding worker processes (default: see :func:`default_num_workers`).
    part_size
        Vectors per stored part: at most this much work is lost when interrupted.
    show_progress
        Show tqdm progress bars (notebook widgets in Jupyter, text in terminals).
    decode
        ``"auto"``: JPEGs are decoded in batches on the GPU (nvJPEG) when the model is on CUDA, else with PIL
        in worker processes; ``"gpu"`` forces the batched pipeline, ``"cpu"`` forces PIL workers
        (see :mod:`ccclip_widgets.gpu_decode`).
    lock_timeout
        Seconds to wait when another process is writing into the same store (``None``: wait until it is done,
        then reuse its vectors). The wait is announced with a logging warning naming that process.

    Returns
    -------
    Embeddings
        Vectors aligned with the posts; posts whose image could not be decoded are in ``rejects``.

    Raises
    ------
    ccclip_widgets.DiskFullError
        The disk filled up; every part written before is intact and is reused by the next run.
    ccclip_widgets.LockTimeout
        Another process kept the store locked for longer than ``lock_timeout``.
    """
    t0 = time.perf_counter()
    rank, world = _dist_info()
    show_progress = show_progress and rank == 0
    if not isinstance(store, EmbeddingStore):
        root = Path(store) if store is not None else default_cache_dir() / "embeddings"
        store = EmbeddingStore.open(
            root,
            model.fingerprint,
            model.embed_dim,
            meta={"model_spec": model.spec, "architecture": model.name},
        )
    table = posts.table
    model.model.eval()

    # Rank 0 holds the store's writer lock for the whole group: another job writing into the same store
    # finishes first (the lock), then every rank decides what is missing from the same snapshot of the store
    # (the barriers around the look-ups), so the shares ``rank::world`` of the missing items are disjoint and
    # cover everything, and nothing another process already stored is encoded again.
    uniq_text = table.select("text_key", "text").unique("text_key", keep="first", maintain_order=True)
    uniq_img = table.select("image_key", "image_path", "image_bytes").unique(
        "image_key", keep="first", maintain_order=True
    )
    lock = (
        store.lock(timeout=lock_timeout, purpose=f"embedding {len(table)} posts into")
        if rank == 0
        else contextlib.nullcontext()
    )
    with lock:
        _barrier()
        have_t = store.has("texts", uniq_text["text_key"].to_list())
        have_i = store.has("images", uniq_img["image_key"].to_list())
        _barrier()
        todo_t = uniq_text.filter(pl.Series(~have_t))
        todo_i = uniq_img.filter(pl.Series(~have_i))
        mine_t = todo_t.gather_every(world, offset=rank) if world > 1 else todo_t
        mine_i = todo_i.gather_every(world, offset=rank) if world > 1 else todo_i
        truncated = model.count_truncated(uniq_text["text"].to_list())

        # ---- texts
        if len(mine_t):
            bar = _tqdm(total=len(mine_t), desc="embedding texts", unit="text", disable=not show_progress)
            for part in _chunks(mine_t, part_size):
                vecs = encode_texts(model, part["text"].to_list(), batch_size=text_batch_size)
                store.write_part("texts", part["text_key"].to_list(), vecs)
                bar.update(len(part))
            bar.close()

        # ---- images
        failures: dict[str, str] = {}
        if len(mine_i):
            failures = _embed_images(
                model, mine_i, store, batch_size, num_workers, part_size, show_progress, decode
            )
        _barrier()
    if world > 1:
        failures = _gather_failures(failures)

    # ---- assemble
    bad_mask = np.fromiter(
        (k in failures for k in table["image_key"].to_list()), dtype=bool, count=len(table)
    )
    good = table.filter(pl.Series(~bad_mask))
    missing_img = ~store.has("images", good["image_key"].to_list())
    if missing_img.any():  # another rank failed to write, or a part was corrupted meanwhile
        raise RuntimeError(
            f"{int(missing_img.sum())} image vectors are missing from {store.path}; run again."
        )
    image = store.get("images", good["image_key"].to_list())
    text = store.get("texts", good["text_key"].to_list())
    bad = table.filter(pl.Series(bad_mask))
    rejects = pl.DataFrame(
        {
            "post_id": bad["post_id"],
            "row": bad["row"].cast(pl.Int64),
            "column": pl.Series(["image"] * len(bad), dtype=pl.String),
            "reason": pl.Series([failures[k].split(":", 1)[0] for k in bad["image_key"]], dtype=pl.String),
            "detail": pl.Series([failures[k] for k in bad["image_key"]], dtype=pl.String),
        },
        schema={
            "post_id": pl.String,
            "row": pl.Int64,
            "column": pl.String,
            "reason": pl.String,
            "detail": pl.String,
        },
    )
    if len(rejects):
        log.warning("%d posts rejected while embedding (images that failed to decode)", len(rejects))
    kept_posts = Posts(
        table=good,
        rejects=pl.concat([posts.rejects, rejects], how="diagonal_relaxed")
        if len(rejects)
        else posts.rejects,
        image_root=posts.image_root,
        source=posts.source,
    )
    stats = {
        "posts": len(table),
        "images_encoded": int(len(todo_i)) - len(failures),
        "images_reused": int(have_i.sum()),
        "texts_encoded": int(len(todo_t)),
        "texts_reused": int(have_t.sum()),
        "images_failed": len(failures),
        "texts_truncated": int(truncated),
        "context_length": model.context_length,
        "seconds": round(time.perf_counter() - t0, 3),
        "world_size": world,
    }
    return Embeddings(
        posts=kept_posts,
        image=image,
        text=text,
        model_fingerprint=model.fingerprint,
        model_spec=model.spec,
        rejects=rejects,
        stats=stats,
    )


def _gather_failures(failures: dict[str, str]) -> dict[str, str]:
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, failures)
    merged: dict[str, str] = {}
    for g in gathered:
        merged.update(g or {})
    return merged


def _embed_images(
    model: ClipModel,
    todo: pl.DataFrame,
    store: EmbeddingStore,
    batch_size: int | None,
    num_workers: int | None,
    part_size: int,
    show_progress: bool,
    decode: str = "auto",
) -> dict[str, str]:
    sources: list[Any] = [
        p if p is not None else b for p, b in zip(todo["image_path"].to_list(), todo["image_bytes"].to_list())
    ]
    keys = todo["image_key"].to_list()
    if batch_size is None:
        batch_size = 256 if model.device.type == "cuda" else 32
    workers = default_num_workers(model.device, len(sources)) if num_workers is None else num_workers
    from .gpu_decode import iter_decoded_batches, use_device_decode

    if use_device_decode(decode, model.device):
        loader: Any = iter_decoded_batches(model, sources, batch_size=batch_size, num_workers=workers)
    else:
        loader = DataLoader(
            _ImageDataset(sources, model.preprocess, model.image_size),
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=model.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
        )
    failures: dict[str, str] = {}
    buf_keys: list[str] = []
    buf_vecs: list[np.ndarray] = []
    bar = _tqdm(total=len(sources), desc="embedding images", unit="img", disable=not show_progress)
    n_buf = 0
    for idx, pixels, errors in loader:
        ok = np.array([not e for e in errors], dtype=bool)
        for i, e in zip(idx.tolist(), errors):
            if e:
                failures[keys[i]] = e
        if ok.any():
            vecs = _forward_images(model, pixels[torch.from_numpy(ok).to(pixels.device)])
            buf_keys.extend(keys[i] for i, good in zip(idx.tolist(), ok) if good)
            buf_vecs.append(vecs)
            n_buf += len(vecs)
        bar.update(len(idx))
        if n_buf >= part_size:
            store.write_part("images", buf_keys, np.concatenate(buf_vecs))
            buf_keys, buf_vecs, n_buf = [], [], 0
    if buf_keys:
        store.write_part("images", buf_keys, np.concatenate(buf_vecs))
    bar.close()
    return failures
