"""On-disk embedding store: Parquet parts keyed by content, one folder per model fingerprint.

Layout (readable with polars or pyarrow alone)::

    STORE/
      <model fingerprint>/
        manifest.json                      model spec, architecture, dimension, format version
        images/part-<id>-<checksum>.parquet   columns: key (str), vector (fixed-size list<float32>[dim])
        texts/part-<id>-<checksum>.parquet    columns: key (str), vector, truncated (bool)

``key`` is the post table's ``image_key`` (file identity or bytes hash) or ``text_key`` (hash of the text),
so posts that share an image or a caption share one vector, and changing a file or a caption makes a new
key. Parts are only ever added, each written to a temporary name and renamed into place, so an interrupted
run leaves finished parts readable and nothing half-written. The ``<checksum>`` in each part's name is the
BLAKE2b of the file's bytes; a part whose bytes do not match is reported and ignored (its vectors are then
recomputed). Reading everything::

    import polars as pl
    pl.read_parquet("STORE/<fingerprint>/images/*.parquet")

Concurrent use: writers (:func:`~ccclip_widgets.embed.embed_posts`) and :meth:`EmbeddingStore.compact` hold the
store's lock file ``STORE/<fingerprint>/.lock`` exclusively, so a second process waits (with a message naming the
first) and then reuses what the first wrote. Readers need no lock: parts never change once visible, and a part
that disappears under a reader (merged by a compaction) sends it back to the listing, where the merged part is
already in place.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ._io import (
    atomic_write_bytes,
    atomic_write_json,
    blake2b_hex,
    clean_stale_temps,
)
from ._lock import file_lock
from .errors import StoreCorruptionWarning

log = logging.getLogger(__name__)

__all__ = ["EmbeddingStore", "StoreCorruptionWarning"]

FORMAT_VERSION = 1
_PART_RE = re.compile(r"^part-(?P<id>[0-9a-z\-]+)-(?P<sum>[0-9a-f]{32})\.parquet$")
KINDS = ("images", "texts")


LOCK_FILE = ".lock"


@dataclass
class EmbeddingStore:
    """Vectors of one model, stored as content-keyed Parquet parts.

    Parameters
    ----------
    root
        The store's root folder (shared by all models).
    fingerprint
        The model's fingerprint (:attr:`ClipModel.fingerprint`); its vectors live in ``root/fingerprint``.
    dim
        Vector dimension.
    """

    root: Path
    fingerprint: str
    dim: int
    _cache: dict[str, dict[str, int]] = field(default_factory=dict, repr=False)
    _vectors: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _seen_parts: dict[str, set[str]] = field(default_factory=dict, repr=False)
    corrupt_parts: list[Path] = field(default_factory=list, repr=False)

    @classmethod
    def open(
        cls, root: str | os.PathLike[str], fingerprint: str, dim: int, meta: dict[str, Any] | None = None
    ) -> EmbeddingStore:
        """Open (creating if needed) the store folder of one model.

        Parameters
        ----------
        root
            Store root.
        fingerprint
            Model fingerprint.
        dim
            Vector dimension; must match an existing manifest.
        meta
            Extra fields for a new manifest (model spec, architecture).

        Returns
        -------
        EmbeddingStore
        """
        store = cls(Path(root), fingerprint, int(dim))
        store.path.mkdir(parents=True, exist_ok=True)
        for kind in KINDS:
            (store.path / kind).mkdir(exist_ok=True)
        manifest = store.path / "manifest.json"
        existing = None
        if manifest.is_file():
            try:
                existing = json.loads(manifest.read_text("utf-8"))
                if not isinstance(existing, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError) as exc:
                existing = None
                warnings.warn(
                    f"Embedding store manifest {manifest} is damaged ({exc}); it is written again from the model "
                    "(the vectors are in the parts, which carry their own checksums).",
                    StoreCorruptionWarning,
                    stacklevel=2,
                )
            if existing is not None and int(existing.get("dim", dim)) != int(dim):
                raise ValueError(
                    f"Store {store.path} holds {existing['dim']}-d vectors but the model makes {dim}-d vectors; "
                    "the fingerprint collides or the folder was edited by hand. Use another store folder."
                )
        if not manifest.is_file() or existing is None:
            atomic_write_json(
                manifest,
                {
                    "format_version": FORMAT_VERSION,
                    "fingerprint": fingerprint,
                    "dim": int(dim),
                    **(meta or {}),
                },
            )
        return store

    @property
    def path(self) -> Path:
        """Folder holding this model's vectors."""
        return self.root / self.fingerprint

    # ------------------------------------------------------------------------------------------- reading
    def parts(self, kind: str) -> list[Path]:
        """Complete part files of ``kind`` (``"images"`` or ``"texts"``), sorted by name."""
        return sorted(p for p in (self.path / kind).glob("part-*.parquet") if _PART_RE.match(p.name))

    def refresh(self, kind: str) -> None:
        """Read parts written since the last call (by this or another process) into memory."""
        seen = self._seen_parts.setdefault(kind, set())
        index = self._cache.setdefault(kind, {})
        new_frames = []
        for _attempt in range(20):
            vanished = False
            for part in self.parts(kind):
                if part.name in seen:
                    continue
                try:
                    data = part.read_bytes()  # one read: hashed and parsed from the same bytes
                except FileNotFoundError:
                    vanished = True  # merged by a compaction meanwhile: its merged part is already listed
                    continue
                seen.add(part.name)
                expected = _PART_RE.match(part.name).group("sum")  # type: ignore[union-attr]
                if blake2b_hex(data) != expected:
                    self._report_corrupt(part, "checksum mismatch: truncated or altered after it was written")
                    continue
                try:
                    frame = pl.read_parquet(io.BytesIO(data))
                    if frame.columns[:2] != ["key", "vector"]:
                        raise ValueError(f"unexpected columns {frame.columns}")
                except Exception as exc:
                    self._report_corrupt(part, f"unreadable: {exc}")
                    continue
                new_frames.append(frame)
            if not vanished:
                break
        if not new_frames:
            return
        frame = pl.concat([f.select("key", "vector") for f in new_frames])
        vecs = np.asarray(frame["vector"].to_numpy(), dtype=np.float32).reshape(len(frame), self.dim)
        old = self._vectors.get(kind)
        base = 0 if old is None else len(old)
        self._vectors[kind] = vecs if old is None else np.concatenate([old, vecs])
        for i, key in enumerate(frame["key"].to_list()):
            index.setdefault(key, base + i)

    def _report_corrupt(self, part: Path, why: str) -> None:
        self.corrupt_parts.append(part)
        quarantine = part.with_name(part.name + ".corrupt")
        try:
            os.replace(part, quarantine)
        except OSError:
            quarantine = part
        warnings.warn(
            f"Embedding store part {part} is damaged ({why}); it was moved to {quarantine.name} and its vectors "
            "will be recomputed (run embed_posts again). Delete the .corrupt file once you no longer need it.",
            StoreCorruptionWarning,
            stacklevel=3,
        )

    def has(self, kind: str, keys: list[str]) -> np.ndarray:
        """Boolean mask: which ``keys`` already have a vector of ``kind``."""
        self.refresh(kind)
        index = self._cache.get(kind, {})
        return np.fromiter((k in index for k in keys), dtype=bool, count=len(keys))

    def get(self, kind: str, keys: list[str]) -> np.ndarray:
        """Vectors for ``keys`` (float32, ``len(keys) x dim``); raises ``KeyError`` for a missing key."""
        self.refresh(kind)
        index = self._cache.get(kind, {})
        try:
            rows = np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys))
        except KeyError as exc:
            raise KeyError(f"No {kind[:-1]} vector stored for key {exc.args[0]!r}") from None
        if len(rows) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._vectors[kind][rows]

    def count(self, kind: str) -> int:
        """Number of distinct keys stored for ``kind``."""
        self.refresh(kind)
        return len(self._cache.get(kind, {}))

    # ------------------------------------------------------------------------------------------- writing
    def write_part(self, kind: str, keys: list[str], vectors: np.ndarray, **columns: Any) -> Path | None:
        """Add one part atomically (temporary file, then rename to a name carrying its checksum).

        Parameters
        ----------
        kind
            ``"images"`` or ``"texts"``.
        keys
            Content keys, one per row of ``vectors``.
        vectors
            ``len(keys) x dim`` float array.
        **columns
            Extra per-row columns (e.g. ``truncated``).

        Returns
        -------
        Path or None
            The part written (None when ``keys`` is empty).
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        if len(keys) == 0:
            return None
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(keys), self.dim):
            raise ValueError(f"expected {len(keys)} x {self.dim} vectors, got {vectors.shape}")
        frame = pl.DataFrame(
            {
                "key": pl.Series(keys, dtype=pl.String),
                "vector": pl.Series(vectors, dtype=pl.Array(pl.Float32, self.dim)),
                **{k: pl.Series(v) for k, v in columns.items()},
            }
        )
        buf = io.BytesIO()
        frame.write_parquet(buf, compression="zstd", statistics=False)
        data = buf.getvalue()
        checksum = blake2b_hex(data)
        name = f"part-{uuid.uuid4().hex[:12]}-{checksum}.parquet"
        return atomic_write_bytes(self.path / kind / name, data)

    # ------------------------------------------------------------------------------------ concurrency
    @contextlib.contextmanager
    def lock(self, *, timeout: float | None = None, purpose: str = "writing") -> Iterator[None]:
        """Hold the store's writer lock (exclusive, between processes) for the block.

        The first holder in a process also removes temporary files that killed writers left behind (safe then:
        no other writer is active).

        Parameters
        ----------
        timeout
            Seconds to wait when another process holds it (``None``: as long as it takes).
        purpose
            Shown to processes that have to wait.

        Raises
        ------
        ccclip_widgets.LockTimeout
            When the lock stays busy for ``timeout`` seconds.
        """
        with file_lock(self.path / LOCK_FILE, timeout=timeout, purpose=f"{purpose} {self.path}"):
            for kind in KINDS:
                clean_stale_temps(self.path / kind)
            yield

    def compact(self, kind: str, *, timeout: float | None = None) -> None:
        """Merge all parts of ``kind`` into one (fewer files to open); safe to interrupt.

        It holds the writer lock, so it waits for a process that is embedding into the store (and such a
        process waits for it). The merged part is renamed into place before any old part is deleted: a reader
        always finds every vector, and an interrupted compaction leaves at worst duplicates, merged next time.

        Parameters
        ----------
        kind
            ``"images"`` or ``"texts"``.
        timeout
            Seconds to wait for the writer lock.
        """
        with self.lock(timeout=timeout, purpose="compacting"):
            parts = self.parts(kind)
            if len(parts) <= 1:
                return
            self.refresh(kind)
            index = self._cache.get(kind, {})
            if not index:
                return
            keys = list(index)
            vecs = self._vectors[kind][np.fromiter(index.values(), dtype=np.int64, count=len(keys))]
            merged = self.write_part(kind, keys, vecs)
            for p in parts:
                if merged is not None and p.name == merged.name:
                    continue
                p.unlink(missing_ok=True)
            self._seen_parts[kind] = {p.name for p in self.parts(kind)}
