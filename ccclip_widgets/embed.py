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
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ._io import default_cache_dir
from .embeddings import Embeddings
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
        feats = _text_features(model, model.tokenize(batch), batch_size)
        out[start : start + len(batch)] = torch.cat(feats).cpu().numpy()
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


def _forward_images(model: ClipModel, pixels: torch.Tensor) -> np.ndarray:
    return _image_features(model, pixels).cpu().numpy()


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


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_num_workers(
    device: torch.device, n_items: int, *, device_decode: bool = False, cores: int | None = None
) -> int:
    """Image workers: none for tiny jobs; for PIL decoding most cores on GPU machines and half of them on
    CPU-only ones; for the batched device decoder (:mod:`~ccclip_widgets.gpu_decode`) two.

    The device decoder's workers only read files and check headers while one thread in the main process decodes
    on the GPU, so more readers only compete with that thread for the host: measured on one H100 with 16 cores
    (8,192 JPEGs of 400 x 300 px), 2 / 4 / 8 / 15 readers gave 9,116 / 7,948 / 7,732 / 5,338 images/s.

    Parameters
    ----------
    device
        The model's device.
    n_items
        Images to decode.
    device_decode
        Whether the batched device decoder is used.
    cores
        Usable cores (default: this process's CPU affinity).

    Returns
    -------
    int
    """
    cores = _usable_cores() if cores is None else cores
    if n_items < 64 or cores <= 1:
        return 0
    if device_decode:
        return min(2, cores - 1)
    if device.type == "cuda":
        return max(1, min(cores - 1, 16))
    return max(1, cores // 2)


def default_text_workers(
    device: torch.device, n_texts: int, image_workers: int, *, cores: int | None = None
) -> int:
    """Tokenizer worker processes beside ``image_workers``: none on CPU-only machines or for few texts.

    On a CPU device the cores are busy with the model (and the image workers), so texts are tokenized in the
    main process, batch by batch, between forward passes. Next to a GPU the main process must only launch work:
    open_clip's ``SimpleTokenizer`` is pure Python (about 5,000-8,000 texts/s per process, holding the GIL), so
    up to 4 worker processes tokenize while the images decode, from the cores the image workers leave
    (at least one).

    Parameters
    ----------
    device
        The model's device.
    n_texts
        Texts to tokenize (and count for truncation).
    image_workers
        Worker processes the image pipeline uses.
    cores
        Usable cores (default: this process's CPU affinity).

    Returns
    -------
    int
    """
    cores = _usable_cores() if cores is None else cores
    if device.type != "cuda" or n_texts < 2048 or cores <= 2:
        return 0
    return max(1, min(4, cores - 2 - image_workers))


class _TextChunks(Dataset):
    """Chunks of unique texts: tokenized (only those to encode) and counted for truncation in one pass.

    Item ``k`` is ``(k, tokens, n_truncated)``: ``tokens`` holds the chunk's texts that need vectors, in order
    (``0 x context`` when none do), ``n_truncated`` counts every text of the chunk that is cut.
    """

    def __init__(self, chunks: list[tuple[list[str], int]], model: ClipModel) -> None:
        self.chunks = chunks  # (texts, how many of the first ones need vectors)
        self.tokenizer = model.tokenizer
        self.context_length = model.context_length

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor, int]:
        from .models import count_truncated, tokenize_counting

        texts, n_encode = self.chunks[k]
        if n_encode == len(texts):
            tokens, n_cut = tokenize_counting(self.tokenizer, texts, self.context_length)
            return k, tokens, n_cut
        if n_encode:
            tokens, n_cut = tokenize_counting(self.tokenizer, texts[:n_encode], self.context_length)
        else:
            tokens, n_cut = torch.zeros((0, self.context_length), dtype=torch.long), 0
        n_cut += count_truncated(self.tokenizer, texts[n_encode:], self.context_length)
        return k, tokens, n_cut


def _text_chunks(encode: list[str], count_only: list[str], size: int) -> list[tuple[list[str], int]]:
    """Texts to encode in chunks of ``size``, then texts only to count (already stored) in chunks of ``4 size``."""
    chunks = [(encode[s : s + size], len(encode[s : s + size])) for s in range(0, len(encode), size)]
    step = 4 * size
    chunks += [(count_only[s : s + step], 0) for s in range(0, len(count_only), step)]
    return chunks


# --------------------------------------------------------------------------------------------- driver
def _dist_info() -> tuple[int, int]:
    from .distributed import dist_info

    info = dist_info()
    return info.rank, info.world_size


