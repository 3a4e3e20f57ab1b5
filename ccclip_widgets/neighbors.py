"""Nearest neighbors over the image and text vectors of posts.

:class:`NeighborIndex` holds one FAISS index per modality over the same posts (row ``i`` of the image vectors and
row ``i`` of the text vectors belong to ``post_ids[i]``) and answers the four cross- and same-modality questions the
explorer asks on a click (image -> texts, text -> images, image -> images, text -> texts), free-vector queries (the
caller encodes a free-text query with its model), batch searches, and the k-nearest-neighbor graph that the UMAP
projection reuses, so that neighbors are searched once and serve both the map and the neighbor panel.

Vectors are expected to be L2-normalized ``float32`` rows; inner product is then cosine similarity. Rows that are not
unit length are normalized (on a copy).

Exact versus approximate search
-------------------------------
Below ``exact_threshold`` posts the index is an exact ``IndexFlatIP``: a single query costs one pass over the
vectors (about 17 ms at 100k x 512 on the 2-core reference machine, but about 200-260 ms at 1M). Above it the
index is approximate. Two candidates were measured at 1M x 512 on the 2-core machine on deliberately hard
clustered synthetic data (``benchmarks/bench_neighbors.py``, where IVF needs a wide probe to reach 0.95 recall):
see :data:`DEFAULT_ANN` for the choice and the figures behind it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import polars as pl

# Kinds, helpers and the graph / persistence halves live in their own modules (issue 12); the names below are
# re-exported so that everything importable from here before the split still is.
from ._neighbors_common import (  # noqa: F401 - re-exported
    _KINDS,
    _PIP_HINT,
    GraphKind,
    Kind,
    _default_nlist,
    _faiss,
    _flat_view,
    _tqdm,
)
from .errors import IndexIntegrityError, LowRecallWarning, MissingDependencyError  # noqa: F401 - re-exported
from .neighbors_graph import (  # noqa: F401 - re-exported
    GRAPH_EXACT_MAX,
    GRAPH_NPROBE,
    _GraphMethods,
    _pynndescent,
    _self_first,
)
from .neighbors_io import _FORMAT_VERSION, _LOCK, _MANIFEST, _PersistenceMethods  # noqa: F401 - re-exported

__all__ = [
    "DEFAULT_ANN",
    "DEFAULT_EXACT_THRESHOLD",
    "IndexIntegrityError",
    "NeighborIndex",
]

#: Posts below this count get an exact ``IndexFlatIP``; at or above it, an approximate index.
#: At 200k x 512 a flat single query costs about 35-40 ms on the 2-core machine, still under the 50 ms p95 target.
DEFAULT_EXACT_THRESHOLD = 200_000

#: Approximate index used above the exact threshold. Measured at 1M x 512 (2 cores, hard clustered data):
#: filled in from ``benchmarks/results``; see the module docstring.
DEFAULT_ANN: Literal["ivf", "hnsw"] = "ivf"

#: A query restricted to at most this many allowed posts (or an eighth of all) scores them exactly; a larger
#: allowed set is over-fetched from the index instead.
FILTER_EXACT_MAX = 50_000


def _unit_rows(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as C-contiguous float32 rows of unit length (copying only when needed)."""
    if hasattr(x, "detach"):  # a torch tensor; imported lazily by the caller, never here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N x D), got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has zero columns")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must hold numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    sq = np.einsum("ij,ij->i", arr, arr)  # no N x D temporary
    if not np.all(np.isfinite(sq)):
        bad = int(np.flatnonzero(~np.isfinite(sq))[0])
        raise ValueError(f"{name} has non-finite values (first bad row: {bad})")
    norms = np.sqrt(sq)
    if arr.shape[0] and np.abs(norms - 1.0).max() > 1e-3:
        arr = arr / np.maximum(norms, 1e-12)[:, None]
    return arr


