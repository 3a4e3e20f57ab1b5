"""Image URLs: downloading (ccclip_widgets.fetch) and URL rows in read_posts, against a local HTTP server.

The server (127.0.0.1, a free port, a thread) serves good images and every kind of bad answer a real CDN gives:
slow, missing, failing then recovering, web pages, lies about the content type, oversized and endless bodies,
redirects (good, circular, too long, to other schemes), cut connections. It counts requests per path,
connections and requests in flight, so tests can assert what went over the wire.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from ccclip_testkit import draw_shape, make_shape_posts
from PIL import Image

from ccclip_widgets.fetch import (
    FETCH_REASONS,
    DownloadCache,
    FetchConfig,
    Fetcher,
    FetchResult,
    fetch_images,
    network_enabled,
    sniff_image_format,
)
from ccclip_widgets.posts import REJECT_REASONS, Posts, read_posts

CAP = 256 * 1024  # max_bytes in these tests
SLOW_S = 1.0  # the slow route waits this long before answering
PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "all_proxy")


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _image_bytes(name: str) -> tuple[bytes, str]:
    """Distinct, deterministic image bytes for a file name (JPEG unless it ends in .png)."""
    seed = int(hashlib.md5(name.encode()).hexdigest()[:6], 16)
    colors = ("red", "green", "blue", "yellow", "purple", "orange")
    shapes = ("square", "circle", "triangle", "stripes")
    img = draw_shape(colors[seed % 6], shapes[seed // 6 % 4], size=40, seed=seed)
    if name.endswith(".png"):
        return _encode(img, "PNG"), "image/png"
    return _encode(img, "JPEG"), "image/jpeg"


def _blake(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


HTML = (
    b"<!doctype html><html><head><title>Log in</title></head><body>Please log in to see this.</body></html>"
)


# ==============================================================================================================
# The local server


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    hits: Counter = field(default_factory=Counter)
    connections: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    proxied: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)  # served under /files/<name>
    endless_closed: threading.Event = field(default_factory=threading.Event)

    def reset(self) -> None:
        with self.lock:
            self.hits.clear()
            self.connections = self.in_flight = self.max_in_flight = 0
            self.proxied.clear()
            self.files.clear()
            self.endless_closed.clear()

    @property
    def total(self) -> int:
        with self.lock:
            return sum(self.hits.values())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked bodies, like real servers
    disable_nagle_algorithm = True  # TCP_NODELAY, like real servers (else 40 ms per keep-alive request)

    def setup(self) -> None:
        super().setup()
        with self.server.state.lock:  # type: ignore[attr-defined]
            self.server.state.connections += 1  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str | None = None, **headers: str) -> None:
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        headers.setdefault("Content_Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def _image(self, name: str) -> None:
        body, ctype = _image_bytes(name)
        self._send(200, body, ctype)

    def do_GET(self) -> None:
        state: _State = self.server.state  # type: ignore[attr-defined]
        path = self.path
        if path.startswith("http://"):  # absolute form: we are being used as a forwarding proxy
            state.proxied.append(path)
            path = "/" + path.split("/", 3)[3]
        path = path.split("?", 1)[0]
        with state.lock:
            state.hits[path] += 1
            hit = state.hits[path]
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            self._route(path, hit, state)
        except OSError:  # the client went away (cut off, timed out): expected in several tests
            self.close_connection = True
        finally:
            with state.lock:
                state.in_flight -= 1

    def _route(self, path: str, hit: int, state: _State) -> None:
        jpeg, _ = _image_bytes("base.jpg")
        if path.startswith("/good/"):
            self._image(path[len("/good/") :])
        elif path.startswith("/files/") and path[len("/files/") :] in state.files:
            name = path[len("/files/") :]
            self._send(200, state.files[name], "image/png" if name.endswith(".png") else "image/jpeg")
        elif path.startswith("/concurrent/"):
            time.sleep(0.05)
            self._image(path.rsplit("/", 1)[1])
        elif path == "/missing.jpg":
            self._send(404, b"not found", "text/plain")
        elif path == "/gone.jpg":
            self._send(410, b"gone", "text/plain")
        elif path == "/forbidden.jpg":
            self._send(403, HTML, "text/html")
        elif path == "/flaky.jpg":
            if hit == 1:
                self._send(500, b"oops", "text/plain")
            else:
                self._image("flaky.jpg")
        elif path == "/busy.jpg":
            if hit == 1:
                self._send(429, b"slow down", "text/plain", Retry_After="7")
            else:
                self._image("busy.jpg")
        elif path == "/always503.jpg":
            self._send(503, b"maintenance", "text/plain")
        elif path == "/slow.jpg":
            time.sleep(SLOW_S)
            self._image("slow.jpg")
        elif path == "/page.html":
            self._send(200, HTML, "text/html; charset=utf-8")
        elif path == "/octet.bin":
            self._send(200, _image_bytes("octet.jpg")[0], "application/octet-stream")
        elif path == "/fake.jpg":
            self._send(200, HTML, "image/jpeg")
        elif path == "/empty.jpg":
            self._send(200, b"", "image/jpeg")
        elif path == "/big.jpg":  # honest Content-Length above the cap
            self._send(200, jpeg + b"\0" * (2 * CAP), "image/jpeg")
        elif path == "/endless.jpg":  # chunked, no Content-Length, never ends
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = jpeg[:64] + b"\0" * 16000
            try:
                for _ in range(20_000):  # 320 MB at most, should the client never stop
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                state.endless_closed.set()
            self.close_connection = True
        elif path == "/chunked-good.jpg":  # a good image sent chunked
            body = _image_bytes("chunked.jpg")[0]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(body), 100):
                part = body[start : start + 100]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/drip.jpg":  # sends a byte every 50 ms: each wait is short, the whole is too long
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "5000")
            self.end_headers()
            self.wfile.write(jpeg[:64])
            for _ in range(200):
                time.sleep(0.05)
                self.wfile.write(b"\0")
            self.close_connection = True
        elif path == "/truncated.jpg":  # promises more bytes than it sends, then hangs up
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(jpeg) + 1000))
            self.end_headers()
            self.wfile.write(jpeg)
            self.close_connection = True
        elif path == "/sneaky-close.jpg":  # keep-alive answer, then the server closes the connection anyway
            self._image("sneaky.jpg")
            self.close_connection = True
        elif path == "/redirect.jpg":
            self._send(302, ctype="text/plain", Location="/good/redirected.jpg")
        elif path == "/loop/a":
            self._send(302, Location="/loop/b")
        elif path == "/loop/b":
            self._send(301, Location="/loop/a")
        elif path.startswith("/chain/"):
            n = int(path.rsplit("/", 1)[1])
            if n == 0:
                self._image("chain-end.jpg")
            else:
                self._send(307, Location=f"/chain/{n - 1}")
        elif path == "/to-ftp.jpg":
            self._send(302, Location="ftp://127.0.0.1/x.jpg")
        elif path == "/to-file.jpg":
            self._send(302, Location="file:///etc/passwd")
        else:
            self._send(404, b"no such route", "text/plain")


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that hang up mid-answer are part of the tests


@dataclass
class Server:
    base: str
    state: _State

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture(scope="module")
def _server() -> Server:
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    httpd.state = _State()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", httpd.state)  # type: ignore[attr-defined]
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def server(_server: Server, monkeypatch: pytest.MonkeyPatch) -> Server:
    """The module's server with fresh counters; proxy and offline variables cleared for the test."""
    _server.state.reset()
    for name in (*PROXY_VARS, "CCCLIP_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return _server


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


# ==============================================================================================================
# read_posts with URL rows


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
