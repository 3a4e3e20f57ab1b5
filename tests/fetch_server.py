"""A local HTTP server that answers like a real CDN, good and bad, for the download tests.

Used by tests/test_fetch.py (the Fetcher), tests/test_fetch_posts.py (read_posts with URL rows) and, over
TLS, tests/test_fetch_https.py; the ``server`` fixture in tests/conftest.py runs it. It serves good images and
every kind of bad answer a real CDN gives: slow, missing, failing then recovering, web pages, lies about the
content type, oversized and endless bodies, redirects (good, circular, too long, to other schemes), cut
connections. It counts requests per path, connections and requests in flight, so tests can assert what went
over the wire.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ccclip_testkit import draw_shape
from PIL import Image

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
