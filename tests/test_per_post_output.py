"""``ccclip embed`` writes embeddings.parquet: one row per embedded post, readable without the toolkit."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from ccclip_testkit import make_shape_posts

from ccclip_widgets.cli import main
from ccclip_widgets.embed import embed_posts
from ccclip_widgets.posts import read_posts


@pytest.fixture
def embedded(tiny_model, tmp_path):
    from ccclip_widgets.models import save_checkpoint

    ck = save_checkpoint(tiny_model, tmp_path / "model")
    recs = make_shape_posts(tmp_path / "imgs")[:8]
    for i, r in enumerate(recs):
        r["likes"] = i * 10
        r["lang"] = "en" if i % 2 else "de"
    recs.append({"post_id": "broken", "image": "missing.jpg", "text": "no image", "likes": 0, "lang": "en"})
    path = tmp_path / "imgs" / "posts.csv"
    pl.DataFrame(recs).write_csv(path)
    out = tmp_path / "run"
    argv = ["embed", str(path), "--model", str(ck), "--out", str(out)]
    assert main([*argv, "--device", "cpu", "--workers", "0", "--no-progress"]) == 0
    return path, out, ck


def test_embed_writes_one_row_per_embedded_post(embedded):
    path, out, ck = embedded
    parquet = out / "embeddings.parquet"
    df = pl.read_parquet(parquet)
    assert df.columns[:5] == ["post_id", "image_embedding", "text_embedding", "image_key", "text_key"]
    assert {"likes", "lang", "text", "image", "row"} <= set(df.columns) and "image_bytes" not in df.columns
    assert df.height == 8 and "broken" not in df["post_id"].to_list()  # the reject is in rejects.csv
    assert pl.read_csv(out / "rejects.csv")["post_id"].to_list() == ["broken"]
    schema = pq.read_schema(parquet)
    for name in ("image_embedding", "text_embedding"):
        typ = schema.field(name).type
        assert str(typ).startswith("fixed_size_list<") and str(typ.value_type) == "float"
    assert schema.metadata[b"ccclip.model_spec"] == str(ck).encode()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["embeddings"] == str(parquet) and summary["posts_embedded"] == 8
    assert not list(out.glob(".*.tmp"))
    # the same frame as Embeddings.to_frame() in Python (vectors come back from the store)
    from ccclip_widgets.models import load_model

    model = load_model(ck, device="cpu")
    emb = embed_posts(read_posts(path), model, store=out / "store", show_progress=False, num_workers=0)
    assert emb.stats["images_encoded"] == 0
    frame = emb.to_frame()
    assert frame.columns == df.columns
    assert frame.drop("image_embedding", "text_embedding").equals(
        df.drop("image_embedding", "text_embedding")
    )
    np.testing.assert_array_equal(np.stack(frame["image_embedding"].to_numpy()), emb.image)
    np.testing.assert_allclose(np.stack(df["image_embedding"].to_numpy()), emb.image)


READERS = {
    "polars": """
        import polars as pl
        df = pl.read_parquet(PATH)
        rows, dim = df.height, df["image_embedding"].dtype.shape[0]
        first = df.filter(pl.col("post_id") == ID)["text_embedding"].to_list()[0]
    """,
    "pandas": """
        import pandas as pd
        df = pd.read_parquet(PATH, engine="pyarrow")
        rows, dim = len(df), len(df["image_embedding"].iloc[0])
        first = list(df.loc[df["post_id"] == ID, "text_embedding"].iloc[0])
    """,
    "duckdb": """
        import duckdb
        con = duckdb.connect()
        rows = con.execute(f"SELECT count(*) FROM read_parquet('{PATH}')").fetchone()[0]
        dim = con.execute(f"SELECT len(image_embedding) FROM read_parquet('{PATH}') LIMIT 1").fetchone()[0]
        first = con.execute(
            f"SELECT text_embedding FROM read_parquet('{PATH}') WHERE post_id = ?", [ID]
        ).fetchone()[0]
    """,
}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_parquet_reads_without_the_toolkit(embedded, reader):
    pytest.importorskip(reader)
    _, out, _ = embedded
    parquet = out / "embeddings.parquet"
    df = pl.read_parquet(parquet)
    pid = df["post_id"][3]
    code = textwrap.dedent(READERS[reader])
    code = f"import json, sys\nPATH = {str(parquet)!r}\nID = {pid!r}\n{code}\n" + (
        "assert not [m for m in sys.modules if m.startswith('ccclip')]\n"
        "print(json.dumps({'rows': int(rows), 'dim': int(dim), 'first': [float(x) for x in first]}))\n"
    )
    # -I: isolated mode, so neither PYTHONPATH nor the working directory can bring the toolkit in
    run = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert got["rows"] == df.height and got["dim"] == df["image_embedding"].dtype.shape[0]
    np.testing.assert_allclose(
        got["first"], df.filter(pl.col("post_id") == pid)["text_embedding"].to_list()[0], rtol=1e-6
    )
