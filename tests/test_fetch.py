"""Image URLs: downloading with ccclip_widgets.fetch (the Fetcher, its download cache) from a local server.

The server (tests/fetch_server.py: 127.0.0.1, a free port, a thread) serves good images and every kind of bad
answer a real CDN gives; it counts requests per path, connections and requests in flight, so tests can assert
what went over the wire. URL rows in read_posts, end to end, are in tests/test_fetch_posts.py.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

import polars as pl
import pytest
from fetch_server import CAP, HTML, Server, _blake, _encode, _image_bytes
from PIL import Image

from ccclip_widgets.fetch import (
    FETCH_REASONS,
    DownloadCache,
    Fetcher,
    FetchResult,
    fetch_images,
    network_enabled,
    sniff_image_format,
)
from ccclip_widgets.posts import read_posts


@pytest.fixture
def fetcher(tmp_path: Path) -> Fetcher:
    """Generous timeouts (good answers never time out on a loaded machine), quick back-off."""
    with Fetcher(
        cache=tmp_path / "dl",
        timeout=(5.0, 5.0),
        total_timeout=10.0,
        retries=1,
        backoff=0.01,
        max_backoff=0.05,
        max_bytes=CAP,
    ) as f:
        yield f


@pytest.fixture
def tight(tmp_path: Path) -> Fetcher:
    """Tiny timeouts, for the slow routes."""
    with Fetcher(
        cache=tmp_path / "dl",
        timeout=(2.0, 0.25),
        total_timeout=0.6,
        retries=1,
        backoff=0.01,
        max_backoff=0.05,
        max_bytes=CAP,
    ) as f:
        yield f


def _leftover_temps(f: Fetcher) -> list[str]:
    return sorted(p.name for p in f.cache.tmp.iterdir())


# ==============================================================================================================
# Fetcher: good answers


def test_sniff_image_format() -> None:
    img = Image.new("RGB", (4, 4), (1, 2, 3))
    for fmt, name in (("JPEG", "JPEG"), ("PNG", "PNG"), ("GIF", "GIF"), ("WEBP", "WEBP"), ("BMP", "BMP")):
        assert sniff_image_format(_encode(img, fmt)[:32]) == name
    assert sniff_image_format(_encode(img, "TIFF")[:32]) == "TIFF"
    assert sniff_image_format(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00") == "HEIF"
    for junk in (HTML, b"", b"BM this is text", b"RIFF\x00\x00\x00\x00WAVEfmt ", b"%PDF-1.7"):
        assert sniff_image_format(junk[:32]) is None


def test_good_images_are_cached_by_content(server: Server, fetcher: Fetcher) -> None:
    for name, fmt in (("a.jpg", "JPEG"), ("b.png", "PNG")):
        url = server.url(f"/good/{name}")
        result = fetcher.fetch(url)
        body = _image_bytes(name)[0]
        assert result.ok and result.reason is None, result.detail
        assert result.key == _blake(body)
        assert result.path == fetcher.cache.body_path(result.key)
        assert result.path.read_bytes() == body and result.size == len(body)
        assert result.image_format == fmt and result.attempts == 1 and not result.from_cache
        assert result.final_url == url
    assert _leftover_temps(fetcher) == []


def test_octet_stream_and_chunked_images_are_accepted(server: Server, fetcher: Fetcher) -> None:
    octet = fetcher.fetch(server.url("/octet.bin"))
    assert octet.ok, octet.detail
    assert octet.content_type == "application/octet-stream" and octet.image_format == "JPEG"
    chunked = fetcher.fetch(server.url("/chunked-good.jpg"))
    assert chunked.ok, chunked.detail
    assert chunked.path.read_bytes() == _image_bytes("chunked.jpg")[0]


def test_redirects_are_followed_within_the_limit(server: Server, fetcher: Fetcher) -> None:
    result = fetcher.fetch(server.url("/redirect.jpg"))
    assert result.ok, result.detail
    assert result.final_url == server.url("/good/redirected.jpg")
    assert result.path.read_bytes() == _image_bytes("redirected.jpg")[0]
    chain = fetcher.fetch(server.url("/chain/5"))  # exactly max_redirects = 5
    assert chain.ok, chain.detail
    assert server.state.hits["/chain/0"] == 1
    # the cache is keyed by the URL as written, so the redirect is not followed again
    before = server.state.total
    again = fetcher.fetch(server.url("/redirect.jpg"))
    assert again.from_cache and again.key == result.key and server.state.total == before


def test_transient_500_is_retried(server: Server, fetcher: Fetcher) -> None:
    result = fetcher.fetch(server.url("/flaky.jpg"))
    assert result.ok, result.detail
    assert result.attempts == 2 and server.state.hits["/flaky.jpg"] == 2


def test_retry_after_is_honoured_within_the_cap(server: Server, tmp_path: Path) -> None:
    waits: list[float] = []
    with Fetcher(cache=tmp_path / "a", retries=2, max_backoff=30.0) as f:
        f._sleep = waits.append
        assert f.fetch(server.url("/busy.jpg")).ok
    assert waits == [7.0]  # Retry-After: 7
    server.state.reset()
    waits.clear()
    with Fetcher(cache=tmp_path / "b", retries=2, max_backoff=0.5) as f:
        f._sleep = waits.append
        assert f.fetch(server.url("/busy.jpg")).ok
    assert waits == [0.5]  # capped at max_backoff


def test_backoff_grows_exponentially_with_jitter(server: Server, tmp_path: Path) -> None:
    waits: list[float] = []
    with Fetcher(cache=tmp_path, retries=4, backoff=1.0, max_backoff=5.0) as f:
        f._sleep = waits.append
        result = f.fetch(server.url("/always503.jpg"))
    assert result.reason == "http_error" and result.status == 503 and result.attempts == 5
    assert server.state.hits["/always503.jpg"] == 5
    assert len(waits) == 4
    for attempt, wait in enumerate(waits):
        base = min(5.0, 2.0**attempt)
        assert base / 2 <= wait <= base
    assert "503" in result.detail and "gave up after 5 attempts" in result.detail


def test_kept_alive_connections_are_reused(server: Server, tmp_path: Path) -> None:
    with Fetcher(cache=tmp_path, workers=1, timeout=5.0) as f:
        results = f.fetch_many([server.url(f"/good/k{i}.jpg") for i in range(12)], show_progress=False)
    assert all(r.ok for r in results.values())
    assert server.state.connections == 1


def test_a_connection_closed_by_the_server_is_replaced(server: Server, tmp_path: Path) -> None:
    with Fetcher(cache=tmp_path, workers=1, timeout=5.0, retries=0) as f:
        first = f.fetch(server.url("/sneaky-close.jpg"))
        time.sleep(0.1)
        second = f.fetch(server.url("/good/after.jpg"))
    assert first.ok and second.ok, (first.detail, second.detail)
    assert second.attempts == 1 and server.state.connections == 2


def test_concurrency_is_bounded(server: Server, tmp_path: Path) -> None:
    urls = [server.url(f"/concurrent/{i}.jpg") for i in range(24)]
    results = fetch_images(urls, cache=tmp_path, workers=3, timeout=5.0, show_progress=False)
    assert len(results) == 24 and all(r.ok for r in results.values())
    assert 1 <= server.state.max_in_flight <= 3


def test_each_distinct_url_is_fetched_once_and_cached_across_fetchers(server: Server, tmp_path: Path) -> None:
    urls = [server.url(f"/good/d{i % 5}.jpg") for i in range(15)]  # 5 distinct, each 3 times
    first = fetch_images(urls, cache=tmp_path, timeout=5.0, show_progress=False)
    assert list(first) == urls[:5]
    assert server.state.total == 5 and all(r.ok and not r.from_cache for r in first.values())
    second = fetch_images(urls, cache=DownloadCache(tmp_path), timeout=5.0, show_progress=False)
    assert server.state.total == 5  # nothing fetched again
    assert all(r.from_cache for r in second.values())
    assert [r.key for r in second.values()] == [r.key for r in first.values()]


def test_two_fetchers_share_one_cache_concurrently(server: Server, tmp_path: Path) -> None:
    urls = [server.url(f"/good/s{i}.jpg") for i in range(20)]
    out: list[dict[str, FetchResult]] = []

    def run() -> None:
        out.append(fetch_images(urls, cache=tmp_path, workers=4, timeout=5.0, show_progress=False))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 2
    for results in out:
        for url, r in results.items():
            assert r.ok, r.detail
            assert r.path.read_bytes() == _image_bytes(url.rsplit("/", 1)[1])[0]
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == []
    third = fetch_images(urls, cache=tmp_path, show_progress=False)
    assert all(r.from_cache for r in third.values())


def test_a_url_downloading_elsewhere_is_waited_for_then_reused(server: Server, tmp_path: Path) -> None:
    """The cache's inter-process lock: lock, look again, reuse what the other downloader stored."""
    url = server.url("/good/shared.jpg")
    cache = DownloadCache(tmp_path)
    out: dict[str, FetchResult] = {}
    with cache.url_lock(url) as held:  # this thread plays the other process that is downloading url
        assert held
        waiter = threading.Thread(
            target=lambda: out.update(fetch_images([url], cache=tmp_path, show_progress=False))
        )
        waiter.start()
        time.sleep(0.3)
        assert server.state.total == 0 and not out  # it waits instead of downloading too
        with Fetcher(cache=cache) as f:  # the lock is re-entrant in the thread holding it
            first = f.fetch(url)
    waiter.join(10)
    assert first.ok and not first.from_cache
    assert out[url].ok and out[url].from_cache and out[url].key == first.key
    assert server.state.total == 1


