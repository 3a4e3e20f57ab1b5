"""FAISS access and small helpers shared by :mod:`ccclip_widgets.neighbors` and its two companions.

:mod:`~ccclip_widgets.neighbors` (the index and its queries), :mod:`~ccclip_widgets.neighbors_graph` (kNN graph and
recall tuning) and :mod:`~ccclip_widgets.neighbors_io` (save / load) all reach FAISS through :func:`_faiss`; keeping
it here lets those modules import it without importing one another in a circle.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from .errors import MissingDependencyError

Kind = Literal["image", "text"]
GraphKind = Literal["image", "text", "joint"]

_KINDS: tuple[str, ...] = ("image", "text")

_PIP_HINT = "pip install faiss-cpu"


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - exercised only without faiss
        raise MissingDependencyError(f"NeighborIndex needs FAISS; install it with: {_PIP_HINT}") from exc
    return faiss


def _tqdm(show: bool) -> Any:
    from tqdm.auto import tqdm

    def make(**kwargs: Any) -> Any:
        return tqdm(disable=not show, **kwargs)

    return make


def _flat_view(index: Any, n: int, d: int) -> np.ndarray:
    """Zero-copy view of the vectors stored in a FAISS flat index (kept alive by the index)."""
    faiss = _faiss()
    flat = faiss.downcast_index(index)
    if n == 0:
        return np.zeros((0, d), np.float32)
    return faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)


def _default_nlist(n: int) -> int:
    """About ``4 * sqrt(n)`` inverted lists, as a power of two: 4096 at 1M, 2048 at 200k.

    k-means training costs ``O(nlist^2)`` (``64 * nlist`` samples x ``nlist`` centroids, training alone about 4x
    for 4096 lists against 2048). Building both modalities at 1M x 512 with 4096 lists took 209-250 s on the quiet
    2-core machine. It pays at query time: on spread-out data 2048 lists needed a quarter of them probed (p95 90 ms
    at 1M) to reach recall 0.95; 4096 lists reached 0.99 at p95 27 ms (``benchmarks/bench_neighbors.py``).
    """
    return int(2 ** round(np.log2(max(16.0, 4.0 * np.sqrt(n)))))
