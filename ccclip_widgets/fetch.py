"""Download images from ``http(s)`` URLs into a content-addressed cache, safely and once.

Real exports from social platforms list media as URLs. :class:`Fetcher` downloads them with the care that
untrusted servers need:

- bounded concurrency (a thread pool, :data:`DEFAULT_WORKERS` by default) and kept-alive connections per host;
- separate connect and read timeouts plus a total time limit per download (a server that drips one byte at a
  time cannot hold a worker forever);
- retries with exponential back-off and jitter for transient failures only (connection errors, timeouts,
  408/425/429 and 5xx answers); ``Retry-After`` is honoured up to ``max_backoff`` seconds; 404, 403, 410 and
  the other client errors are never retried;
- a size cap checked twice: ``Content-Length`` up front, and a running count while streaming, so an endless
  body is cut off at the cap;
- a content check twice: the ``Content-Type`` must be ``image/*`` (``application/octet-stream`` or a missing
  type are tolerated) and the first bytes must be those of a JPEG, PNG, GIF, WebP, BMP, TIFF or AVIF/HEIF file;
- at most ``max_redirects`` redirects, loops detected, every target re-checked to be ``http``/``https``;
- only ``http`` and ``https``: ``file://``, ``ftp://``, ``data:`` and the rest are refused with a reason;
- proxies from the usual environment variables (``http_proxy``, ``https_proxy``, ``no_proxy``).

Bodies are streamed to a temporary file and never held in memory. Each finished body is stored once under the
BLAKE2b-128 hash of its bytes, and a small file per URL maps the URL to that hash (:class:`DownloadCache`), so
nothing is fetched twice, across runs and processes. Every write is atomic (temporary file, then rename). A
cached body is re-hashed when used; one that no longer matches its hash is reported, deleted and downloaded
again. Failed downloads are not cached: running again retries them.

Air-gapped use: ``network=False`` (or the environment variable ``CCCLIP_OFFLINE=1``) never opens a connection;
URLs already in the cache are still served from it (they are verified local files, and re-running a notebook
offline after one online run is the common case), every other URL fails with ``network_disabled``.

Failures are values, not exceptions: :class:`FetchResult` carries a machine-friendly ``reason`` (see
:data:`FETCH_REASONS`) and a ``detail`` that names the URL and what to do. Only local problems that concern
every URL (the cache disk is full or not writable) raise.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import errno
import hashlib
import http.client
import json
import logging
import os
import random
import select
import socket
import ssl
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ._io import DiskFullError, atomic_write_bytes, blake2b_file, blake2b_hex, default_cache_dir

__all__ = [
    "DEFAULT_MAX_DOWNLOAD_BYTES",
    "DEFAULT_MAX_REDIRECTS",
    "DEFAULT_TIMEOUT",
    "DEFAULT_WORKERS",
    "FETCH_REASONS",
    "OFFLINE_ENV",
    "CacheEntry",
    "DownloadCache",
    "FetchConfig",
    "FetchResult",
    "Fetcher",
    "fetch_images",
    "network_enabled",
    "sniff_image_format",
]

logger = logging.getLogger(__name__)

DEFAULT_WORKERS = 16
#: (connect, read) timeouts in seconds. The read timeout bounds every wait for data, not the whole download.
DEFAULT_TIMEOUT: tuple[float, float] = (10.0, 30.0)
DEFAULT_TOTAL_TIMEOUT = 300.0
DEFAULT_MAX_REDIRECTS = 5
DEFAULT_MAX_DOWNLOAD_BYTES = 50 * 2**20  # the same as images.DEFAULT_MAX_BYTES
OFFLINE_ENV = "CCCLIP_OFFLINE"

FETCH_REASONS: dict[str, str] = {
    "unsupported_url_scheme": "only http and https URLs are downloaded (not file://, ftp://, data:, s3://, ...)",
    "bad_url": "the URL cannot be parsed (no host, bad port, invalid characters)",
    "network_disabled": "the URL is not in the download cache and the network is off (CCCLIP_OFFLINE / network=False)",
    "http_not_found": "the server answered 404 Not Found or 410 Gone",
    "http_forbidden": "the server answered 401 or 403 (expired or private link)",
    "http_error": "the server answered another HTTP error (5xx and 429 only after the retries)",
    "timeout": "connecting, waiting for data or the whole download took too long (after the retries)",
    "connection_error": "the connection failed: host unknown, refused, reset or cut short (after the retries)",
    "tls_error": "the TLS (https) handshake or certificate check failed",
    "too_many_redirects": "the URL redirects more often than allowed",
    "redirect_loop": "the URL redirects in a circle",
    "too_large_image": "the download exceeds the size cap",
    "not_an_image": "the server sent something that is not an image (wrong content type or first bytes)",
    "empty_image": "the server sent an empty body",
}

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_OK_STATUSES = frozenset({200, 203})
_TOLERATED_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream", "application/binary"})
_CHUNK = 64 * 1024
_SNIFF_BYTES = 32
_DRAIN_LIMIT = 64 * 1024  # bytes of a redirect or error body read so that the connection can be reused
_MAX_IDLE_PER_HOST = 32
_TMP_MAX_AGE = 24 * 3600.0
_HEIF_BRANDS = frozenset({b"avif", b"avis", b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"})
_BMP_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})


def network_enabled(network: bool | None = None) -> bool:
    """Whether downloads may use the network.

    Parameters
    ----------
    network
        ``True`` or ``False`` decides; ``None`` (default) reads ``$CCCLIP_OFFLINE``: ``1``, ``true``, ``yes``
        or ``on`` turn the network off.

    Returns
    -------
    bool
        ``False`` in air-gapped mode.
    """
    if network is not None:
        return bool(network)
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def sniff_image_format(head: bytes) -> str | None:
    """Name the image format from a file's first bytes (magic numbers), or ``None``.

    Parameters
    ----------
    head
        At least the first 18 bytes of the file (fewer only when the file is that short).

    Returns
    -------
    str or None
        ``"JPEG"``, ``"PNG"``, ``"GIF"``, ``"WEBP"``, ``"BMP"``, ``"TIFF"``, ``"HEIF"`` (AVIF and HEIC), or
        ``None`` when the bytes are not those of a supported image format.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "HEIF"
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    return None


