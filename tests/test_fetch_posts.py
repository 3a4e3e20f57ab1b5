"""Image URLs in read_posts, end to end: download, rejects with reasons, offline mode, embedding, the CLI.

Against the local server of tests/fetch_server.py (the ``server`` fixture in tests/conftest.py); the Fetcher
itself, answer by answer, is tested in tests/test_fetch.py.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from ccclip_testkit import make_shape_posts
from fetch_server import CAP, Server, _blake, _image_bytes

from ccclip_widgets.fetch import DownloadCache, FetchConfig, Fetcher
from ccclip_widgets.posts import REJECT_REASONS, Posts, read_posts


def _reasons(posts: Posts) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for row, reason in zip(posts.rejects["row"].to_list(), posts.rejects["reason"].to_list(), strict=True):
        out.setdefault(row, set()).add(reason)
    return out


def _check_invariant(posts: Posts, n_input: int) -> None:
    rejected = set(posts.rejects["row"].to_list())
    valid = set(posts.table["row"].to_list())
    assert not (rejected & valid)
    assert valid | rejected == set(range(n_input))
    assert set(posts.rejects["reason"].to_list()) <= set(REJECT_REASONS)


def _url_table(server: Server, tmp_path: Path) -> tuple[Path, list[tuple[str, str | None]]]:
    """A CSV mixing every URL case with a local file; returns the path and (image, expected reason) per row."""
    (tmp_path / "imgs").mkdir(exist_ok=True)
    (tmp_path / "imgs" / "local.jpg").write_bytes(_image_bytes("local.jpg")[0])
    rows: list[tuple[str, str | None]] = [
        (server.url("/good/p1.jpg"), None),
        (server.url("/good/p2.png"), None),
        ("  " + server.url("/good/p1.jpg"), None),  # the same URL again (with spaces): fetched once
        (server.url("/redirect.jpg"), None),
        (server.url("/octet.bin"), None),
        ("imgs/local.jpg", None),
        (server.url("/missing.jpg"), "http_not_found"),
        (server.url("/forbidden.jpg"), "http_forbidden"),
        (server.url("/page.html"), "not_an_image"),
        (server.url("/fake.jpg"), "not_an_image"),
        (server.url("/big.jpg"), "too_large_image"),
        (server.url("/endless.jpg"), "too_large_image"),
        (server.url("/loop/a"), "redirect_loop"),
        (server.url("/chain/9"), "too_many_redirects"),
        (server.url("/to-ftp.jpg"), "unsupported_url_scheme"),
        ("ftp://127.0.0.1/x.jpg", "unsupported_url_scheme"),
        ("data:image/jpeg;base64,/9j/4AAQ", "unsupported_url_scheme"),
    ]
    frame = pl.DataFrame(
        {
            "post_id": [f"p{i}" for i in range(len(rows))],
            "image": [image for image, _ in rows],
            "text": [f"post number {i}" for i in range(len(rows))],
        }
    )
    path = tmp_path / "posts.csv"
    frame.write_csv(path)
    return path, rows


def test_read_posts_downloads_urls_and_rejects_bad_ones(server: Server, tmp_path: Path) -> None:
    path, rows = _url_table(server, tmp_path)
    options = {"download_cache": tmp_path / "dl", "max_download_bytes": CAP, "timeout": 5.0, "retries": 0}
    posts = read_posts(path, show_progress=False, **options)
    _check_invariant(posts, len(rows))
    assert len(posts) + posts.n_rejected == len(rows)  # rows lost: 0
    expected = {i: {reason} for i, (_, reason) in enumerate(rows) if reason is not None}
    assert _reasons(posts) == expected
    for row, detail in zip(posts.rejects["row"].to_list(), posts.rejects["detail"].to_list(), strict=True):
        assert rows[row][0].strip() in detail  # every detail names the URL
    valid = posts.table
    assert valid["row"].to_list() == [i for i, (_, reason) in enumerate(rows) if reason is None]
    assert valid["image"].to_list()[:2] == [rows[0][0], rows[1][0]]  # the URL stays visible
    cache = DownloadCache(tmp_path / "dl")
    p1 = _image_bytes("p1.jpg")[0]
    assert valid["image_path"][0] == str(cache.body_path(_blake(p1)))
    assert valid["image_key"][0] == valid["image_key"][2] == _blake(p1)
    assert valid["image_path"][5] == str((tmp_path / "imgs" / "local.jpg").resolve())
    # the same image given as bytes gets the same key: embeddings are shared
    as_bytes = read_posts(pl.DataFrame({"post_id": ["b"], "image": [p1], "text": ["t"]}))
    assert as_bytes.table["image_key"][0] == valid["image_key"][0]
    assert server.state.hits["/good/p1.jpg"] == 1  # one download per distinct URL

    before = Counter(server.state.hits)
    again = read_posts(path, show_progress=False, **options)
    assert again.table.equals(posts.table)
    good_paths = ["/good/p1.jpg", "/good/p2.png", "/redirect.jpg", "/good/redirected.jpg", "/octet.bin"]
    assert all(server.state.hits[p] == before[p] for p in good_paths)  # served from the cache
    assert server.state.hits["/missing.jpg"] == before["/missing.jpg"] + 1  # failures are tried again


def test_read_posts_offline_makes_zero_requests(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, rows = _url_table(server, tmp_path)
    n_http = sum(1 for image, _ in rows if image.strip().startswith("http"))
    posts = read_posts(path, download_cache=tmp_path / "dl", network=False, show_progress=False)
    monkeypatch.setenv("CCCLIP_OFFLINE", "1")
    posts_env = read_posts(path, download_cache=tmp_path / "dl", show_progress=False)
    assert server.state.total == 0
    for p in (posts, posts_env):
        _check_invariant(p, len(rows))
        counts = p.reject_counts()
        assert counts["network_disabled"] == n_http
        assert counts["unsupported_url_scheme"] == 2  # ftp:// and data: are refused before the network
        assert p.table["image"].to_list() == ["imgs/local.jpg"]


def test_read_posts_takes_its_download_settings_as_one_fetch_config(server: Server, tmp_path: Path) -> None:
    frame = pl.DataFrame({"post_id": ["1"], "image": [server.url("/good/cfg.jpg")], "text": ["t"]})
    offline = read_posts(frame, None, FetchConfig(cache=tmp_path / "dl", network=False), show_progress=False)
    assert offline.reject_counts() == {"network_disabled": 1} and server.state.total == 0
    online = read_posts(frame, fetcher=FetchConfig(cache=tmp_path / "dl", timeout=5.0), show_progress=False)
    assert len(online) == 1 and server.state.total == 1
    with pytest.raises(TypeError, match="unexpected keyword"):
        read_posts(frame, download_kache=tmp_path)
    with Fetcher(cache=tmp_path / "dl") as f, pytest.raises(TypeError, match="not beside it"):
        read_posts(frame, fetcher=f, retries=0)


def test_read_posts_accepts_a_configured_fetcher(server: Server, tmp_path: Path) -> None:
    waits: list[float] = []
    with Fetcher(cache=tmp_path / "dl", retries=1, backoff=0.25) as f:
        f._sleep = waits.append
        frame = pl.DataFrame(
            {"post_id": ["1", "2"], "image": [server.url("/flaky.jpg"), "x.jpg"], "text": ["a", "b"]}
        )
        posts = read_posts(
            frame,
            image_root=tmp_path,
            fetcher=f,
            show_progress=False,
        )
    assert posts.table["post_id"].to_list() == ["1"]
    assert _reasons(posts) == {1: {"missing_image"}}
    assert len(waits) == 1 and 0.125 <= waits[0] <= 0.25
    assert f.stats["downloaded"] == 1 and f.stats["retries"] == 1


def test_embedding_url_posts_matches_local_files(server: Server, tiny_model, tmp_path: Path) -> None:
    from ccclip_widgets.embed import embed_posts

    records = make_shape_posts(tmp_path / "imgs")[:12]
    for rec in records:
        server.state.files[rec["image"]] = (tmp_path / "imgs" / rec["image"]).read_bytes()
    local = read_posts(pl.DataFrame(records), image_root=tmp_path / "imgs")
    remote_records = [{**rec, "image": server.url(f"/files/{rec['image']}")} for rec in records]
    remote = read_posts(pl.DataFrame(remote_records), show_progress=False, timeout=5.0)
    assert len(local) == len(remote) == 12 and remote.n_rejected == 0
    assert server.state.total == 12
    kw = {"show_progress": False, "num_workers": 0}
    emb_local = embed_posts(local, tiny_model, store=tmp_path / "s1", **kw)
    emb_remote = embed_posts(remote, tiny_model, store=tmp_path / "s2", **kw)
    assert emb_remote.posts.table["post_id"].to_list() == emb_local.posts.table["post_id"].to_list()
    np.testing.assert_allclose(emb_remote.image, emb_local.image, atol=1e-6)
    np.testing.assert_allclose(emb_remote.text, emb_local.text, atol=1e-6)
    assert emb_remote.stats["images_failed"] == 0


def test_cli_embed_offline(server: Server, tiny_arch: str, tmp_path: Path) -> None:
    from ccclip_widgets.cli import main

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(_image_bytes("cli.jpg")[0])
    table = tmp_path / "posts.csv"
    pl.DataFrame(
        {
            "post_id": ["1", "2"],
            "image": ["imgs/a.jpg", server.url("/good/cli-remote.jpg")],
            "text": ["a local image", "a remote image"],
        }
    ).write_csv(table)
    out = tmp_path / "out"
    argv = ["embed", str(table), "--model", f"{tiny_arch}:random", "--allow-random", "--out", str(out)]
    argv += ["--device", "cpu", "--workers", "0", "--no-progress", "--offline"]
    assert main(argv) == 0
    assert server.state.total == 0
    rejects = pl.read_csv(out / "rejects.csv")
    assert rejects["reason"].to_list() == ["network_disabled"]
    assert server.url("/good/cli-remote.jpg") in rejects["detail"][0]