def _barrier() -> None:
    from .distributed import barrier

    barrier()


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
        mine_keys = set(mine_t["text_key"].to_list())
        count_only = uniq_text.filter(~pl.col("text_key").is_in(list(mine_keys)))["text"].to_list()
        failures, truncated = _embed_streams(
            model,
            mine_t,
            count_only,
            mine_i,
            store,
            batch_size=batch_size,
            text_batch_size=text_batch_size,
            num_workers=num_workers,
            part_size=part_size,
            show_progress=show_progress,
            decode=decode,
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


#: Device types whose embedding loop hands store parts to a background writer thread (see :class:`_PartWriter`).
BACKGROUND_WRITE_DEVICES: frozenset[str] = frozenset({"cuda"})


class _PartWriter:
    """Collects vectors (on the model's device) and writes them to the store in parts of ``part_size``.

    Vectors stay on the device until a part is full. The part is then copied to the host without blocking (into
    pinned memory on CUDA) and written by ``writer``, a single background thread shared by the text and image
    parts: the loop neither waits for the device nor for the disk, and the parts still land in order.
    :meth:`close` waits for every write and re-raises the first failure.
    """

    def __init__(
        self, store: EmbeddingStore, kind: str, part_size: int, writer: ThreadPoolExecutor | None = None
    ) -> None:
        self.store, self.kind, self.part_size, self.writer = store, kind, part_size, writer
        self.keys: list[str] = []
        self.vecs: list[torch.Tensor] = []
        self.n = 0
        self.pending: list[Future] = []

    def add(self, keys: list[str], vecs: torch.Tensor) -> None:
        self.keys.extend(keys)
        self.vecs.append(vecs)
        self.n += len(keys)
        if self.n >= self.part_size:
            self.flush()

    def flush(self) -> None:
        if self.keys:
            vecs = torch.cat(self.vecs)
            if self.writer is None:
                self.store.write_part(self.kind, self.keys, vecs.cpu().numpy())  # waits for the device
            else:
                host, ready = _to_host_async(vecs)
                self.pending.append(self.writer.submit(self._write, self.keys, host, ready))
        self.keys, self.vecs, self.n = [], [], 0

    def _write(self, keys: list[str], host: torch.Tensor, ready: Any) -> None:
        if ready is not None:
            ready.synchronize()  # the copy to the host has landed
        self.store.write_part(self.kind, keys, host.numpy())

    def close(self) -> None:
        """Flush what is left, then wait for every part this writer handed to the background thread."""
        self.flush()
        pending, self.pending = self.pending, []
        for fut in pending:
            fut.result()


def _to_host_async(vecs: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """A host copy of ``vecs`` started without waiting: pinned memory and a CUDA event on CUDA."""
    if vecs.device.type != "cuda":
        return vecs.detach().cpu(), None
    host = torch.empty(vecs.shape, dtype=vecs.dtype, pin_memory=True)
    host.copy_(vecs, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


@torch.no_grad()
def _image_features(model: ClipModel, pixels: torch.Tensor) -> torch.Tensor:
    """Unit-length image vectors (float32, on the model's device: no host sync)."""
    pixels = pixels.to(model.device, non_blocking=True)
    if model.device.type == "cuda":
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    with model.autocast():
        feats = model.model.encode_image(pixels)
    return torch.nn.functional.normalize(feats.float(), dim=-1)


@torch.no_grad()
def _text_features(model: ClipModel, tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Unit-length text vectors (float32, on the model's device) in forward passes of ``batch_size``."""
    out = []
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start : start + batch_size].to(model.device, non_blocking=True)
        with model.autocast():
            feats = model.model.encode_text(chunk)
        out.append(torch.nn.functional.normalize(feats.float(), dim=-1))
    return out


def _image_batches(
    model: ClipModel,
    sources: list[Any],
    batch_size: int,
    workers: int,
    device_decode: bool,
) -> Iterable[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    from .gpu_decode import iter_decoded_batches

    if device_decode:
        return iter_decoded_batches(model, sources, batch_size=batch_size, num_workers=workers)
    return DataLoader(
        _ImageDataset(sources, model.preprocess, model.image_size),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=model.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def _embed_streams(
    model: ClipModel,
    todo_t: pl.DataFrame,
    count_only: list[str],
    todo_i: pl.DataFrame,
    store: EmbeddingStore,
    *,
    batch_size: int | None,
    text_batch_size: int,
    num_workers: int | None,
    part_size: int,
    show_progress: bool,
    decode: str = "auto",
    text_workers: int | None = None,
) -> tuple[dict[str, str], int]:
    """Encode texts and images in one loop, the two input pipelines running side by side.

    Images come from their pipeline (PIL in workers, or read by workers and decoded on the device), texts from a
    second DataLoader whose workers tokenize chunks and count truncated texts in the same pass (in the main
    process when it has no workers). After each image batch the loop takes text chunks until the share of
    chunks done catches up with the share of images done, so both streams end together; it launches their
    forward passes, and vectors stay on the device until a store part is full (then :class:`_PartWriter`).

    Returns
    -------
    failures : dict
        ``image_key -> "<reason>: <message>"`` for images that could not be decoded.
    truncated : int
        Texts (of ``todo_t`` and ``count_only``) longer than the context.
    """
    from .gpu_decode import use_device_decode

    device = model.device
    cuda = device.type == "cuda"
    if batch_size is None:
        batch_size = 256 if cuda else 32
    device_decode = bool(len(todo_i)) and use_device_decode(decode, device)
    img_workers = (
        default_num_workers(device, len(todo_i), device_decode=device_decode)
        if num_workers is None
        else num_workers
    )
    encode = todo_t["text"].to_list()
    text_keys = todo_t["text_key"].to_list()
    chunks = _text_chunks(encode, count_only, text_batch_size)
    if text_workers is None:
        text_workers = default_text_workers(device, len(encode) + len(count_only), img_workers)
    text_workers = min(text_workers, len(chunks))
    text_loader = DataLoader(
        _TextChunks(chunks, model),
        batch_size=None,
        shuffle=False,
        num_workers=text_workers,
        pin_memory=cuda,
        prefetch_factor=4 if text_workers else None,
    )
    sources: list[Any] = [
        p if p is not None else b
        for p, b in zip(todo_i["image_path"].to_list(), todo_i["image_bytes"].to_list())
    ]
    img_keys = todo_i["image_key"].to_list()
    images: Any = (
        iter(_image_batches(model, sources, batch_size, img_workers, device_decode)) if sources else iter(())
    )
    texts: Any = iter(text_loader)
    failures: dict[str, str] = {}
    truncated = 0
    # next to a GPU the parts are written by a background thread (the loop must only launch work); on a CPU
    # that thread would compete with the model for the same cores, so parts are written in the loop
    background = device.type in BACKGROUND_WRITE_DEVICES
    writer = (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="ccclip-store-writer") if background else None
    )
    text_parts = _PartWriter(store, "texts", part_size, writer)
    image_parts = _PartWriter(store, "images", part_size, writer)
    bar_t = _tqdm(
        total=len(encode), desc="embedding texts", unit="text", disable=not show_progress or not encode
    )
    bar_i = _tqdm(
        total=len(sources), desc="embedding images", unit="img", disable=not show_progress or not sources
    )
    text_starts = np.cumsum([0] + [n for _, n in chunks])
    n_images, n_chunks = max(1, len(sources)), max(1, len(chunks))
    images_done = chunks_done = 0
    try:
        while images is not None or texts is not None:
            if images is not None:
                batch = next(images, None)
                if batch is None:
                    images = None
                else:
                    idx, pixels, errors = batch
                    rows = idx.tolist()
                    bad = [k for k, e in enumerate(errors) if e]
                    for k in bad:
                        failures[img_keys[rows[k]]] = errors[k]
                    if len(bad) < len(rows):
                        if bad:
                            keep = [k for k, e in enumerate(errors) if not e]
                            sel = torch.tensor(keep, dtype=torch.long).to(pixels.device, non_blocking=True)
                            pixels = pixels.index_select(0, sel)
                            rows = [rows[k] for k in keep]
                        image_parts.add([img_keys[r] for r in rows], _image_features(model, pixels))
                    bar_i.update(len(errors))
                    images_done += len(errors)
            # take text chunks until their share done catches up with the images' share, so that both streams
            # end together instead of the texts running alone after the last image
            while texts is not None and (images is None or chunks_done / n_chunks <= images_done / n_images):
                item = next(texts, None)
                if item is None:
                    texts = None
                    break
                chunks_done += 1
                k, tokens, n_cut = item
                truncated += int(n_cut)
                if len(tokens):
                    start = int(text_starts[k])
                    feats = _text_features(model, tokens, text_batch_size)
                    text_parts.add(text_keys[start : start + len(tokens)], torch.cat(feats))
                    bar_t.update(len(tokens))
        text_parts.close()
        image_parts.close()
    finally:
        if writer is not None:
            writer.shutdown(wait=True)  # parts already handed over are written, also when the loop failed
        bar_t.close()
        bar_i.close()
    return failures, truncated