@dataclass(frozen=True, slots=True)
class FetchConfig:
    """How to download image URLs: the :class:`Fetcher` arguments as one value (``read_posts(fetcher=...)``).

    Every field is a :class:`Fetcher` argument (see there); ``max_bytes=None`` means "the caller's image size
    cap" (``read_posts``' ``max_bytes``, else :data:`DEFAULT_MAX_DOWNLOAD_BYTES`).

    Examples
    --------
    >>> read_posts("posts.csv", fetcher=FetchConfig(network=False))  # doctest: +SKIP
    >>> read_posts("posts.csv", fetcher=FetchConfig(workers=4, timeout=(5, 20), retries=1))  # doctest: +SKIP
    """

    cache: Any = None  # DownloadCache, a folder, or None (the toolkit cache's downloads/)
    network: bool | None = None
    workers: int = DEFAULT_WORKERS
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT
    total_timeout: float = DEFAULT_TOTAL_TIMEOUT
    retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_bytes: int | None = None
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    user_agent: str | None = None
    verify_cache: bool = True
    trust_env: bool = True
    host_failure_limit: int | None = 8
    ca_certs: str | os.PathLike[str] | None = None

    def fetcher(self, *, max_bytes: int | None = None) -> Fetcher:
        """A new :class:`Fetcher` with these settings (``max_bytes`` fills in an unset size cap)."""
        options = {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]
        cap = self.max_bytes if self.max_bytes is not None else max_bytes
        options["max_bytes"] = cap if cap is not None else DEFAULT_MAX_DOWNLOAD_BYTES
        return Fetcher(**options)


# ==============================================================================================================
# Results


@dataclass(frozen=True, slots=True)
class FetchResult:
    """The outcome of fetching one URL.

    Attributes
    ----------
    url
        The URL as requested.
    path
        The cached body (content-addressed, read-only by convention) when the fetch succeeded, else ``None``.
    key
        BLAKE2b-128 hex digest of the body (the same key ``read_posts`` gives the same image passed as bytes).
    size
        Body size in bytes (0 on failure).
    reason
        ``None`` on success, else a code from :data:`FETCH_REASONS`.
    detail
        A sentence naming the URL and what to do (on success: where the body came from).
    status
        The last HTTP status received, if any.
    attempts
        Network attempts made (0 for cache hits and for URLs refused before any request).
    from_cache
        The body came from the download cache without any network request.
    repaired
        A cached copy was found corrupt (its hash no longer matched) and was discarded.
    content_type
        The ``Content-Type`` the server sent.
    final_url
        The URL after redirects.
    image_format
        The format named by the body's first bytes (see :func:`sniff_image_format`).
    """

    url: str
    path: Path | None = None
    key: str | None = None
    size: int = 0
    reason: str | None = None
    detail: str = ""
    status: int | None = None
    attempts: int = 0
    from_cache: bool = False
    repaired: bool = False
    content_type: str | None = None
    final_url: str | None = None
    image_format: str | None = None

    @property
    def ok(self) -> bool:
        """True when the body is available at :attr:`path`."""
        return self.reason is None


class _Failure(Exception):
    """Internal: one attempt failed. ``retryable`` says whether another attempt may help."""

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status


