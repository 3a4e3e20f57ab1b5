"""The k-nearest-neighbor graph of a :class:`~ccclip_widgets.neighbors.NeighborIndex` and its recall tuning.

Split out of :mod:`ccclip_widgets.neighbors` (issue 12): the graph that the UMAP projection reuses (brute force,
nearest-neighbor descent, or a transient IVF index), recall@k against exact search, and the widening of an
approximate index's ``nprobe`` / ``ef_search`` until it reaches a target recall. :class:`NeighborIndex` inherits
these methods from :class:`_GraphMethods`; the names stay importable from :mod:`ccclip_widgets.neighbors`.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ._neighbors_common import GraphKind, Kind, _default_nlist, _faiss, _tqdm
from .errors import LowRecallWarning

__all__ = ["GRAPH_EXACT_MAX", "GRAPH_NPROBE"]

#: Above this many graph points, the kNN graph comes from nearest-neighbor descent (pynndescent), or, without it,
#: from a transient IVF index (exact indexes) or the index itself; at or below it, from the index's own search
#: (brute force is quadratic: several minutes for the graph of 100k x 512 on 2 cores).
GRAPH_EXACT_MAX = 30_000

#: IVF lists probed by the transient graph index of :meth:`NeighborIndex.knn_graph` (out of ~4 sqrt(N)).
GRAPH_NPROBE = 16


def _pynndescent() -> Any:
    """pynndescent's ``NNDescent`` class, or ``None`` when it is not installed."""
    try:
        from pynndescent import NNDescent
    except ImportError:  # pragma: no cover - installed with umap-learn
        return None
    return NNDescent


