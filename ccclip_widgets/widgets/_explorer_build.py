"""Building what the Explorer shows: posts embedded, one neighbor index and one map per model.

Thin calls into the backend (:func:`ccclip_widgets.embed_posts`, :meth:`NeighborIndex.build
<ccclip_widgets.neighbors.NeighborIndex.build>`, :func:`ccclip_widgets.projection.project_posts`), each wrapped in
a named phase of a progress reporter so a view can show where a slow first run stands; plus the checks that the
given indexes, coordinates and second model line up with the posts. No widget library here.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

if TYPE_CHECKING:  # pragma: no cover
    from ..embed import Embeddings
    from ..models import ClipModel
    from ..neighbors import NeighborIndex

log = logging.getLogger(__name__)

__all__ = ["LogProgress", "MapData", "build_maps", "load_and_embed"]


@dataclass
class MapData:
    """One model's view of the posts: its index, map layout, model (for search) and current result lists."""

    label: str
    index: NeighborIndex
    coords: np.ndarray  # N x 2 float32, row-aligned with the posts
    model: ClipModel | None
    neighbors: pl.DataFrame | None = None
    search: pl.DataFrame | None = None


class LogProgress:
    """Default progress reporter: each phase becomes a log line with its duration."""

    @contextlib.contextmanager
    def phase(self, text: str) -> Iterator[None]:
        t0 = time.perf_counter()
        log.info("%s ...", text)
        yield
        log.info("%s: done in %.1f s", text, time.perf_counter() - t0)

    def done(self, text: str = "") -> None:
        """Called once when everything is built."""


def load_and_embed(
    posts: Any,
    model: Any,
    *,
    compare_model: Any = None,
    store: Any = None,
    image_root: Any = None,
    device: str | None = None,
    allow_random: bool = False,
    show_progress: bool = True,
    progress: Any = None,
) -> tuple[Embeddings, ClipModel, Embeddings | None, ClipModel | None]:
    """Read ``posts`` (a Posts, a path or records), load the model(s) from specs, embed: ``(emb, model,
    compare_emb, compare_model)``."""
    from ..embed import embed_posts
    from ..models import load_model
    from ..posts import Posts, posts_from_records, read_posts

    progress = progress if progress is not None else LogProgress()
    if isinstance(posts, Posts):
        p = posts
    elif isinstance(posts, (list, tuple)):
        p = posts_from_records(list(posts), image_root=image_root)
    else:
        p = read_posts(posts, image_root=image_root)

    def load(spec: Any) -> ClipModel:
        if isinstance(spec, str):
            with progress.phase(f"loading model {spec}"):
                return load_model(spec, device=device, allow_random=allow_random)
        return spec

    m = load(model)
    with progress.phase(f"embedding {len(p):,} posts (cached for next time)"):
        emb = embed_posts(p, m, store=store, show_progress=show_progress)
    cm, cemb = None, None
    if compare_model is not None:
        cm = load(compare_model)
        with progress.phase(f"embedding {len(p):,} posts with the second model"):
            cemb = embed_posts(p, cm, store=store, show_progress=show_progress)
    return emb, m, cemb, cm


def build_maps(
    embeddings: Embeddings,
    *,
    compare: Embeddings | None,
    model: ClipModel | None,
    compare_model: ClipModel | None,
    labels: Any,
    index: NeighborIndex | None,
    compare_index: NeighborIndex | None,
    coords: Any,
    compare_coords: Any,
    projection: str,
    projection_kwargs: dict[str, Any] | None,
    cache: bool,
    show_progress: bool,
    progress: Any,
) -> list[MapData]:
    """One :class:`MapData` per model: given or built index, given or projected (and aligned) coordinates."""
    table = embeddings.posts.table
    n = table.height

    def build_index(image: np.ndarray, text: np.ndarray) -> NeighborIndex:
        from ..neighbors import NeighborIndex

        return NeighborIndex.build(
            table["post_id"].to_list(),
            image,
            text,
            image_keys=table["image_key"].to_numpy(),
            show_progress=show_progress,
        )

    def layout(idx: NeighborIndex, given: Any, fingerprint: str, reference: np.ndarray | None) -> np.ndarray:
        if given is not None:
            return coerce_coords(given, table)
        from .. import projection as proj

        cache_dir = None
        if cache:
            from .._io import default_cache_dir

            cache_dir = default_cache_dir() / "projections"
        xy = proj.project_posts(
            idx,
            kind=projection,
            cache_dir=cache_dir,
            fingerprint=fingerprint if cache_dir is not None else None,
            reference=reference,
            show_progress=show_progress,
            **dict(projection_kwargs or {}),
        )
        return coerce_coords(xy, table)

    lab = list(labels) if labels is not None else [embeddings.model_spec or "model", ""]
    if compare is not None and (labels is None or len(lab) < 2 or not lab[1]):
        lab = [lab[0], compare.model_spec or "compare"]
        if lab[0] == lab[1]:
            lab = [f"{lab[0]} (A)", f"{lab[1]} (B)"]
    _check_model(model, embeddings, "model")
    with progress.phase(f"neighbor index of {n:,} posts"):
        idx = index if index is not None else build_index(embeddings.image, embeddings.text)
    _check_index(idx, table, "index")
    with progress.phase("map of the posts (UMAP; cached for next time)"):
        xy = layout(idx, coords, embeddings.fingerprint, reference=None)
    views = [MapData(str(lab[0]), idx, xy, model)]
    if compare is not None:
        _check_model(compare_model, compare, "compare_model")
        perm = _alignment(table, compare.posts.table)
        img = compare.image if perm is None else compare.image[perm]
        txt = compare.text if perm is None else compare.text[perm]
        with progress.phase("neighbor index of the second model"):
            cidx = compare_index if compare_index is not None else build_index(img, txt)
        _check_index(cidx, table, "compare_index")
        with progress.phase("second map, aligned to the first"):
            cxy = layout(cidx, compare_coords, compare.fingerprint, reference=xy)
        views.append(MapData(str(lab[1]), cidx, cxy, compare_model))
    elif compare_model is not None or compare_index is not None or compare_coords is not None:
        raise ValueError("compare_model, compare_index and compare_coords need compare=Embeddings")

    return views