class NeighborIndex(_GraphMethods, _PersistenceMethods):
    """Nearest-neighbor search over the image and text vectors of the same posts.

    Build it with :meth:`build` or read it back with :meth:`load`; the constructor is internal.

    Attributes
    ----------
    n : int
        Number of posts.
    kinds : tuple of str
        Modalities present (``"image"``, ``"text"``).
    dims : dict
        Vector dimension per modality.
    mode : str
        ``"exact"``, ``"ivf"`` or ``"hnsw"``.
    nprobe : int or None
        IVF lists visited per query (``mode == "ivf"``); settable.
    ef_search : int or None
        HNSW candidate list size per query (``mode == "hnsw"``); settable.
    fingerprint : str or None
        The embedding fingerprint given by the caller, saved in the manifest.
    """

    def __init__(
        self,
        post_ids: pl.Series,
        vectors: dict[str, np.ndarray],
        indexes: dict[str, Any],
        *,
        image_keys: np.ndarray | None,
        mode: str,
        params: dict[str, Any],
        fingerprint: str | None = None,
    ) -> None:
        self._ids = post_ids
        self._vectors = vectors
        self._indexes = indexes
        self._image_keys = image_keys
        self.mode = mode
        self.params = dict(params)
        self.fingerprint = fingerprint
        self._row_of: dict[str, int] | None = None
        self._knn_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._means: dict[str, np.ndarray] = {}
        self._key_codes: np.ndarray | None = None
        self._key_counts: np.ndarray | None = None
        if image_keys is not None:
            _, codes, counts = np.unique(image_keys, return_inverse=True, return_counts=True)
            self._key_codes = codes.reshape(-1).astype(np.int64)
            self._key_counts = counts.astype(np.int64)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        post_ids: Sequence[str],
        image_vectors: Any | None = None,
        text_vectors: Any | None = None,
        *,
        image_keys: Sequence[Any] | None = None,
        exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
        metric: str = "ip",
        ann: Literal["ivf", "hnsw"] = DEFAULT_ANN,
        nlist: int | None = None,
        nprobe: int = 32,
        hnsw_m: int = 32,
        ef_construction: int = 40,
        ef_search: int = 64,
        train_size: int | None = None,
        target_recall: float | None = 0.95,
        seed: int = 0,
        fingerprint: str | None = None,
        show_progress: bool = True,
    ) -> NeighborIndex:
        """Index the image and/or text vectors of ``post_ids``.

        Parameters
        ----------
        post_ids
            One unique id per post; row ``i`` of each vector array belongs to ``post_ids[i]``.
        image_vectors, text_vectors
            ``N x D`` arrays (L2-normalized float32 expected; other rows are normalized on a copy). At least one.
        image_keys
            Optional key per post naming its image (for example a content hash). Posts sharing a key share an
            image: :meth:`image_to_images` excludes the query's own image and, with ``dedupe``, image results list
            each image once.
        exact_threshold
            Exact ``IndexFlatIP`` below this many posts; the approximate index ``ann`` at or above it.
        metric
            ``"ip"`` (inner product; cosine for unit vectors) or its alias ``"cosine"``.
        ann
            ``"ivf"`` (IVF-Flat) or ``"hnsw"`` (HNSW-Flat).
        nlist
            IVF lists; default about ``4 * sqrt(N)`` rounded to a power of two.
        nprobe
            IVF lists visited per query (the starting point of the tuning, see ``target_recall``).
        hnsw_m, ef_construction, ef_search
            HNSW graph degree, build-time and query-time candidate list sizes.
        train_size
            Vectors sampled to train the IVF coarse quantizer (default ``64 * nlist``).
        target_recall
            For an approximate index: after building, raise ``nprobe`` (IVF) or ``ef_search`` (HNSW) until
            recall@10 against exact search reaches this on a sample of the posts' own vectors (same- and
            cross-modality queries), see :meth:`tune`. ``None`` keeps the given values.
        seed
            Seed for the training sample and k-means.
        fingerprint
            Caller's fingerprint of the embeddings (stored, and checked by :meth:`load`).
        show_progress
            Show ``tqdm`` progress bars while adding vectors.

        Returns
        -------
        NeighborIndex
        """
        faiss = _faiss()
        if metric not in ("ip", "cosine"):
            raise ValueError(f"metric must be 'ip' or 'cosine' (vectors are L2-normalized), got {metric!r}")
        if ann not in ("ivf", "hnsw"):
            raise ValueError(f"ann must be 'ivf' or 'hnsw', got {ann!r}")
        ids = pl.Series("post_id", [str(p) for p in post_ids], dtype=pl.String)
        n = len(ids)
        if ids.n_unique() != n:
            dup = ids.filter(ids.is_duplicated()).head(3).to_list()
            raise ValueError(f"post_ids must be unique; repeated: {dup}")
        given = {"image": image_vectors, "text": text_vectors}
        if all(v is None for v in given.values()):
            raise ValueError("give image_vectors, text_vectors, or both")
        keys_arr = None
        if image_keys is not None:
            keys_arr = (
                np.asarray([str(k) for k in image_keys])
                if not isinstance(image_keys, np.ndarray)
                else image_keys
            )
            if len(keys_arr) != n:
                raise ValueError(f"image_keys has {len(keys_arr)} entries for {n} posts")
        mode = "exact" if n < exact_threshold else ann
        nl = min(nlist or _default_nlist(n), max(1, n // 39)) if mode == "ivf" else None
        params: dict[str, Any] = {"metric": "ip", "exact_threshold": exact_threshold, "seed": seed}
        if mode == "ivf":
            params.update(nlist=nl, nprobe=int(nprobe))
        elif mode == "hnsw":
            params.update(hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=int(ef_search))
        bar = _tqdm(show_progress)
        vectors: dict[str, np.ndarray] = {}
        indexes: dict[str, Any] = {}
        for kind in _KINDS:
            raw = given[kind]
            if raw is None:
                continue
            x = _unit_rows(raw, f"{kind}_vectors")
            if x.shape[0] != n:
                raise ValueError(f"{kind}_vectors has {x.shape[0]} rows for {n} post_ids")
            d = x.shape[1]
            if mode == "exact":
                index = faiss.IndexFlatIP(d)
            elif mode == "hnsw":
                index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efConstruction = ef_construction
                index.hnsw.efSearch = int(ef_search)
            else:
                assert nl is not None
                index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nl, faiss.METRIC_INNER_PRODUCT)
                index.cp.niter = 10  # 10 k-means rounds: recall is set by nprobe, not by a polished quantizer
                index.cp.seed = seed
                index.nprobe = int(nprobe)
                m = min(n, train_size or 64 * nl)
                rng = np.random.default_rng(seed)
                sample = x[np.sort(rng.choice(n, m, replace=False))] if m < n else x
                with bar(total=1, desc=f"Training IVF quantizer ({kind}, {nl} lists)", leave=False) as pb:
                    index.train(sample)
                    pb.update(1)
                del sample
            step = 50_000 if mode == "hnsw" else 262_144
            with bar(total=n, desc=f"Indexing {kind} vectors ({mode})", unit="vec", leave=False) as pb:
                for s in range(0, n, step):
                    index.add(x[s : s + step])
                    pb.update(min(step, n - s))
            if mode == "ivf":
                index.make_direct_map()  # lets load() recover the vectors without storing them twice
                vectors[kind] = x
            elif mode == "hnsw":
                vectors[kind] = _flat_view(index.storage, n, d)
            else:
                vectors[kind] = _flat_view(index, n, d)
            indexes[kind] = index
        out = cls(
            ids, vectors, indexes, image_keys=keys_arr, mode=mode, params=params, fingerprint=fingerprint
        )
        if mode != "exact" and target_recall is not None:
            out.tune(target_recall, seed=seed, show_progress=show_progress)
        return out

    # ------------------------------------------------------------------ properties
    @property
    def n(self) -> int:
        """Number of posts."""
        return len(self._ids)

    def __len__(self) -> int:
        return self.n

    @property
    def kinds(self) -> tuple[str, ...]:
        """Modalities indexed, in ``("image", "text")`` order."""
        return tuple(k for k in _KINDS if k in self._indexes)

    @property
    def dims(self) -> dict[str, int]:
        """Vector dimension per modality."""
        return {k: int(v.shape[1]) for k, v in self._vectors.items()}

    @property
    def post_ids(self) -> pl.Series:
        """The post ids, in row order."""
        return self._ids

    @property
    def image_keys(self) -> np.ndarray | None:
        """The image key per post, or ``None``."""
        return self._image_keys

    @property
    def nprobe(self) -> int | None:
        """IVF lists visited per query (``None`` unless ``mode == "ivf"``)."""
        return self.params.get("nprobe")

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self.mode != "ivf":
            raise AttributeError(f"nprobe applies to IVF indexes; this index is {self.mode!r}")
        self.params["nprobe"] = int(value)

    @property
    def ef_search(self) -> int | None:
        """HNSW query-time candidate list size (``None`` unless ``mode == "hnsw"``)."""
        return self.params.get("ef_search")

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        if self.mode != "hnsw":
            raise AttributeError(f"ef_search applies to HNSW indexes; this index is {self.mode!r}")
        self.params["ef_search"] = int(value)

    def vectors(self, kind: Kind) -> np.ndarray:
        """The unit vectors of one modality (``N x D``; a view: do not modify)."""
        self._check_kind(kind)
        return self._vectors[kind]

    def __repr__(self) -> str:
        extra = {k: v for k, v in self.params.items() if k in ("nlist", "nprobe", "hnsw_m", "ef_search")}
        return f"NeighborIndex(n={self.n}, kinds={self.kinds}, dims={self.dims}, mode={self.mode!r}, {extra})"

    # ------------------------------------------------------------------ helpers
    def _check_kind(self, kind: str) -> None:
        if kind not in _KINDS:
            raise ValueError(f"kind must be 'image' or 'text', got {kind!r}")
        if kind not in self._indexes:
            raise ValueError(f"this index holds no {kind} vectors (kinds: {self.kinds})")

    def row(self, i_or_post_id: int | str) -> int:
        """Row number of a post given by row number or ``post_id``."""
        if isinstance(i_or_post_id, str):
            if self._row_of is None:
                self._row_of = {p: i for i, p in enumerate(self._ids.to_list())}
            try:
                return self._row_of[i_or_post_id]
            except KeyError:
                raise KeyError(f"unknown post_id {i_or_post_id!r}") from None
        if isinstance(i_or_post_id, (bool, np.bool_)) or not isinstance(i_or_post_id, (int, np.integer)):
            raise TypeError(f"expected a row number or a post_id string, got {type(i_or_post_id).__name__}")
        i = int(i_or_post_id)
        if not -self.n <= i < self.n:
            raise IndexError(f"row {i} out of range for {self.n} posts")
        return i % self.n

    def _mean(self, kind: str) -> np.ndarray:
        """Mean vector of one modality (cached), for gap-shifted probing."""
        if kind not in self._means:
            x = self._vectors[kind]
            total = np.zeros(x.shape[1], np.float64)
            for s in range(0, x.shape[0], 65_536):
                total += x[s : s + 65_536].sum(axis=0, dtype=np.float64)
            self._means[kind] = (total / max(1, x.shape[0])).astype(np.float32)
        return self._means[kind]

    def _raw(
        self, target: str, queries: np.ndarray, k: int, *, source: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search ``target`` (no exclusions). ``source`` names the queries' modality, for gap-shifted probing."""
        faiss = _faiss()
        index = self._indexes[target]
        kk = max(1, min(int(k), self.n))
        nq = queries.shape[0]
        if self.mode == "ivf":
            nprobe = min(int(self.params["nprobe"]), int(index.nlist))
            params = faiss.SearchParametersIVF(nprobe=nprobe)
            # One query: split its inverted lists over the threads (mode 1); a batch: split the queries (mode 0).
            index.parallel_mode = 1 if nq < faiss.omp_get_max_threads() else 0
            if source is not None and source != target and self.params.get("gap_shift", True):
                # Modality-gap-aware probing: image and text vectors live in two offset cones, so a cross-modal
                # query's best inverted lists are those of the query moved by the gap (mean_target - mean_source).
                # Only the choice of lists uses the moved query; scores are the exact inner products with the
                # original query. Measured recall@10 at 100k, IVF-1024, nprobe=32: 0.944 -> 0.981.
                probe = queries - self._mean(source) + self._mean(target)
                probe /= np.maximum(np.linalg.norm(probe, axis=1, keepdims=True), 1e-12)
                cdist, assign = index.quantizer.search(np.ascontiguousarray(probe, dtype=np.float32), nprobe)
                scores = np.empty((nq, kk), np.float32)
                idx = np.empty((nq, kk), np.int64)
                q = np.ascontiguousarray(queries, dtype=np.float32)
                index.search_preassigned_c(
                    nq,
                    faiss.swig_ptr(q),
                    kk,
                    faiss.swig_ptr(assign),
                    faiss.swig_ptr(cdist),
                    faiss.swig_ptr(scores),
                    faiss.swig_ptr(idx),
                    False,
                    params,
                )
                return scores, idx
            scores, idx = index.search(queries, kk, params=params)
        elif self.mode == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=max(int(self.params["ef_search"]), kk))
            scores, idx = index.search(queries, kk, params=params)
        else:
            scores, idx = index.search(queries, kk)
        return scores.astype(np.float32, copy=False), idx.astype(np.int64, copy=False)

    def _query(
        self,
        vec: np.ndarray,
        target: str,
        k: int,
        *,
        exclude_row: int | None = None,
        exclude_key: int | None = None,
        dedupe: bool = False,
        source: str | None = None,
        allowed: Any = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One query with exclusions; fetch more than ``k`` and widen until ``k`` rows survive the filters.

        ``allowed`` (a boolean mask over the rows, or row numbers) restricts the results to those posts. A small
        allowed set (at most :data:`FILTER_EXACT_MAX` rows or an eighth of the posts) is scored exactly over its
        own vectors; a large one is over-fetched from the index in proportion to how many posts it drops.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        codes = self._key_codes if target == "image" else None
        if codes is None:
            exclude_key, dedupe = None, False
        mask = self._allowed_mask(allowed)
        extra = (exclude_row is not None) + (
            int(self._key_counts[exclude_key])
            if exclude_key is not None and self._key_counts is not None
            else 0
        )

        def keep_filters(s: np.ndarray, ix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            keep = np.ones(len(ix), bool)
            if mask is not None:
                keep &= mask[ix]
            if exclude_row is not None:
                keep &= ix != exclude_row
            if exclude_key is not None:
                assert codes is not None
                keep &= codes[ix] != exclude_key
            s, ix = s[keep], ix[keep]
            if dedupe:
                assert codes is not None
                _, first = np.unique(codes[ix], return_index=True)
                first.sort()
                s, ix = s[first], ix[first]
            return s, ix

        if mask is not None:
            n_allowed = int(mask.sum())
            if n_allowed == 0:
                return np.zeros(0, np.float32), np.zeros(0, np.int64)
            if n_allowed <= max(FILTER_EXACT_MAX, self.n // 8):
                # A small subset: score it exactly (faster than widening an index search, and never misses).
                rows = np.flatnonzero(mask)
                sc = self._vectors[target][rows] @ vec.astype(np.float32, copy=False).reshape(-1)
                order = np.argsort(-sc, kind="stable")
                s, ix = keep_filters(sc[order].astype(np.float32), rows[order].astype(np.int64))
                return s[:k], ix[:k]
            share = n_allowed / self.n
        else:
            share = 1.0
        kk = min(self.n, int(np.ceil((k + extra + (k if dedupe else 0)) / share)))
        q = vec.reshape(1, -1)
        while True:
            scores, idx = self._raw(target, q, kk, source=source)
            s, ix = scores[0], idx[0]
            valid = ix >= 0
            returned = int(valid.sum())
            s, ix = keep_filters(s[valid], ix[valid])
            if len(ix) >= k or kk >= self.n or returned < kk:
                return s[:k], ix[:k]
            kk = min(self.n, 2 * kk)

    def _allowed_mask(self, allowed: Any) -> np.ndarray | None:
        """A boolean row mask from ``allowed`` (``None``, a mask, or row numbers); ``None`` when all pass."""
        if allowed is None:
            return None
        a = np.asarray(allowed)
        if a.dtype == bool:
            if a.shape != (self.n,):
                raise ValueError(f"allowed mask has shape {a.shape}; the index holds {self.n} posts")
            return None if a.all() else a
        mask = np.zeros(self.n, bool)
        mask[a.astype(np.int64).reshape(-1)] = True
        return mask

    def _frame(self, scores: np.ndarray, idx: np.ndarray) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "rank": pl.Series("rank", np.arange(1, len(idx) + 1, dtype=np.int32)),
                "post_id": self._ids.gather(idx) if len(idx) else pl.Series("post_id", [], dtype=pl.String),
                "score": pl.Series("score", scores.astype(np.float32, copy=False)),
                "index": pl.Series("index", idx.astype(np.int64, copy=False)),
            }
        )

    def _by_post(self, source: str, target: str, i_or_post_id: int | str, k: int, **kw: Any) -> pl.DataFrame:
        self._check_kind(source)
        self._check_kind(target)
        r = self.row(i_or_post_id)
        vec = self._vectors[source][r]
        if kw.pop("same_modality", False):
            kw["exclude_row"] = r
            if target == "image" and self._key_codes is not None:
                kw["exclude_key"] = int(self._key_codes[r])
        s, ix = self._query(vec, target, k, source=source, **kw)
        return self._frame(s, ix)

    # ------------------------------------------------------------------ queries
    def image_to_texts(self, i_or_post_id: int | str, k: int = 10, *, allowed: Any = None) -> pl.DataFrame:
        """Texts nearest to a post's image (the post's own text included, so its rank can be read).

        Parameters
        ----------
        i_or_post_id
            Row number or ``post_id`` of the query post.
        k
            Number of results.
        allowed
            Only list these posts: a boolean mask over the rows or row numbers (for example the commentative
            posts in one language). Every query method takes it; the filter runs inside the search, so ``k``
            results come back whenever ``k`` allowed posts exist.

        Returns
        -------
        polars.DataFrame
            Columns ``rank`` (1-based), ``post_id``, ``score`` (float32 cosine), ``index`` (row).
        """
        return self._by_post("image", "text", i_or_post_id, k, allowed=allowed)

    def text_to_images(
        self, i_or_post_id: int | str, k: int = 10, *, dedupe: bool = True, allowed: Any = None
    ) -> pl.DataFrame:
        """Images nearest to a post's text (its own image included).

        With ``image_keys`` and ``dedupe``, each image appears once (its best-ranked post). Columns as in
        :meth:`image_to_texts`.
        """
        return self._by_post("text", "image", i_or_post_id, k, dedupe=dedupe, allowed=allowed)

    def image_to_images(
        self, i_or_post_id: int | str, k: int = 10, *, dedupe: bool = True, allowed: Any = None
    ) -> pl.DataFrame:
        """Images nearest to a post's image, excluding the post itself.

        With ``image_keys``, every post that shares the query's image is excluded too and, with ``dedupe``, each
        other image appears once. Columns as in :meth:`image_to_texts`.
        """
        return self._by_post(
            "image", "image", i_or_post_id, k, dedupe=dedupe, same_modality=True, allowed=allowed
        )

    def text_to_texts(self, i_or_post_id: int | str, k: int = 10, *, allowed: Any = None) -> pl.DataFrame:
        """Texts nearest to a post's text, excluding the post itself. Columns as in :meth:`image_to_texts`."""
        return self._by_post("text", "text", i_or_post_id, k, same_modality=True, allowed=allowed)

    def query_vector(
        self,
        vec: Any,
        target: Kind = "image",
        k: int = 10,
        *,
        source: Kind | None = None,
        dedupe: bool = True,
        allowed: Any = None,
    ) -> pl.DataFrame:
        """Posts nearest to a free vector (for example an encoded free-text query).

        Parameters
        ----------
        vec
            A ``D`` vector in the space of ``target`` (normalized here).
        target
            ``"image"`` or ``"text"``: which vectors to search.
        k
            Number of results.
        source
            The modality ``vec`` comes from (``"text"`` for an encoded free-text query searching images). An IVF
            index uses it to choose inverted lists across the modality gap; scores are unaffected.
        dedupe
            For image targets with ``image_keys``: list each image once.
        allowed
            Only list these posts (boolean row mask or row numbers), as in :meth:`image_to_texts`.

        Returns
        -------
        polars.DataFrame
            Columns ``rank``, ``post_id``, ``score``, ``index``.
        """
        self._check_kind(target)
        q = _unit_rows(np.asarray(vec).reshape(1, -1), "vec")
        if q.shape[1] != self.dims[target]:
            raise ValueError(f"vec has dimension {q.shape[1]}; {target} vectors have {self.dims[target]}")
        s, ix = self._query(q[0], target, k, dedupe=dedupe, source=source, allowed=allowed)
        return self._frame(s, ix)

    def search(
        self, queries: Any, target: Kind = "image", k: int = 10, *, source: Kind | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Batch search without exclusions.

        Parameters
        ----------
        queries
            ``Q x D`` (or one ``D``) query vectors, normalized here.
        target
            ``"image"`` or ``"text"``.
        k
            Neighbors per query (capped at ``N``).
        source
            The queries' modality, if known (see :meth:`query_vector`).

        Returns
        -------
        scores : numpy.ndarray
            ``Q x k`` float32 cosine similarities, best first.
        indices : numpy.ndarray
            ``Q x k`` int64 rows; ``-1`` where an approximate index found fewer than ``k``.
        """
        self._check_kind(target)
        q = np.asarray(queries.detach().cpu().numpy() if hasattr(queries, "detach") else queries)
        q = _unit_rows(q.reshape(1, -1) if q.ndim == 1 else q, "queries")
        if q.shape[1] != self.dims[target]:
            raise ValueError(
                f"queries have dimension {q.shape[1]}; {target} vectors have {self.dims[target]}"
            )
        return self._raw(target, q, k, source=source)