class _GraphMethods:
    """kNN graph and recall methods of :class:`~ccclip_widgets.neighbors.NeighborIndex` (mixed in)."""

    # ------------------------------------------------------------------ kNN graph
    def knn_graph(
        self, kind: GraphKind = "image", k: int = 15, *, show_progress: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """k-nearest-neighbor graph of the posts, in the form umap-learn's ``precomputed_knn`` expects.

        Computed once per ``kind`` and cached in the object (a later call with a smaller ``k`` slices the cache).
        Each row starts with the point itself at distance 0, followed by its ``k - 1`` nearest other points.
        Distances are cosine distances ``1 - cos``. An exact index with more than :data:`GRAPH_EXACT_MAX` posts
        builds the graph with a transient IVF index (brute force is quadratic in ``N``); an approximate index uses
        itself.

        Parameters
        ----------
        kind
            ``"image"``, ``"text"``, or ``"joint"``: images and texts as ``2N`` points (rows ``0..N-1`` are the
            images, ``N..2N-1`` the texts), each point's neighbors drawn from both modalities.
        k
            Neighbors per point, self included (umap-learn's ``n_neighbors``).
        show_progress
            Show a ``tqdm`` progress bar.

        Returns
        -------
        indices : numpy.ndarray
            ``M x k`` int64 (``M`` = ``N``, or ``2N`` for ``"joint"``); ``-1`` pads rows an approximate index
            could not fill.
        distances : numpy.ndarray
            ``M x k`` float32.
        """
        if kind not in ("image", "text", "joint"):
            raise ValueError(f"kind must be 'image', 'text' or 'joint', got {kind!r}")
        parts = list(self.kinds) if kind == "joint" else [kind]
        for p in parts:
            self._check_kind(p)
        if kind == "joint" and len(parts) != 2:
            raise ValueError("a joint graph needs both image and text vectors")
        if kind == "joint" and self.dims["image"] != self.dims["text"]:
            raise ValueError("a joint graph needs image and text vectors of the same dimension")
        if k < 2:
            raise ValueError(f"k must be >= 2 (the point itself plus at least one neighbor), got {k}")
        cached = self._knn_cache.get(kind)
        if cached is not None and cached[0].shape[1] >= k:
            return cached[0][:, :k], cached[1][:, :k]
        m = self.n * len(parts)
        k = min(k, m)
        if m > GRAPH_EXACT_MAX and _pynndescent() is not None:
            graph = self._nndescent_graph(parts, k, show_progress)
            self._knn_cache[kind] = graph
            return graph
        searchers = {p: self._graph_searcher(p, show_progress) for p in parts}
        indices = np.empty((m, k), np.int64)
        dists = np.empty((m, k), np.float32)
        chunk = 4096
        bar = _tqdm(show_progress)
        with bar(total=m, desc=f"kNN graph ({kind}, k={k})", unit="pt", leave=False) as pb:
            for qi, qkind in enumerate(parts):
                qv = self._vectors[qkind]
                for s in range(0, self.n, chunk):
                    e = min(self.n, s + chunk)
                    sc_all, ix_all = [], []
                    for ti, tkind in enumerate(parts):
                        sc, ix = searchers[tkind](qv[s:e], k, qkind)
                        ix_all.append(np.where(ix >= 0, ix + ti * self.n, -1))
                        sc_all.append(np.where(ix >= 0, sc, -np.inf))
                    sc = np.concatenate(sc_all, axis=1)
                    ix = np.concatenate(ix_all, axis=1)
                    if len(parts) > 1:
                        order = np.argsort(-sc, axis=1, kind="stable")[:, :k]
                        sc = np.take_along_axis(sc, order, 1)
                        ix = np.take_along_axis(ix, order, 1)
                    rows = np.arange(s, e, dtype=np.int64) + qi * self.n
                    gi, gd = _self_first(rows, ix, sc, k)
                    indices[rows] = gi
                    dists[rows] = gd
                    pb.update(e - s)
        self._knn_cache[kind] = (indices, dists)
        return indices, dists

    def _nndescent_graph(
        self, parts: list[str], k: int, show_progress: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """kNN graph by nearest-neighbor descent (pynndescent, installed with umap-learn) over ``parts``' vectors.

        For any index too large for a brute-force graph: a graph asks one query per point, and FAISS's per-query
        list scans run at about a quarter of BLAS speed on the 2-core machine. Measured there on 100k x 512
        clustered vectors: 27 s at recall@15 0.99, against 147 s for a transient IVF-Flat (nprobe 16) and 58 s for
        HNSW (M=32, recall 0.95). Deterministic for a given seed.
        """
        nnd_cls = _pynndescent()
        x = np.concatenate([self._vectors[p] for p in parts]) if len(parts) > 1 else self._vectors[parts[0]]
        seed = int(self.params.get("seed", 0))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="pynndescent")
            # Descending for 2k neighbors and keeping k is what makes the first k accurate: on 100k x 512 recall@15
            # went from 0.88 (k=15) to 0.99 (k=30) for 1.6x the time.
            wide = min(2 * k, x.shape[0] - 1)
            nnd = nnd_cls(
                x, n_neighbors=wide, metric="dot", random_state=seed, low_memory=True, verbose=False
            )
            ix, dist = nnd.neighbor_graph
        ix = np.asarray(ix, np.int64)
        sim = np.where(ix >= 0, 1.0 - np.asarray(dist, np.float32), -np.inf).astype(np.float32)
        order = np.argsort(-sim, axis=1, kind="stable")
        ix = np.take_along_axis(ix, order, 1)
        sim = np.take_along_axis(sim, order, 1)
        rows = np.arange(x.shape[0], dtype=np.int64)
        return _self_first(rows, ix, sim, k)

    def _graph_searcher(self, kind: str, show_progress: bool) -> Any:
        """A function ``(queries, k) -> (scores, indices)`` searching ``kind`` for the graph."""
        if self.mode != "exact" or self.n <= GRAPH_EXACT_MAX:
            return lambda q, k, source: self._raw(kind, q, k, source=source)
        faiss = _faiss()
        x = self._vectors[kind]
        n, d = x.shape
        nl = _default_nlist(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nl, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = 10
        index.cp.seed = int(self.params.get("seed", 0))
        rng = np.random.default_rng(int(self.params.get("seed", 0)))
        m = min(n, 64 * nl)
        index.train(x[np.sort(rng.choice(n, m, replace=False))] if m < n else x)
        index.add(x)
        params = faiss.SearchParametersIVF(nprobe=GRAPH_NPROBE)

        def search(q: np.ndarray, k: int, source: str) -> tuple[np.ndarray, np.ndarray]:
            sc, ix = index.search(q, k, params=params)
            return sc.astype(np.float32, copy=False), ix.astype(np.int64, copy=False)

        return search

    # ------------------------------------------------------------------ quality
    def recall_at(
        self,
        k: int = 10,
        n_queries: int = 1000,
        *,
        kind: Kind | None = None,
        source: Kind | None = None,
        seed: int = 0,
    ) -> float:
        """Recall@k of this index against exact search, on a sample of the posts' own vectors as queries.

        Parameters
        ----------
        k
            Neighbors compared.
        n_queries
            Sampled queries (capped at ``N``).
        kind
            Modality searched; default the first present.
        source
            Modality of the queries; default ``kind`` (``"image"`` with ``kind="text"`` measures what
            :meth:`image_to_texts` gets).
        seed
            Seed of the query sample.

        Returns
        -------
        float
            Mean over queries of ``|approximate top-k  ∩  exact top-k| / k`` (1.0 for an exact index, up to ties).
        """
        faiss = _faiss()
        kind = kind or self.kinds[0]
        source = source or kind
        self._check_kind(kind)
        self._check_kind(source)
        k = min(k, self.n)
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(self.n, min(n_queries, self.n), replace=False))
        x = self._vectors[kind]
        q = np.ascontiguousarray(self._vectors[source][rows])
        _, approx = self._raw(kind, q, k, source=source)
        _, exact = faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)
        hits = [len(np.intersect1d(a[a >= 0], b)) for a, b in zip(approx, exact)]
        return float(np.mean(hits) / k)

    def tune(
        self,
        target_recall: float = 0.95,
        *,
        k: int = 10,
        n_queries: int = 200,
        max_nprobe: int | None = None,
        max_ef_search: int = 2048,
        seed: int = 0,
        show_progress: bool = True,
    ) -> dict[str, Any]:
        """Raise the search width of an approximate index until recall@k reaches ``target_recall``.

        Queries are sampled from the posts' own vectors: for each indexed modality, ``n_queries`` of the same
        modality and, when both exist, ``n_queries`` of the other (what :meth:`image_to_texts` and
        :meth:`text_to_images` ask). Exact answers come from brute force on those queries only. The width
        (``nprobe`` for IVF, ``ef_search`` for HNSW) doubles from its current value until the worst of these
        recalls reaches the target or the width reaches its cap (``max_nprobe``, default a quarter of the lists,
        or ``max_ef_search``); a warning says when the cap stopped it.

        Parameters
        ----------
        target_recall
            Recall@k to reach.
        k
            Neighbors compared.
        n_queries
            Sampled queries per (source, target) pair.
        max_nprobe, max_ef_search
            Caps on the width.
        seed
            Seed of the query sample.
        show_progress
            Show a ``tqdm`` bar.

        Returns
        -------
        dict
            The chosen width and the recall measured at each width tried.
        """
        if self.mode == "exact":
            return {"mode": "exact", "recall": 1.0}
        faiss = _faiss()
        knob = "nprobe" if self.mode == "ivf" else "ef_search"
        if knob == "nprobe":
            nlist = min(int(ix.nlist) for ix in self._indexes.values())
            cap = max_nprobe or max(1, nlist // 4)
        else:
            cap = max_ef_search
        k = min(k, self.n)
        rng = np.random.default_rng(seed)
        pairs = [(src, tgt) for tgt in self.kinds for src in self.kinds]
        truth = {}
        bar = _tqdm(show_progress)
        with bar(total=len(pairs), desc="Exact answers for tuning", leave=False) as pb:
            for src, tgt in pairs:
                rows = np.sort(rng.choice(self.n, min(n_queries, self.n), replace=False))
                q = np.ascontiguousarray(self._vectors[src][rows])
                _, exact = faiss.knn(q, self._vectors[tgt], k, metric=faiss.METRIC_INNER_PRODUCT)
                truth[(src, tgt)] = (q, exact)
                pb.update(1)
        history: list[dict[str, Any]] = []
        width = min(int(self.params[knob]), cap)
        while True:
            self.params[knob] = width
            recalls = {}
            for (src, tgt), (q, exact) in truth.items():
                _, approx = self._raw(tgt, q, k, source=src)
                hits = [len(np.intersect1d(a[a >= 0], b)) for a, b in zip(approx, exact)]
                recalls[f"{src}_to_{tgt}"] = float(np.mean(hits) / k)
            worst = min(recalls.values())
            history.append({knob: width, "recall": worst, **recalls})
            if worst >= target_recall or width >= cap:
                break
            width = min(cap, 2 * width)
        if history[-1]["recall"] < target_recall:
            import warnings

            warnings.warn(
                f"recall@{k} reached {history[-1]['recall']:.3f} < {target_recall} with {knob}={width} (the cap); "
                "raise max_nprobe / max_ef_search (queries get slower), or use an exact index (a higher "
                "exact_threshold)",
                LowRecallWarning,
                stacklevel=2,
            )
        self.params["tuned_recall"] = history[-1]["recall"]
        return {knob: width, "history": history}


def _self_first(rows: np.ndarray, ix: np.ndarray, sc: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Put each point itself first (distance 0), then its first ``k - 1`` other neighbors in order."""
    c = len(rows)
    is_self = ix == rows[:, None]
    # Stable sort on the "is self" flag moves self (and nothing else) to the end, keeping the others' order.
    order = np.argsort(is_self, axis=1, kind="stable")[:, : k - 1]
    others = np.take_along_axis(ix, order, 1)
    other_sc = np.take_along_axis(sc, order, 1)
    out_i = np.empty((c, k), np.int64)
    out_d = np.empty((c, k), np.float32)
    out_i[:, 0] = rows
    out_d[:, 0] = 0.0
    out_i[:, 1:] = others
    dist = np.clip(1.0 - other_sc, 0.0, 2.0)
    out_d[:, 1:] = np.where(others >= 0, dist, 2.0)  # padding: the largest cosine distance
    return out_i, out_d