# ==============================================================================================================
# The cache


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A URL found in the download cache.

    Attributes
    ----------
    url
        The URL.
    key
        BLAKE2b-128 hex digest of the body.
    path
        The body file.
    size
        Body size in bytes.
    content_type, final_url, image_format, fetched_at
        What the server sent and when (ISO 8601, UTC).
    """

    url: str
    key: str
    path: Path
    size: int
    content_type: str | None = None
    final_url: str | None = None
    image_format: str | None = None
    fetched_at: str | None = None


class DownloadCache:
    """Content-addressed store of downloaded bodies plus a URL -> content-hash map.

    Layout under ``root``: ``objects/<k[:2]>/<k>`` holds a body whose BLAKE2b-128 hex digest is ``k``;
    ``urls/<u[:2]>/<u>.json`` (``u`` = BLAKE2b-128 of the URL) records the URL, its body's key, size, content
    type and final URL; ``tmp/`` holds downloads in progress (same file system, so a finished body is renamed
    into place atomically). One small file per URL keeps concurrent writers (threads or processes) from ever
    rewriting a shared index. Temporary files older than a day (left by killed processes) are removed when a
    cache is opened.

    Parameters
    ----------
    root
        Cache folder (default: ``downloads`` in the toolkit cache, ``$CCCLIP_CACHE`` or ``~/.cache/ccclip_widgets``).
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir() / "downloads"
        self.objects = self.root / "objects"
        self.urls = self.root / "urls"
        self.tmp = self.root / "tmp"
        for folder in (self.objects, self.urls, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()

    def __repr__(self) -> str:
        return f"DownloadCache({str(self.root)!r})"

    def _remove_stale_temps(self) -> None:
        cutoff = time.time() - _TMP_MAX_AGE
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.tmp):
                with contextlib.suppress(OSError):
                    if entry.is_file() and entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)

    def body_path(self, key: str) -> Path:
        """Where the body with content hash ``key`` lives (it may not exist)."""
        return self.objects / key[:2] / key

    def _map_path(self, url: str) -> Path:
        digest = blake2b_hex(url)
        return self.urls / digest[:2] / f"{digest}.json"

    def lookup(self, url: str, *, verify: bool = True) -> CacheEntry | None:
        """The cached body of ``url``, or ``None`` when it is not cached (or its copy was corrupt).

        Parameters
        ----------
        url
            The URL exactly as it will be requested.
        verify
            Re-hash the body and compare it with its key (a corrupt copy is deleted and ``None`` returned).

        Returns
        -------
        CacheEntry or None
        """
        entry, _ = self._lookup(url, verify=verify)
        return entry

    def _lookup(self, url: str, *, verify: bool) -> tuple[CacheEntry | None, str | None]:
        """Return (entry, problem): ``problem`` describes a corrupt copy that was discarded."""
        try:
            record = json.loads(self._map_path(url).read_bytes())
        except (OSError, ValueError):  # not cached, or a map file cut short by a crash
            return None, None
        if not isinstance(record, dict) or record.get("url") != url or not isinstance(record.get("key"), str):
            return None, None
        key: str = record["key"]
        path = self.body_path(key)
        try:
            size = path.stat().st_size
        except OSError:
            return None, None  # body deleted (cache pruned by hand, or discarded as corrupt): fetch again
        problem = None
        if size != record.get("size"):
            problem = f"size {size} bytes, expected {record.get('size')}"
        elif verify:
            try:
                actual = blake2b_file(path)
            except OSError as exc:
                return None, f"unreadable ({exc})"
            if actual != key:
                problem = f"content hash {actual}, expected {key}"
        if problem is not None:
            logger.warning(
                "download cache: the cached copy of %s (%s) is corrupt: %s; it is deleted and fetched again",
                url,
                path,
                problem,
            )
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None, problem
        return (
            CacheEntry(
                url=url,
                key=key,
                path=path,
                size=size,
                content_type=record.get("content_type"),
                final_url=record.get("final_url"),
                image_format=record.get("image_format"),
                fetched_at=record.get("fetched_at"),
            ),
            None,
        )

    def new_temp(self) -> tuple[int, Path]:
        """Open a new temporary file in the cache (for a body being downloaded).

        Returns
        -------
        (int, Path)
            An open file descriptor and the file's path.
        """
        fd, name = tempfile.mkstemp(prefix="dl.", suffix=".part", dir=self.tmp)
        return fd, Path(name)

    def commit(
        self,
        url: str,
        temp: Path,
        key: str,
        size: int,
        *,
        content_type: str | None = None,
        final_url: str | None = None,
        image_format: str | None = None,
    ) -> CacheEntry:
        """Move a finished, fsynced temporary body into place and record ``url`` -> ``key``.

        The body is renamed first and the URL record written after it, so a record never points at a body
        that was not there when it was written.

        Parameters
        ----------
        url
            The URL the body was downloaded from.
        temp
            The temporary file from :meth:`new_temp` (consumed).
        key
            BLAKE2b-128 hex digest of the body.
        size
            Body size in bytes.
        content_type, final_url, image_format
            Recorded with the URL.

        Returns
        -------
        CacheEntry
        """
        path = self.body_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(temp, 0o644)
        os.replace(temp, path)  # identical content under the same name: replacing is harmless
        fetched_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record = {
            "url": url,
            "key": key,
            "size": size,
            "content_type": content_type,
            "final_url": final_url,
            "image_format": image_format,
            "fetched_at": fetched_at,
        }
        atomic_write_bytes(self._map_path(url), json.dumps(record, sort_keys=True).encode("utf-8"))
        return CacheEntry(url, key, path, size, content_type, final_url, image_format, fetched_at)


# ==============================================================================================================
# URLs and connections


@dataclass(frozen=True, slots=True)
class _Target:
    url: str
    scheme: str
    host: str  # ASCII (IDNA-encoded), without brackets
    port: int
    request_path: str  # path + query, percent-encoded

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port


_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"


