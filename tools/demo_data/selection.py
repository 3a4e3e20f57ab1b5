"""Choosing images: near-duplicate groups, the few visibly different images kept of each, and the demo draw.

Every ordering uses SHA-256 of stable keys (:func:`_order_key`), never a random number generator, so the
selection depends only on the package contents, ``n_demo`` and ``seed``.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from .openclipart import _Candidate
from .text import _title_key

#: Near-duplicate groups keep at most this many images.
MAX_PER_GROUP = 2
#: Two images are near-duplicates when their 64-bit difference hashes differ in at most this many bits and
#: their 16 x 16 grey thumbnails differ by at most ``GRAY_NEAR`` grey levels on average.
DHASH_NEAR = 4
GRAY_NEAR = 4.0
#: A second image of a group is kept only if it differs from the first by more than these amounts.
DHASH_DISTINCT = 10
GRAY_DISTINCT = 10.0
TEST_FRACTION = 0.25
#: At most this share of a topic's images goes to the demo, so that the stand-in pool sees every topic.
DEMO_TOPIC_CAP = 0.7


# -- grouping and selection -----------------------------------------------------------------------------------
class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _popcount64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64)
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return ((x * np.uint64(0x0101010101010101)) >> np.uint64(56)).astype(np.int64)


def _near_duplicate_groups(cands: list[_Candidate]) -> list[int]:
    """Union images with the same title key or a near-identical difference hash; return a root per image."""
    n = len(cands)
    uf = _UnionFind(n)
    first_by_key: dict[str, int] = {}
    for i, c in enumerate(cands):
        key = _title_key(c.title)
        if key:
            if key in first_by_key:
                uf.union(first_by_key[key], i)
            else:
                first_by_key[key] = i
    hashes = np.array([c.dhash for c in cands], dtype=np.uint64)
    grays = _gray_matrix(cands)
    for i in range(n - 1):
        close = np.nonzero(_popcount64(hashes[i + 1 :] ^ hashes[i]) <= DHASH_NEAR)[0] + i + 1
        if close.size:
            mad = np.abs(grays[close] - grays[i]).mean(axis=1)
            for j in close[mad <= GRAY_NEAR]:
                uf.union(i, int(j))
    return [uf.find(i) for i in range(n)]


def _gray_matrix(cands: Sequence[_Candidate]) -> np.ndarray:
    if not cands:
        return np.zeros((0, 256), dtype=np.float32)
    return np.stack([np.frombuffer(c.gray, dtype=np.uint8) for c in cands]).astype(np.float32)


def _distinct(a: _Candidate, b: _Candidate) -> bool:
    """Whether two images of one group look different enough to keep both."""
    bits = bin(a.dhash ^ b.dhash).count("1")
    mad = float(np.abs(_gray_matrix([a])[0] - _gray_matrix([b])[0]).mean())
    return bits > DHASH_DISTINCT or mad > GRAY_DISTINCT


def _order_key(seed: int, *parts: str) -> str:
    return hashlib.sha256(":".join((str(seed), *parts)).encode("utf-8")).hexdigest()


def _quotas(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Split ``total`` over topics in proportion to the square root of their size, capped per topic."""
    caps = {t: max(1, math.floor(DEMO_TOPIC_CAP * n)) for t, n in sizes.items() if n > 0}
    total = min(total, sum(caps.values()))
    quota = dict.fromkeys(caps, 0)
    open_topics = set(caps)
    left = total
    while left > 0 and open_topics:
        weights = {t: math.sqrt(sizes[t]) for t in open_topics}
        wsum = sum(weights.values())
        shares = {t: left * w / wsum for t, w in weights.items()}
        floors = {t: min(math.floor(s), caps[t] - quota[t]) for t, s in shares.items()}
        given = sum(floors.values())
        if given == 0:  # hand out the remainders one by one, largest share first
            for t in sorted(open_topics, key=lambda t: (-(shares[t] % 1), t)):
                if left == 0:
                    break
                if quota[t] < caps[t]:
                    quota[t] += 1
                    left -= 1
        else:
            for t, k in floors.items():
                quota[t] += k
            left -= given
        open_topics = {t for t in open_topics if quota[t] < caps[t]}
    return quota


def _select_demo(
    groups: dict[str, list[_Candidate]], n_demo: int, seed: int
) -> tuple[dict[str, str], list[str]]:
    """Choose demo groups stratified by topic and split them; return ``{image_id: split}`` and stand-in ids."""
    by_topic: dict[str, list[str]] = defaultdict(list)
    for gid, members in groups.items():
        by_topic[members[0].record.topic].append(gid)
    sizes = {t: sum(len(groups[g]) for g in gids) for t, gids in by_topic.items()}
    quota = _quotas(sizes, n_demo)
    demo: dict[str, str] = {}
    chosen: set[str] = set()
    for topic in sorted(by_topic):
        gids = sorted(by_topic[topic], key=lambda g: _order_key(seed, "demo", g))
        picked: list[str] = []
        count = 0
        for gid in gids:
            if count >= quota.get(topic, 0):
                break
            if count + len(groups[gid]) > quota[topic]:
                continue
            picked.append(gid)
            count += len(groups[gid])
        n_test = round(TEST_FRACTION * count)
        test_count = 0
        for gid in sorted(picked, key=lambda g: _order_key(seed, "split", g)):
            split = "test" if test_count < n_test and test_count + len(groups[gid]) <= n_test + 1 else "train"
            if split == "test":
                test_count += len(groups[gid])
            for c in groups[gid]:
                demo[c.record.image_id] = split
        chosen.update(picked)
    standin = sorted(c.record.image_id for g, m in groups.items() if g not in chosen for c in m)
    return demo, standin


def _keep_distinct(members: list[_Candidate], cap: int, first: Any = None) -> list[_Candidate]:
    """Sort a near-duplicate group best first (``first`` ranks ahead of that: a key function returning False for
    the preferred members), then keep up to ``cap`` images that look different from every image kept before."""
    members.sort(
        key=lambda c: (
            bool(first(c)) if first is not None else False,
            c.title_origin != "metadata",
            not c.description,
            -len(c.keywords),
            c.record.image_id,
        )
    )
    kept = [members[0]]
    for c in members[1:]:
        if len(kept) >= cap:
            break
        if all(_distinct(c, k) for k in kept):
            kept.append(c)
    return kept


def _prune_groups(images: list[_Candidate]) -> dict[str, list[_Candidate]]:
    """Group near-duplicates and keep at most ``MAX_PER_GROUP`` visibly different images of each group.

    Every image gets its group id (the smallest image id of the group) in ``group``; the returned mapping
    holds only the kept images, best first (a title of their own, a description, more keywords).
    """
    roots = _near_duplicate_groups(images)
    members: dict[int, list[_Candidate]] = defaultdict(list)
    for c, root in zip(images, roots, strict=True):
        members[root].append(c)
    groups: dict[str, list[_Candidate]] = {}
    for ms in members.values():
        kept = _keep_distinct(ms, MAX_PER_GROUP)
        gid = min(c.record.image_id for c in ms)
        for c in ms:
            c.group = gid
        groups[gid] = kept
    return groups