# ==============================================================================================================
# Fetcher: bad answers become reasons, never exceptions


BAD_CASES = [
    # (path, reason, requests made with retries=1)
    ("/missing.jpg", "http_not_found", 1),
    ("/gone.jpg", "http_not_found", 1),
    ("/forbidden.jpg", "http_forbidden", 1),
    ("/always503.jpg", "http_error", 2),
    ("/page.html", "not_an_image", 1),
    ("/fake.jpg", "not_an_image", 1),
    ("/empty.jpg", "empty_image", 1),
    ("/big.jpg", "too_large_image", 1),
    ("/endless.jpg", "too_large_image", 1),
    ("/truncated.jpg", "connection_error", 2),
    ("/loop/a", "redirect_loop", None),
    ("/chain/6", "too_many_redirects", None),
    ("/to-ftp.jpg", "unsupported_url_scheme", 1),
    ("/to-file.jpg", "unsupported_url_scheme", 1),
]


@pytest.mark.parametrize(("path", "reason", "n_requests"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_answers_become_reasons(
    server: Server, fetcher: Fetcher, path: str, reason: str, n_requests: int | None
) -> None:
    url = server.url(path)
    result = fetcher.fetch(url)
    assert result.reason == reason, result.detail
    assert not result.ok and result.path is None and result.key is None
    assert url in result.detail
    assert reason in FETCH_REASONS
    if n_requests is not None:
        assert server.state.hits[path] == n_requests
    assert fetcher.cache.lookup(url) is None  # failures are not cached
    assert _leftover_temps(fetcher) == []


def test_redirect_details_name_the_hops(server: Server, fetcher: Fetcher) -> None:
    loop = fetcher.fetch(server.url("/loop/a"))
    assert server.url("/loop/b") in loop.detail
    assert server.state.hits["/loop/a"] == 1 and server.state.hits["/loop/b"] == 1
    chain = fetcher.fetch(server.url("/chain/6"))
    assert "more than 5 redirects" in chain.detail
    assert server.state.hits["/chain/1"] == 1 and server.state.hits["/chain/0"] == 0
    ftp = fetcher.fetch(server.url("/to-ftp.jpg"))
    assert "ftp://127.0.0.1/x.jpg" in ftp.detail


def test_size_cap_checks_content_length_first_then_counts(server: Server, fetcher: Fetcher) -> None:
    big = fetcher.fetch(server.url("/big.jpg"))  # refused from its header, before any byte of the body
    assert big.reason == "too_large_image"
    declared = len(_image_bytes("base.jpg")[0]) + 2 * CAP
    assert f"Content-Length {declared} bytes" in big.detail and "cut off" not in big.detail
    endless = fetcher.fetch(server.url("/endless.jpg"))  # no Content-Length: counted while streaming
    assert endless.reason == "too_large_image"
    assert f"cap of {CAP} bytes" in endless.detail and "cut off" in endless.detail
    assert server.state.endless_closed.wait(10), "the client kept reading the endless body"


def test_slow_answers_time_out(server: Server, tight: Fetcher) -> None:
    slow = tight.fetch(server.url("/slow.jpg"))
    assert slow.reason == "timeout" and "read timeout" in slow.detail, slow.detail
    assert slow.attempts == 2 and server.state.hits["/slow.jpg"] == 2  # timeouts are retried
    drip = tight.fetch(server.url("/drip.jpg"))
    assert drip.reason == "timeout" and "total_timeout" in drip.detail, drip.detail
    assert server.url("/drip.jpg") in drip.detail
    assert _leftover_temps(tight) == []


def test_refused_connections_and_the_host_failure_limit(tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    urls = [f"http://127.0.0.1:{port}/{i}.jpg" for i in range(6)]
    with Fetcher(cache=tmp_path, workers=1, retries=1, backoff=0.001, host_failure_limit=2) as f:
        results = list(f.fetch_many(urls, show_progress=False).values())
    assert [r.reason for r in results] == ["connection_error"] * 6
    assert [r.attempts for r in results] == [2, 2, 0, 0, 0, 0]
    assert "refused" in results[0].detail and "skipped" in results[2].detail
    assert all(r.url in r.detail for r in results)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("file:///etc/passwd", "unsupported_url_scheme"),
        ("ftp://127.0.0.1/x.jpg", "unsupported_url_scheme"),
        ("data:image/png;base64,iVBORw0KGgo=", "unsupported_url_scheme"),
        ("s3://bucket/key.jpg", "unsupported_url_scheme"),
        ("http:///nohost.jpg", "bad_url"),
        ("http://127.0.0.1:99999/x.jpg", "bad_url"),
    ],
)
def test_other_schemes_and_bad_urls_are_refused_without_a_request(
    server: Server, fetcher: Fetcher, url: str, reason: str
) -> None:
    result = fetcher.fetch(url)
    assert result.reason == reason and url in result.detail and result.attempts == 0
    assert server.state.total == 0


# ==============================================================================================================
# Air-gapped mode and the cache's integrity


def test_network_enabled_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CCCLIP_OFFLINE", raising=False)
    assert network_enabled() is True
    for value in ("1", "true", "YES", "on"):
        monkeypatch.setenv("CCCLIP_OFFLINE", value)
        assert network_enabled() is False
        assert network_enabled(True) is True  # an explicit argument wins
    monkeypatch.setenv("CCCLIP_OFFLINE", "0")
    assert network_enabled() is True
    assert network_enabled(False) is False


def test_offline_makes_no_request_but_serves_the_cache(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached, other = server.url("/good/c.jpg"), server.url("/good/never.jpg")
    assert fetch_images([cached], cache=tmp_path, show_progress=False)[cached].ok
    assert server.state.total == 1
    monkeypatch.setenv("CCCLIP_OFFLINE", "1")
    for options in ({}, {"network": False}):
        results = fetch_images([cached, other], cache=tmp_path, show_progress=False, **options)
        assert results[cached].ok and results[cached].from_cache
        assert results[other].reason == "network_disabled"
        assert other in results[other].detail and "CCCLIP_OFFLINE" in results[other].detail
    assert server.state.total == 1  # no request at all while offline
    assert fetch_images([other], cache=tmp_path, network=True, show_progress=False)[other].ok
    assert server.state.total == 2


def test_corrupt_cached_body_is_detected_and_fetched_again(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = server.url("/good/fragile.jpg")
    first = fetch_images([url], cache=tmp_path, show_progress=False)[url]
    good = first.path.read_bytes()
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF  # same size, one byte changed: only the hash can tell
    first.path.chmod(0o644)
    first.path.write_bytes(bytes(flipped))
    with caplog.at_level(logging.WARNING, logger="ccclip_widgets.fetch"):
        offline = fetch_images([url], cache=tmp_path, network=False, show_progress=False)[url]
    assert offline.reason == "network_disabled" and "corrupt" in offline.detail and offline.repaired
    assert "corrupt" in caplog.text and url in caplog.text
    assert server.state.total == 1
    again = fetch_images([url], cache=tmp_path, show_progress=False)[url]
    assert again.ok and not again.from_cache and server.state.total == 2
    assert again.path.read_bytes() == good and again.key == first.key
    first.path.write_bytes(good[:10])  # cut short: caught by the size check
    third = fetch_images([url], cache=tmp_path, show_progress=False)[url]
    assert third.ok and third.repaired and server.state.total == 3
    assert fetch_images([url], cache=tmp_path, show_progress=False)[url].from_cache


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to fake a full disk")
def test_a_full_disk_raises_instead_of_rejecting_every_row(
    server: Server, fetcher: Fetcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full cache disk concerns every URL: it stops the run with DiskFullError instead of N rejects."""
    from ccclip_widgets._io import DiskFullError

    def full_disk_temp() -> tuple[int, Path]:
        return os.open("/dev/full", os.O_WRONLY), fetcher.cache.tmp / "never-created.part"

    monkeypatch.setattr(fetcher.cache, "new_temp", full_disk_temp)
    with pytest.raises(DiskFullError, match="No space left"):
        fetcher.fetch_many([server.url("/good/full.jpg")], show_progress=False)
    with pytest.raises(DiskFullError):
        read_posts(
            pl.DataFrame({"post_id": ["1"], "image": [server.url("/good/full2.jpg")], "text": ["t"]}),
            fetcher=fetcher,
            show_progress=False,
        )


def test_proxy_from_the_environment(
    server: Server, fetcher: Fetcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("http_proxy", server.base)
    url = "http://images.example.invalid/good/proxied.jpg"
    with Fetcher(cache=fetcher.cache, timeout=5.0) as f:
        result = f.fetch(url)
    assert result.ok, result.detail
    assert server.state.proxied == [url]
    # no_proxy hosts bypass the proxy (here a proxy that refuses every connection)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    dead_proxy = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    monkeypatch.setenv("http_proxy", dead_proxy)
    direct = server.url("/good/direct.jpg")
    with Fetcher(cache=fetcher.cache, timeout=5.0, retries=0) as f:
        refused = f.fetch(direct)
        monkeypatch.setenv("no_proxy", "127.0.0.1")
    with Fetcher(cache=fetcher.cache, timeout=5.0, retries=0) as f:
        bypassed = f.fetch(direct)
    assert refused.reason == "connection_error" and "refused" in refused.detail
    assert bypassed.ok, bypassed.detail
    assert server.state.proxied == [url] and server.state.hits["/good/direct.jpg"] == 1