def _check_model(model: Any, emb: Embeddings, name: str) -> None:
    if model is None:
        return
    fp = getattr(model, "fingerprint", None)
    if fp and emb.model_fingerprint and fp != emb.model_fingerprint:
        log.warning(
            "%s (%s) is not the model that made these embeddings (%s): search results will be meaningless",
            name,
            getattr(model, "spec", "?"),
            emb.model_spec,
        )


def _check_index(index: Any, table: pl.DataFrame, name: str) -> None:
    if index.n != table.height:
        raise ValueError(f"{name} holds {index.n} posts but the embeddings hold {table.height}")
    if not index.post_ids.equals(table["post_id"], check_names=False):
        raise ValueError(f"{name} is not row-aligned with the embeddings' posts (post_id order differs)")


def _alignment(table: pl.DataFrame, other: pl.DataFrame) -> np.ndarray | None:
    """Rows of ``other`` in the order of ``table`` (``None`` when already aligned)."""
    a, b = table["post_id"], other["post_id"]
    if a.len() == b.len() and a.equals(b, check_names=False):
        return None
    if a.len() != b.len() or not a.is_in(b.implode()).all():
        missing = a.filter(~a.is_in(b.implode())).head(3).to_list()
        extra = b.filter(~b.is_in(a.implode())).head(3).to_list()
        raise ValueError(
            "compare must hold the same posts as embeddings "
            f"({a.len()} vs {b.len()}; only in the first: {missing}, only in the second: {extra})"
        )
    pos = pl.DataFrame({"post_id": b, "_pos": np.arange(b.len(), dtype=np.int64)})
    joined = pl.DataFrame({"post_id": a}).join(pos, on="post_id", how="left", maintain_order="left")
    return joined["_pos"].to_numpy()


def coerce_coords(coords: Any, table: pl.DataFrame) -> np.ndarray:
    """``N x 2`` float32 coordinates from an array, a frame (``x``, ``y``; matched by ``post_id``) or a result
    object with ``coords``."""
    n = table.height
    for attr in ("coords", "embedding", "embedding_"):
        if not isinstance(coords, (np.ndarray, pl.DataFrame)) and hasattr(coords, attr):
            coords = getattr(coords, attr)
            break
    if isinstance(coords, pl.DataFrame):
        frame = coords
        if "post_id" in frame.columns:
            frame = table.select("post_id").join(frame, on="post_id", how="left", maintain_order="left")
        cols = ["x", "y"] if {"x", "y"} <= set(frame.columns) else frame.columns[-2:]
        arr = frame.select(cols).to_numpy()
    else:
        arr = np.asarray(coords)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] != n:
        raise ValueError(f"coordinates must be {n} x 2, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("coordinates hold missing or non-finite values")
    return arr


def as_float_column(out: Any, table: pl.DataFrame, name: str) -> np.ndarray:
    """A per-post float32 array from a backend result (array, Series, or frame with ``post_id``)."""
    if isinstance(out, pl.DataFrame):
        if "post_id" in out.columns:
            out = table.select("post_id").join(out, on="post_id", how="left", maintain_order="left")
        col = name if name in out.columns else next(c for c in out.columns if out[c].dtype.is_float())
        out = out[col]
    arr = (out.cast(pl.Float32).to_numpy() if isinstance(out, pl.Series) else np.asarray(out)).astype(
        np.float32
    )
    if arr.shape != (table.height,):
        raise ValueError(f"{name} gave shape {arr.shape} for {table.height} posts")
    return arr
