"""The result of :func:`~ccclip_widgets.embed.embed_posts`: unit vectors aligned with the posts they belong to.

:class:`Embeddings` holds the kept posts, one image and one text vector per post, the posts rejected while
embedding and the run's counts; :meth:`Embeddings.to_frame` and :meth:`Embeddings.write_parquet` give the per-post
table (``embeddings.parquet``) that polars, pandas and DuckDB read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ._io import blake2b_hex
from .posts import Posts

__all__ = ["PER_POST_DROPPED", "Embeddings"]


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
