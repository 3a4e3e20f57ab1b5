"""Clusters of the 2-D map and the words that characterise them.

Two pure functions, as Apple's embedding-atlas labels its maps:

* :func:`cluster_map` groups the map's points: by default k-means over the 2-D coordinates (FAISS), about
  ``sqrt(N / 20)`` regions; ``method="hdbscan"`` uses scikit-learn's HDBSCAN (leaf clusters; stragglers become
  noise, ``-1``). Measured on the 8,000-post demo map: HDBSCAN's default selection made 2 clusters (one of 5,295
  posts) and 2,500 noise points, its leaf selection 75 small clusters named after places in single captions, while
  20 k-means regions came out as topics ("flag · sign · europe", "food", "animal", "office · computer").
* :func:`label_clusters` names each cluster by its most characteristic words: class-based TF-IDF over word tokens
  of the posts' texts (a word scores high when it is frequent in the cluster and rare in the others), so words
  that every cluster shares ("image", "clip") fall away without a hand-made list. Tokens are Unicode words of
  three or more letters, lower-cased, so Ukrainian, Spanish and German texts are tokenised like English ones; a
  small stop-word list per language (:data:`STOP_WORDS`, en/uk/es/de) removes function words.

Both work on plain arrays and lists, so the Explorer, a script or a test can call them the same way.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["STOP_WORDS", "cluster_centers", "cluster_map", "label_clusters", "tokenize"]

#: Function words left out of cluster labels, per language (lower case). Short on purpose: the class-based
#: weighting already pushes down words common to every cluster; this list only removes the most frequent ones.
STOP_WORDS: dict[str, frozenset[str]] = {
    "en": frozenset(
        "the and for with that this are was were have has had but not you your our their they them his her its "
        "from into onto over under out off about just like what when where who why how all any can could would "
        "should will shall one two some more most very really than then there here also too only been being "
        "get got its it's i'm don't can't im dont cant lol omg every still three now today finally".split()
    ),
    "uk": frozenset(
        "і й та що це як але або для від про під над без при так вже ще теж також тут там його її їх мене мені "
        "тебе тобі нас вас вони вона воно він ми ви ти мій моя моє мої наш наша наше наші цей ця ці той та те "
        "було була був були буде бути є немає дуже коли де хто чому який яка яке які лише тільки ось ну тепер "
        "поки вже сьогодні знову".split()
    ),
    "es": frozenset(
        "que los las del por con para una uno unos unas como pero más mas muy este esta esto estos estas ese esa "
        "eso sus mis tus nos les hay fue ser son está estoy todo toda todos todas cuando donde quien porque "
        "también tambien solo sólo sin sobre entre hasta desde mi tu su al lo le se ya yo años otra vez hoy "
        "ahora siempre".split()
    ),
    "de": frozenset(
        "der die das den dem des ein eine einer eines einem einen und oder aber mit für von zum zur auf aus bei "
        "ist sind war waren hat haben wird werden nicht kein keine mein meine dein sein seine ihr ihre unser "
        "sich ich du er sie es wir ihr man auch noch schon nur sehr wie was wer wo wenn dass als im am an in "
        "jetzt heute seit mal mich dich mir dir immer wieder endlich hab habe".split()
    ),
}

_WORD = re.compile(r"[^\W\d_]{3,}", re.UNICODE)


def tokenize(text: str | None, stop_words: Iterable[str] | None = None) -> list[str]:
    """Lower-cased word tokens of ``text`` (letters only, at least three), without ``stop_words``.

    Parameters
    ----------
    text
        Any text; ``None`` gives no tokens.
    stop_words
        Words to leave out (default: every list in :data:`STOP_WORDS`).
    """
    if not text:
        return []
    stop = _ALL_STOP if stop_words is None else frozenset(stop_words)
    return [w for w in (m.group(0).lower() for m in _WORD.finditer(str(text))) if w not in stop]


_ALL_STOP: frozenset[str] = frozenset().union(*STOP_WORDS.values())


def _min_cluster_size(n: int) -> int:
    return int(max(5, min(500, round(n / 100))))


def cluster_map(
    coords: Any,
    *,
    method: str = "auto",
    min_cluster_size: int | None = None,
    n_clusters: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Cluster the points of a 2-D map.

    Parameters
    ----------
    coords
        ``N x 2`` coordinates (a UMAP layout).
    method
        ``"kmeans"`` (FAISS k-means; also ``"auto"``) or ``"hdbscan"`` (scikit-learn's HDBSCAN, leaf clusters).
    min_cluster_size
        HDBSCAN's smallest cluster (default: about ``N / 100``, between 5 and 500).
    n_clusters
        k-means clusters (default: about ``sqrt(N / 20)``, between 2 and 30).
    seed
        k-means seed (HDBSCAN is deterministic).

    Returns
    -------
    numpy.ndarray
        ``N`` int32 cluster codes ``0..C-1``, numbered by decreasing size; ``-1`` marks HDBSCAN's noise.
    """
    xy = np.ascontiguousarray(np.asarray(coords, dtype=np.float32))
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"coords must be N x 2, got shape {xy.shape}")
    n = xy.shape[0]
    if n < 3:
        return np.zeros(n, np.int32)
    if method not in ("auto", "hdbscan", "kmeans"):
        raise ValueError(f"method must be 'auto', 'hdbscan' or 'kmeans', got {method!r}")
    labels: np.ndarray | None = None
    if method == "hdbscan":
        try:
            from sklearn.cluster import HDBSCAN
        except ImportError:
            from .errors import MissingDependencyError

            raise MissingDependencyError(
                "HDBSCAN clusters need scikit-learn: pip install scikit-learn"
            ) from None
        else:
            mcs = int(min_cluster_size or _min_cluster_size(n))
            kw: dict[str, Any] = {
                "min_cluster_size": min(mcs, n),
                "min_samples": min(10, mcs),
                "cluster_selection_method": "leaf",
            }
            if "copy" in inspect.signature(HDBSCAN).parameters:
                kw["copy"] = True  # scikit-learn 1.8+ warns unless it is given
            labels = HDBSCAN(**kw).fit_predict(xy)
            if labels.max() < 1:  # one cluster or all noise: nothing to tell apart, use k-means instead
                labels = None
    if labels is None:
        labels = _kmeans(xy, n_clusters, seed)
    return _by_size(labels)