def _parse_target(url: str, *, via: str | None = None) -> _Target:
    """Check that ``url`` is an http(s) URL with a host and build the request target; raise _Failure if not."""
    where = f" (redirected from {via})" if via else ""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError as exc:
        raise _Failure(
            "bad_url", f"{url}{where}: not a valid URL ({exc}); fix the URL in the image column"
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        shown = f"{scheme}:" if scheme else "no scheme"
        raise _Failure(
            "unsupported_url_scheme",
            f"{url}{where}: {shown} URLs are not downloaded, only http and https; put a local path (relative "
            "to image_root) or the image bytes in the image column instead",
        )
    if not host:
        raise _Failure("bad_url", f"{url}{where}: the URL has no host name; fix the URL in the image column")
    try:
        host.encode("ascii")
    except UnicodeEncodeError:
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise _Failure("bad_url", f"{url}{where}: the host name {host!r} is not valid") from None
    if any(c in host for c in " \t\r\n/\\"):
        raise _Failure("bad_url", f"{url}{where}: the host name {host!r} is not valid")
    path = urllib.parse.quote(parts.path or "/", safe=_PATH_SAFE)
    if not path.startswith("/"):
        path = "/" + path
    if parts.query:
        path += "?" + urllib.parse.quote(parts.query, safe=_QUERY_SAFE)
    return _Target(
        url=url,
        scheme=scheme,
        host=host,
        port=port or (443 if scheme == "https" else 80),
        request_path=path,
    )


def _strip_fragment(url: str) -> str:
    return urllib.parse.urldefrag(url)[0]


@dataclass(frozen=True, slots=True)
class _Proxy:
    host: str
    port: int
    auth: str | None  # value of a Proxy-Authorization header


def _parse_proxy(value: str) -> _Proxy | None:
    parts = urllib.parse.urlsplit(value if "://" in value else "http://" + value)
    try:
        port = parts.port or 8080
    except ValueError:
        return None
    if not parts.hostname:
        return None
    auth = None
    if parts.username is not None:
        raw = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        auth = "Basic " + base64.b64encode(raw.encode("utf-8")).decode("ascii")
    return _Proxy(parts.hostname, port, auth)


class _ConnectionPool:
    """Idle HTTP(S) connections per origin, shared by the worker threads (guarded by a lock)."""

    def __init__(self, connect_timeout: float, read_timeout: float, trust_env: bool) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: dict[tuple[Any, ...], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None
        self._proxies = urllib.request.getproxies_environment() if trust_env else {}

    def proxy_for(self, target: _Target) -> _Proxy | None:
        value = self._proxies.get(target.scheme)
        if not value:
            return None
        if urllib.request.proxy_bypass_environment(target.host, self._proxies):
            return None
        return _parse_proxy(value)

    def _ssl_context(self) -> ssl.SSLContext:
        with self._lock:
            if self._ssl is None:
                cafile = getattr(self, "ca_certs", None)
                self._ssl = ssl.create_default_context(cafile=os.fspath(cafile) if cafile else None)
            return self._ssl

    def acquire(
        self, target: _Target, proxy: _Proxy | None, *, fresh: bool = False
    ) -> tuple[http.client.HTTPConnection, bool]:
        """A connection to ``target``'s origin (via ``proxy``) and whether it was reused from the pool."""
        key = (*target.origin, proxy)
        if not fresh:
            with self._lock:
                idle = self._idle.get(key)
                conn = idle.pop() if idle else None
            while conn is not None:
                if _still_open(conn):
                    conn.sock.settimeout(self.read_timeout)  # type: ignore[union-attr]
                    return conn, True
                conn.close()
                with self._lock:
                    idle = self._idle.get(key)
                    conn = idle.pop() if idle else None
        conn = self._connect(target, proxy)
        return conn, False

    def _connect(self, target: _Target, proxy: _Proxy | None) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if target.scheme == "https":
            context = self._ssl_context()
            if proxy is not None:
                conn = http.client.HTTPSConnection(
                    proxy.host, proxy.port, timeout=self.connect_timeout, context=context
                )
                headers = {"Proxy-Authorization": proxy.auth} if proxy.auth else None
                conn.set_tunnel(target.host, target.port, headers=headers)
            else:
                conn = http.client.HTTPSConnection(
                    target.host, target.port, timeout=self.connect_timeout, context=context
                )
        elif proxy is not None:
            conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=self.connect_timeout)
        else:
            conn = http.client.HTTPConnection(target.host, target.port, timeout=self.connect_timeout)
        try:
            conn.connect()
            conn.sock.settimeout(self.read_timeout)  # type: ignore[union-attr]
        except BaseException as exc:
            conn.close()
            raise _classify(exc, target.url, phase="connect", timeout=self.connect_timeout) from None
        return conn

    def release(self, target: _Target, proxy: _Proxy | None, conn: http.client.HTTPConnection) -> None:
        key = (*target.origin, proxy)
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < _MAX_IDLE_PER_HOST:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


def _still_open(conn: http.client.HTTPConnection) -> bool:
    """An idle kept-alive socket that is readable has been closed by the server (or sent junk)."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def _classify(exc: BaseException, url: str, *, phase: str, timeout: float) -> _Failure:
    """Turn a network exception into a _Failure with a reason, a detail and whether to retry."""
    if isinstance(exc, _Failure):
        return exc
    if isinstance(exc, (socket.timeout, TimeoutError)):
        what = {
            "connect": f"connecting timed out after {timeout:g} s",
            "read": f"the server sent nothing for {timeout:g} s (read timeout)",
        }.get(phase, f"timed out ({phase})")
        return _Failure("timeout", f"{url}: {what}; the server is slow or unreachable", retryable=True)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _Failure(
            "tls_error",
            f"{url}: the server's TLS certificate failed verification ({exc.verify_message or exc}); "
            "fix the system's CA certificates (SSL_CERT_FILE) or the URL",
        )
    if isinstance(exc, ssl.SSLError):
        return _Failure("tls_error", f"{url}: TLS error ({exc})", retryable=True)
    if isinstance(exc, socket.gaierror):
        permanent = exc.errno in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None))
        return _Failure(
            "connection_error",
            f"{url}: cannot resolve the host name ({exc.strerror or exc}); check the URL and the network "
            "(or DNS/proxy settings)",
            retryable=not permanent,
        )
    if isinstance(exc, (http.client.InvalidURL, ValueError)):  # characters http.client refuses to send
        return _Failure("bad_url", f"{url}: invalid URL ({exc}); fix the URL in the image column")
    if isinstance(exc, http.client.IncompleteRead):
        return _Failure(
            "connection_error",
            f"{url}: the connection closed after {len(exc.partial)} bytes, before the body was complete",
            retryable=True,
        )
    if isinstance(exc, ConnectionRefusedError):
        return _Failure(
            "connection_error", f"{url}: connection refused (nothing listens on that port)", retryable=True
        )
    if isinstance(exc, (http.client.HTTPException, OSError)):
        name = type(exc).__name__
        text = str(exc) or name
        return _Failure("connection_error", f"{url}: connection failed ({name}: {text})", retryable=True)
    raise exc  # programming errors and KeyboardInterrupt propagate


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _status_failure(
    url: str, status: int, phrase: str, retry_after: float | None, attempts_hint: str
) -> _Failure:
    answer = f"HTTP {status} {phrase}".rstrip()
    if status in (404, 410):
        return _Failure(
            "http_not_found",
            f"{url}: {answer}; the image is gone or the URL is wrong: fix the URL or drop the row",
            status=status,
        )
    if status in (401, 403):
        return _Failure(
            "http_forbidden",
            f"{url}: {answer}; the link is private or expired (signed CDN links expire): export fresh URLs "
            "or download the images with your credentials and use local paths",
            status=status,
        )
    retryable = status in (408, 425, 429) or (500 <= status < 600 and status not in (501, 505))
    advice = "the server is overloaded or failing: run again later" if retryable else "check the URL"
    return _Failure(
        "http_error",
        f"{url}: {answer}{attempts_hint}; {advice}",
        retryable=retryable,
        retry_after=retry_after,
        status=status,
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _write(fd: int, chunk: bytes | None, cache: DownloadCache) -> None:
    """Write a chunk to a temporary body, unbuffered (``None``: fsync); a full disk raises DiskFullError."""
    try:
        if chunk is None:
            os.fsync(fd)
            return
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                exc.errno,
                f"No space left on the device while downloading into the cache {cache.root}; free some space "
                "or pass another download_cache folder, then run again (finished downloads are kept)",
            ) from exc
        raise


# ==============================================================================================================
# The fetcher


@dataclass(slots=True)
class _Downloaded:
    temp: Path
    key: str
    size: int
    content_type: str | None
    final_url: str
    image_format: str
    status: int


class Fetcher:
    """Download image URLs into a :class:`DownloadCache`, with bounded concurrency, timeouts and retries.

    Parameters
    ----------
    cache
        A :class:`DownloadCache` or its folder (default: ``<toolkit cache>/downloads``).
    network
        ``False``: air-gapped, never connect (cached URLs are still served); ``None`` (default): off when
        ``$CCCLIP_OFFLINE`` is ``1``/``true``/``yes``/``on``; ``True``: on, whatever the environment says.
    workers
        Concurrent downloads in :meth:`fetch_many`.
    timeout
        Seconds: one number for both, or ``(connect, read)``. The read timeout bounds each wait for data.
    total_timeout
        Seconds one attempt (redirects included) may take in all, however steadily data trickles in.
    retries
        Extra attempts after a transient failure (connection errors, timeouts, 408/425/429/5xx).
    backoff, max_backoff
        Attempt ``n`` (from 0) waits ``backoff * 2**n`` seconds, halved and then topped up by a random part
        (jitter), capped at ``max_backoff``; a ``Retry-After`` answer is honoured up to ``max_backoff``.
    max_bytes
        Size cap per body.
    max_redirects
        Redirects followed per attempt.
    user_agent
        The ``User-Agent`` header (default: ``ccclip_widgets/<version> (+python)``).
    verify_cache
        Re-hash cached bodies when they are used (detects corruption; costs one read of each file).
    trust_env
        Use proxies from ``http_proxy``/``https_proxy``/``no_proxy``.
    host_failure_limit
        After this many URLs in a row of one host failed with connection errors or timeouts (retries spent),
        its remaining URLs fail at once instead of each waiting for its timeouts; ``None`` turns this off.

    Examples
    --------
    >>> with Fetcher(workers=8, timeout=(5, 20)) as fetcher:  # doctest: +SKIP
    ...     results = fetcher.fetch_many(["https://example.org/a.jpg"])
    >>> results["https://example.org/a.jpg"].path  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        cache: DownloadCache | str | os.PathLike[str] | None = None,
        network: bool | None = None,
        workers: int = DEFAULT_WORKERS,
        timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
        total_timeout: float = DEFAULT_TOTAL_TIMEOUT,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
        max_redirects: int = DEFAULT_MAX_REDIRECTS,
        user_agent: str | None = None,
        verify_cache: bool = True,
        trust_env: bool = True,
        host_failure_limit: int | None = 8,
        ca_certs: str | os.PathLike[str] | None = None,
    ) -> None:
        if isinstance(timeout, (int, float)):
            connect_timeout = read_timeout = float(timeout)
        else:
            connect_timeout, read_timeout = (float(t) for t in timeout)
        for name, value in (
            ("connect timeout", connect_timeout),
            ("read timeout", read_timeout),
            ("total_timeout", total_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if retries < 0 or max_redirects < 0 or max_bytes < 1:
            raise ValueError("retries and max_redirects must be >= 0 and max_bytes >= 1")
        self.cache = cache if isinstance(cache, DownloadCache) else DownloadCache(cache)
        self.network = network_enabled(network)
        self.workers = int(workers)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.total_timeout = float(total_timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_bytes = int(max_bytes)
        self.max_redirects = int(max_redirects)
        if user_agent is None:
            from . import __version__

            user_agent = f"ccclip_widgets/{__version__} (+python)"
        self.user_agent = user_agent
        self.verify_cache = verify_cache
        self.host_failure_limit = host_failure_limit
        self._pool = _ConnectionPool(connect_timeout, read_timeout, trust_env)
        self._pool.ca_certs = ca_certs
        self._sleep: Callable[[float], None] = time.sleep  # replaced in tests to record back-off waits
        self._host_failures: dict[tuple[str, str, int], int] = {}
        self._lock = threading.Lock()
        self.stats: dict[str, int] = dict.fromkeys(
            ("urls", "from_cache", "downloaded", "failed", "repaired", "retries", "bytes_downloaded"), 0
        )

    def __repr__(self) -> str:
        return (
            f"Fetcher(cache={str(self.cache.root)!r}, network={self.network}, workers={self.workers}, "
            f"timeout=({self.connect_timeout:g}, {self.read_timeout:g}), retries={self.retries})"
        )

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the kept-alive connections."""
        self._pool.close()

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self.stats[name] += delta

    # ---- one URL

    def fetch(self, url: str) -> FetchResult:
        """Fetch one URL (from the cache when it is there).

        Parameters
        ----------
        url
            An ``http`` or ``https`` URL (surrounding spaces and a ``#fragment`` are ignored).

        Returns
        -------
        FetchResult
            Never raises for anything the URL or the server does; see ``reason`` and ``detail``.

        Raises
        ------
        OSError
            Only when the cache itself cannot be written (e.g. :class:`~ccclip_widgets.DiskFullError`).
        """
        result = self._fetch(url)
        self._count(
            urls=1,
            from_cache=int(result.from_cache),
            downloaded=int(result.ok and not result.from_cache),
            failed=int(not result.ok),
            repaired=int(result.repaired),
        )
        return result

    def _fetch(self, url: str) -> FetchResult:
        original = url
        url = _strip_fragment(url.strip())
        try:
            target = _parse_target(url)
        except _Failure as failure:
            return FetchResult(original, reason=failure.reason, detail=failure.detail)
        entry, problem = self.cache._lookup(url, verify=self.verify_cache)
        if entry is not None:
            return FetchResult(
                original,
                path=entry.path,
                key=entry.key,
                size=entry.size,
                detail=f"{url}: from the download cache ({entry.path})",
                from_cache=True,
                content_type=entry.content_type,
                final_url=entry.final_url,
                image_format=entry.image_format,
            )
        repaired = problem is not None
        if not self.network:
            why = (
                f"its cached copy was corrupt ({problem}) and was deleted"
                if repaired
                else "it is not in the download cache"
            )
            return FetchResult(
                original,
                reason="network_disabled",
                detail=f"{url}: {why} and the network is off (network=False or {OFFLINE_ENV}=1); run once "
                "with the network on to fill the cache, or put a local path in the image column",
                repaired=repaired,
            )
        host = target.origin
        limit = self.host_failure_limit
        if limit is not None:
            with self._lock:
                failed_in_a_row = self._host_failures.get(host, 0)
            if failed_in_a_row >= limit:
                return FetchResult(
                    original,
                    reason="connection_error",
                    detail=f"{url}: skipped: the last {failed_in_a_row} downloads from {target.host_header} "
                    "failed with connection errors or timeouts; check the network or the host, then run "
                    "again (finished downloads are cached)",
                    repaired=repaired,
                )
        attempts = 0
        while True:
            attempts += 1
            try:
                got = self._download(url)
            except _Failure as failure:
                if failure.retryable and attempts <= self.retries:
                    self._count(retries=1)
                    self._sleep(self._delay(attempts - 1, failure.retry_after))
                    continue
                if failure.reason in ("connection_error", "timeout"):
                    with self._lock:
                        self._host_failures[host] = self._host_failures.get(host, 0) + 1
                detail = failure.detail
                if attempts > 1:
                    detail += f" (gave up after {_plural(attempts, 'attempt')})"
                return FetchResult(
                    original,
                    reason=failure.reason,
                    detail=detail,
                    status=failure.status,
                    attempts=attempts,
                    repaired=repaired,
                )
            with self._lock:
                self._host_failures[host] = 0
            try:
                entry = self.cache.commit(
                    url,
                    got.temp,
                    got.key,
                    got.size,
                    content_type=got.content_type,
                    final_url=got.final_url,
                    image_format=got.image_format,
                )
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(got.temp)
                raise
            self._count(bytes_downloaded=got.size)
            return FetchResult(
                original,
                path=entry.path,
                key=entry.key,
                size=entry.size,
                detail=f"{url}: downloaded ({_plural(attempts, 'attempt')})",
                status=got.status,
                attempts=attempts,
                repaired=repaired,
                content_type=got.content_type,
                final_url=got.final_url,
                image_format=got.image_format,
            )

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_backoff)
        base = min(self.max_backoff, self.backoff * (2**attempt))
        return base / 2 + random.uniform(0, base / 2)

    # ---- one attempt (redirects included)

    def _headers(self, target: _Target, proxy: _Proxy | None) -> dict[str, str]:
        headers = {
            "Host": target.host_header,
            "User-Agent": self.user_agent,
            "Accept": "image/avif,image/webp,image/*;q=0.9,*/*;q=0.5",
            "Accept-Encoding": "identity",
        }
        if proxy is not None and proxy.auth and target.scheme == "http":
            headers["Proxy-Authorization"] = proxy.auth
        return headers

    def _download(self, url: str) -> _Downloaded:
        deadline = time.monotonic() + self.total_timeout
        chain = [url]
        current = url
        target = _parse_target(url)
        while True:
            proxy = self._pool.proxy_for(target)
            conn, response = self._request(target, proxy, deadline)
            status = response.status
            if status in _REDIRECT_STATUSES:
                location = response.getheader("Location")
                self._finish(target, proxy, conn, response)
                if not location:
                    raise _Failure(
                        "http_error",
                        f"{current}: HTTP {status} redirect without a Location header; check the URL",
                        status=status,
                    )
                following = _strip_fragment(urllib.parse.urljoin(current, location.strip()))
                if following in chain:
                    loop = " -> ".join([*chain[chain.index(following) :], following])
                    raise _Failure(
                        "redirect_loop",
                        f"{url}: redirects in a circle ({loop}); the link is broken on the server side",
                        status=status,
                    )
                if len(chain) > self.max_redirects:
                    raise _Failure(
                        "too_many_redirects",
                        f"{url}: more than {self.max_redirects} redirects (last: {following}); the link is "
                        "broken, or raise max_redirects",
                        status=status,
                    )
                chain.append(following)
                target = _parse_target(following, via=url)
                current = following
                continue
            if status not in _OK_STATUSES:
                retry_after = _parse_retry_after(response.getheader("Retry-After"))
                self._finish(target, proxy, conn, response)
                hint = f" (after redirects to {current})" if current != url else ""
                raise _status_failure(url, status, response.reason or "", retry_after, hint)
            return self._receive(url, target, proxy, conn, response, deadline)

    def _request(
        self, target: _Target, proxy: _Proxy | None, deadline: float
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        path = target.request_path
        if proxy is not None and target.scheme == "http":
            path = f"http://{target.host_header}{path}"  # absolute form for a forwarding proxy
        headers = self._headers(target, proxy)
        fresh = False
        while True:
            if time.monotonic() >= deadline:
                raise _Failure(
                    "timeout", f"{target.url}: gave up after total_timeout={self.total_timeout:g} s"
                )
            conn, reused = self._pool.acquire(target, proxy, fresh=fresh)
            try:
                conn.request("GET", path, headers=headers)
                return conn, conn.getresponse()
            except BaseException as exc:
                conn.close()
                stale = isinstance(
                    exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
                )
                if reused and stale and not fresh:
                    fresh = True  # a kept-alive connection the server had closed: one fresh try, not a retry
                    continue
                raise _classify(exc, target.url, phase="read", timeout=self.read_timeout) from None

    def _finish(
        self,
        target: _Target,
        proxy: _Proxy | None,
        conn: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
    ) -> None:
        """Read a small redirect/error body so the connection can be reused; close it otherwise."""
        try:
            if not response.will_close:
                if response.length is not None and response.length <= _DRAIN_LIMIT:
                    response.read()  # reads the rest and marks the response closed
                elif response.chunked:
                    drained = 0
                    while drained <= _DRAIN_LIMIT and not response.isclosed():
                        chunk = response.read1(_CHUNK)
                        if not chunk:
                            break
                        drained += len(chunk)
                if response.isclosed():
                    self._pool.release(target, proxy, conn)
                    return
        except (OSError, http.client.HTTPException):
            pass
        conn.close()

    def _receive(
        self,
        url: str,
        target: _Target,
        proxy: _Proxy | None,
        conn: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
        deadline: float,
    ) -> _Downloaded:
        status = response.status
        content_type = response.getheader("Content-Type")
        media = (content_type or "").split(";", 1)[0].strip().lower()
        via = f" (after redirects to {target.url})" if target.url != url else ""
        if not (media.startswith("image/") or media in _TOLERATED_TYPES):
            conn.close()
            raise _Failure(
                "not_an_image",
                f"{url}: the server sent {media or 'no content type'}{via}, not an image (an error page or a "
                "web page rather than the image itself?); use the direct image URL",
                status=status,
            )
        declared = response.getheader("Content-Length")
        length: int | None = None
        if declared is not None:
            try:
                length = int(declared.strip())
            except ValueError:
                length = None
        if length is not None and length > self.max_bytes:
            conn.close()
            raise _Failure(
                "too_large_image",
                f"{url}: Content-Length {length} bytes exceeds the cap of {self.max_bytes} bytes; raise "
                "max_download_bytes if the image is wanted",
                status=status,
            )
        fd, temp = self.cache.new_temp()
        hasher = hashlib.blake2b(digest_size=16)
        size = 0
        head = b""
        image_format: str | None = None
        sock = conn.sock
        keep = False
        try:
            try:
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise _Failure(
                            "timeout",
                            f"{url}: the download took longer than total_timeout={self.total_timeout:g} s "
                            f"({size} bytes received); the server is too slow",
                            retryable=True,
                            status=status,
                        )
                    wait_for = min(self.read_timeout, left)
                    if sock is not None:
                        sock.settimeout(wait_for)
                    try:
                        chunk = response.read1(_CHUNK)
                    except TimeoutError:
                        if time.monotonic() < deadline:
                            raise _classify(TimeoutError(), url, phase="read", timeout=wait_for) from None
                        continue  # the loop reports the total time limit
                    except BaseException as exc:
                        raise _classify(exc, url, phase="read", timeout=wait_for) from None
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise _Failure(
                            "too_large_image",
                            f"{url}: the body exceeds the cap of {self.max_bytes} bytes (download cut off"
                            f"{'' if length is None else f'; Content-Length said {length}'}); raise "
                            "max_download_bytes if the image is wanted",
                            status=status,
                        )
                    if image_format is None:
                        if len(head) < _SNIFF_BYTES:
                            head += chunk[: _SNIFF_BYTES - len(head)]
                        if len(head) >= _SNIFF_BYTES:
                            image_format = self._sniff(url, head, media, via, status)
                    hasher.update(chunk)
                    _write(fd, chunk, self.cache)
                if length is not None and size < length:
                    raise _Failure(
                        "connection_error",
                        f"{url}: the connection closed after {size} of {length} bytes",
                        retryable=True,
                        status=status,
                    )
                if size == 0:
                    raise _Failure(
                        "empty_image",
                        f"{url}: the server sent an empty body{via}",
                        retryable=False,
                        status=status,
                    )
                if image_format is None:
                    image_format = self._sniff(url, head, media, via, status)
                with contextlib.suppress(OSError, http.client.HTTPException):
                    response.read()  # b"": marks the response complete, so the connection can be reused
                _write(fd, None, self.cache)
            finally:
                os.close(fd)
            keep = response.isclosed() and not response.will_close
        except BaseException:
            conn.close()
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        if keep:
            self._pool.release(target, proxy, conn)
        else:
            conn.close()
        return _Downloaded(temp, hasher.hexdigest(), size, content_type, target.url, image_format, status)

    @staticmethod
    def _sniff(url: str, head: bytes, media: str, via: str, status: int) -> str:
        found = sniff_image_format(head)
        if found is None:
            shown = head[:16]
            raise _Failure(
                "not_an_image",
                f"{url}: served as {media or 'no content type'}{via} but the body starts with {shown!r}, "
                "not a JPEG/PNG/GIF/WebP/BMP/TIFF/AVIF/HEIF image; use the direct image URL",
                status=status,
            )
        return found

    # ---- many URLs

    def fetch_many(
        self, urls: Iterable[str], *, show_progress: bool = True, desc: str = "downloading images"
    ) -> dict[str, FetchResult]:
        """Fetch many URLs with at most ``workers`` downloads in flight; each distinct URL once.

        Parameters
        ----------
        urls
            URLs; repeats are fetched once.
        show_progress
            Show a tqdm progress bar (notebook widget in Jupyter, text in terminals).
        desc
            Label of the progress bar.

        Returns
        -------
        dict[str, FetchResult]
            One result per distinct URL, keyed by the URL as given, in first-seen order.
        """
        distinct = list(dict.fromkeys(urls))
        results: dict[str, FetchResult] = {}
        if not distinct:
            return results
        from tqdm.auto import tqdm

        bar = tqdm(total=len(distinct), desc=desc, unit="img", disable=not show_progress)
        counts = {"cached": 0, "failed": 0}
        window = self.workers * 4  # futures in flight: memory stays flat for millions of URLs
        pending: set[Future[FetchResult]] = set()
        todo = iter(distinct)

        def done(future: Future[FetchResult]) -> None:
            result = future.result()
            results[result.url] = result
            counts["cached"] += int(result.from_cache)
            counts["failed"] += int(not result.ok)
            bar.update(1)
            if bar.n % 64 == 0 or bar.n == bar.total:
                bar.set_postfix(counts, refresh=False)

        try:
            with ThreadPoolExecutor(
                max_workers=min(self.workers, len(distinct)), thread_name_prefix="ccclip-fetch"
            ) as pool:
                try:
                    for url in todo:
                        pending.add(pool.submit(self.fetch, url))
                        if len(pending) >= window:
                            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                            for future in finished:
                                done(future)
                    for future in list(pending):
                        future.result()  # propagate local errors (disk full) in order
                    for future in pending:
                        done(future)
                except BaseException:
                    for future in pending:
                        future.cancel()
                    raise
        finally:
            bar.close()
        if self.stats["repaired"]:
            logger.warning(
                "download cache: %d corrupt cached bodies were discarded (see the warnings above)",
                self.stats["repaired"],
            )
        return {url: results[url] for url in distinct}


def fetch_images(
    urls: Iterable[str],
    *,
    show_progress: bool = True,
    **options: Any,
) -> dict[str, FetchResult]:
    """Fetch image URLs into the download cache (a one-call :class:`Fetcher`).

    Parameters
    ----------
    urls
        ``http``/``https`` URLs; each distinct URL is fetched once.
    show_progress
        Show a progress bar.
    **options
        Any :class:`Fetcher` argument: ``cache``, ``network``, ``workers``, ``timeout``, ``retries``,
        ``max_bytes``, ...

    Returns
    -------
    dict[str, FetchResult]
        One result per distinct URL.
    """
    with Fetcher(**options) as fetcher:
        return fetcher.fetch_many(urls, show_progress=show_progress)
