"""The embedding store: atomic parts, checksums, readability with polars alone."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from ccclip_widgets.store import EmbeddingStore, StoreCorruptionWarning


def _vecs(n, d=8, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_write_read_and_polars_layout(tmp_path):
    s = EmbeddingStore.open(tmp_path, "fp1", 8, meta={"model_spec": "x"})
    v = _vecs(5)
    s.write_part("images", [f"k{i}" for i in range(5)], v)
    assert s.has("images", ["k0", "k9"]).tolist() == [True, False]
    np.testing.assert_array_equal(s.get("images", ["k3", "k1"]), v[[3, 1]])
    # readable with polars alone, as documented
    frame = pl.read_parquet(str(tmp_path / "fp1" / "images" / "*.parquet"))
    assert frame.columns == ["key", "vector"] and len(frame) == 5
    np.testing.assert_array_equal(np.stack(frame["vector"].to_numpy()), v)
    with pytest.raises(KeyError, match="k9"):
        s.get("images", ["k9"])


def test_other_process_parts_are_seen(tmp_path):
    a = EmbeddingStore.open(tmp_path, "fp", 8)
    b = EmbeddingStore.open(tmp_path, "fp", 8)
    assert not a.has("texts", ["t"]).any()
    b.write_part("texts", ["t"], _vecs(1))
    assert a.has("texts", ["t"]).all()


def test_dimension_mismatch_refused(tmp_path):
    EmbeddingStore.open(tmp_path, "fp", 8)
    with pytest.raises(ValueError, match="8-d"):
        EmbeddingStore.open(tmp_path, "fp", 16)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_part_detected_and_quarantined(tmp_path, damage):
    s = EmbeddingStore.open(tmp_path, "fp", 8)
    p = s.write_part("images", ["a", "b"], _vecs(2))
    s.write_part("images", ["c"], _vecs(1, seed=1))
    data = bytearray(p.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    p.write_bytes(bytes(data))
    fresh = EmbeddingStore.open(tmp_path, "fp", 8)
    with pytest.warns(StoreCorruptionWarning, match="damaged"):
        mask = fresh.has("images", ["a", "b", "c"])
    assert mask.tolist() == [False, False, True]
    assert not p.exists() and p.with_name(p.name + ".corrupt").exists()


def test_no_temp_files_and_compact(tmp_path):
    s = EmbeddingStore.open(tmp_path, "fp", 8)
    for i in range(3):
        s.write_part("texts", [f"t{i}"], _vecs(1, seed=i))
    assert not list((tmp_path / "fp" / "texts").glob("*.tmp"))
    before = s.get("texts", ["t0", "t1", "t2"])
    s.compact("texts")
    assert len(s.parts("texts")) == 1
    fresh = EmbeddingStore.open(tmp_path, "fp", 8)
    np.testing.assert_array_equal(fresh.get("texts", ["t0", "t1", "t2"]), before)