def _kmeans(xy: np.ndarray, n_clusters: int | None, seed: int) -> np.ndarray:
    import faiss

    n = xy.shape[0]
    k = int(n_clusters or min(30, max(2, round(math.sqrt(n / 20)))))
    k = max(1, min(k, n))
    km = faiss.Kmeans(2, k, niter=25, seed=seed, max_points_per_centroid=2048, min_points_per_centroid=1)
    km.train(xy)
    _, assign = km.index.search(xy, 1)
    return assign[:, 0].astype(np.int64)


def _by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters ``0..C-1`` by decreasing size (ties by old number); noise stays ``-1``."""
    labels = np.asarray(labels, dtype=np.int64)
    out = np.full(labels.shape, -1, np.int32)
    real = labels >= 0
    if not real.any():
        return out
    ids, counts = np.unique(labels[real], return_counts=True)
    order = ids[np.lexsort((ids, -counts))]
    remap = np.full(int(ids.max()) + 1, -1, np.int32)
    remap[order] = np.arange(len(order), dtype=np.int32)
    out[real] = remap[labels[real]]
    return out


def cluster_centers(coords: Any, labels: Any) -> dict[int, tuple[float, float]]:
    """Where to write each cluster's label: the median of its points (noise has none)."""
    xy = np.asarray(coords, dtype=np.float64)
    lab = np.asarray(labels)
    return {
        int(c): (float(np.median(xy[lab == c, 0])), float(np.median(xy[lab == c, 1])))
        for c in np.unique(lab)
        if c >= 0
    }


def label_clusters(
    texts: Sequence[str | None],
    labels: Any,
    *,
    top_n: int = 3,
    langs: Sequence[str | None] | None = None,
    min_count: int = 2,
    min_share: float = 0.03,
) -> dict[int, list[str]]:
    """The most characteristic words of each cluster (class-based TF-IDF over word tokens).

    Each cluster's texts are pooled into one document, each post counting a word once. A word's weight in cluster
    ``c`` is its share of the cluster's words times ``log(1 + A / f)``, where ``f`` is its count over all clusters and ``A`` the average
    number of words per cluster (frequent in this cluster, rare elsewhere), times ``log((1 + C) / (1 + m))``,
    where ``m`` of the ``C`` clusters use the word at least ``min_count`` times: a word common to every cluster
    (boilerplate such as "image") names none of them.

    Parameters
    ----------
    texts
        One text per point.
    labels
        Cluster code per point (``-1``, noise, is left out).
    top_n
        Words per cluster.
    langs
        Language code per point: its :data:`STOP_WORDS` list is used (every list when unknown or not given).
    min_count, min_share
        A word names a cluster only when at least ``min_count`` of its posts, and at least ``min_share`` of them,
        use it: a place named in the captions of one image does not name a cluster of two hundred posts.

    Returns
    -------
    dict
        Cluster code -> its words, best first (an empty list when nothing qualifies).
    """
    lab = np.asarray(labels)
    if len(texts) != len(lab):
        raise ValueError(f"{len(texts)} texts for {len(lab)} labels")
    clusters = sorted(int(c) for c in np.unique(lab) if c >= 0)
    counts: dict[int, Counter[str]] = {c: Counter() for c in clusters}  # posts using each word
    sizes: Counter[int] = Counter()
    for i, (text, c) in enumerate(zip(texts, lab.tolist())):
        if c < 0:
            continue
        stop = None
        if langs is not None and langs[i] in STOP_WORDS:
            stop = STOP_WORDS[langs[i]] | STOP_WORDS["en"]  # English words turn up in every language
        counts[c].update(set(tokenize(text, stop)))
        sizes[c] += 1
    total: Counter[str] = Counter()
    for cnt in counts.values():
        total.update(cnt)
    if not total:
        return {c: [] for c in clusters}
    avg = sum(total.values()) / max(1, len(clusters))
    # In how many clusters each word is common: a word found in every cluster ("image", "keywords") names none.
    floor = {c: max(min_count, min_share * sizes[c]) for c in clusters}
    spread: Counter[str] = Counter()
    for c, cnt in counts.items():
        spread.update(w for w, n in cnt.items() if n >= floor[c])
    n_clusters = len(clusters)
    out: dict[int, list[str]] = {}
    for c in clusters:
        cnt = counts[c]
        size = sum(cnt.values()) or 1
        scored = []
        for w, m in cnt.items():
            if m < floor[c]:
                continue
            ubiquity = math.log((1 + n_clusters) / (1 + spread[w])) if n_clusters > 1 else 1.0
            scored.append((m / size * math.log(1.0 + avg / total[w]) * ubiquity, w))
        scored = [t for t in scored if t[0] > 0]
        scored.sort(key=lambda t: (-t[0], t[1]))
        out[c] = [w for _, w in scored[:top_n]]
    return out
