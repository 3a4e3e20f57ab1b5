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

import contextlib
import hashlib
import logging
import os
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from urllib3.exceptions import MaxRetryError
from urllib3.util import Timeout, make_headers

from ._fetch_http import (
    _CHUNK,
    _OK_STATUSES,
    _REDIRECT_STATUSES,
    _RETRY_STATUSES,
    _SNIFF_BYTES,
    _TOLERATED_TYPES,
    FETCH_REASONS,
    FetchResult,
    _classify,
    _discard,
    _Failure,
    _finish,
    _is_connect_failure,
    _is_timeout,
    _parse_target,
    _plural,
    _Policy,
    _set_read_timeout,
    _status_failure,
    _strip_fragment,
    _Target,
    sniff_image_format,
)
from .download_cache import CacheEntry, DownloadCache

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
    ca_certs
        A PEM file of CA certificates to trust for ``https`` instead of the system's (a private CA).

    Notes
    -----
    The HTTP itself is urllib3's: a ``PoolManager`` (a ``ProxyManager`` per proxy) keeps connections alive
    per host and verifies TLS certificates, ``Timeout`` bounds connecting and each wait for data, and the retry
    bookkeeping is a ``Retry``. What is this toolkit's own is the policy for untrusted image URLs: redirects
    are followed by hand so every hop is re-checked (http/https only, loops, the limit), bodies are streamed
    with the size cap and the total time limit enforced while reading, and the first bytes must be an image.

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
        self._pool_options: dict[str, Any] = {
            "num_pools": 64,
            "maxsize": max(self.workers, 1),
            "block": False,
            "retries": False,  # retries, redirects and their checks are this class's (see _fetch, _download)
            "timeout": Timeout(connect=connect_timeout, read=read_timeout),
            "headers": {
                "User-Agent": self.user_agent,
                "Accept": "image/avif,image/webp,image/*;q=0.9,*/*;q=0.5",
                "Accept-Encoding": "identity",
            },
        }
        if ca_certs is not None:
            self._pool_options["ca_certs"] = os.fspath(ca_certs)
        self._direct = urllib3.PoolManager(**self._pool_options)
        self._proxy_managers: dict[str, urllib3.ProxyManager] = {}
        self._proxies = urllib.request.getproxies_environment() if trust_env else {}
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
        with self._lock:
            managers = [self._direct, *self._proxy_managers.values()]
        for manager in managers:
            manager.clear()

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self.stats[name] += delta

    def _policy(self) -> _Policy:
        return _Policy(
            total=self.retries,
            redirect=False,
            status_forcelist=_RETRY_STATUSES,
            backoff_factor=self.backoff,
            backoff_max=self.max_backoff,
            respect_retry_after_header=True,
            raise_on_status=False,
        )

    def _manager_for(self, target: _Target) -> urllib3.PoolManager:
        """The direct pool, or the proxy's (``http_proxy``/``https_proxy``, unless ``no_proxy`` lists the host)."""
        value = self._proxies.get(target.scheme)
        if not value or urllib.request.proxy_bypass_environment(target.host, self._proxies):
            return self._direct
        with self._lock:
            manager = self._proxy_managers.get(value)
            if manager is None:
                parts = urllib.parse.urlsplit(value if "://" in value else "http://" + value)
                headers = None
                if parts.username is not None:
                    auth = (
                        f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
                    )
                    headers = make_headers(proxy_basic_auth=auth)
                host = parts.hostname or ""
                shown = f"[{host}]" if ":" in host else host
                proxy_url = f"{parts.scheme or 'http'}://{shown}:{parts.port or 8080}"
                manager = urllib3.ProxyManager(proxy_url, proxy_headers=headers, **self._pool_options)
                self._proxy_managers[value] = manager
            return manager

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
        # Lock, then look again: another process (or thread) may have just downloaded this URL.
        with self.cache.url_lock(url, timeout=self.total_timeout * (self.retries + 1) + self.max_backoff):
            entry, _ = self.cache._lookup(url, verify=self.verify_cache)
            if entry is not None:
                return FetchResult(
                    original,
                    path=entry.path,
                    key=entry.key,
                    size=entry.size,
                    detail=f"{url}: from the download cache ({entry.path}), downloaded meanwhile by another "
                    "process",
                    from_cache=True,
                    repaired=repaired,
                    content_type=entry.content_type,
                    final_url=entry.final_url,
                    image_format=entry.image_format,
                )
            return self._download_with_retries(original, url, host, repaired)

    def _download_with_retries(
        self, original: str, url: str, host: tuple[str, str, int], repaired: bool
    ) -> FetchResult:
        policy = self._policy()
        attempts = 0
        while True:
            attempts += 1
            try:
                got = self._download(url)
            except _Failure as failure:
                if failure.retryable:
                    try:
                        policy = policy.increment("GET", url)
                    except MaxRetryError:
                        pass  # retries spent: report the failure below
                    else:
                        self._count(retries=1)
                        wait = policy.get_backoff_time()
                        if failure.retry_after is not None:
                            wait = min(max(failure.retry_after, 0.0), self.max_backoff)
                        self._sleep(wait)
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

    # ---- one attempt (redirects included)

    def _download(self, url: str) -> _Downloaded:
        deadline = time.monotonic() + self.total_timeout
        chain = [url]
        current = url
        target = _parse_target(url)
        while True:
            response = self._request(target, deadline)
            status = response.status
            if status in _REDIRECT_STATUSES:
                location = response.headers.get("Location")
                _finish(response)
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
                retry_after = None
                header = response.headers.get("Retry-After")
                if header:
                    with contextlib.suppress(Exception):
                        retry_after = float(self._policy().parse_retry_after(header))
                _finish(response)
                hint = f" (after redirects to {current})" if current != url else ""
                raise _status_failure(url, status, response.reason or "", retry_after, hint)
            return self._receive(url, target, response, deadline)

    def _request(self, target: _Target, deadline: float) -> urllib3.BaseHTTPResponse:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Failure("timeout", f"{target.url}: gave up after total_timeout={self.total_timeout:g} s")
        timeout = Timeout(connect=min(self.connect_timeout, left), read=min(self.read_timeout, left))
        try:
            return self._manager_for(target).request(
                "GET",
                target.request_url,
                redirect=False,
                retries=False,
                preload_content=False,
                decode_content=False,
                timeout=timeout,
            )
        except Exception as exc:
            phase = "connect" if _is_connect_failure(exc) else "read"
            wait = timeout.connect_timeout if phase == "connect" else timeout.read_timeout
            raise _classify(exc, target.url, phase=phase, timeout=float(wait or 0)) from None

    def _receive(
        self, url: str, target: _Target, response: urllib3.BaseHTTPResponse, deadline: float
    ) -> _Downloaded:
        status = response.status
        content_type = response.headers.get("Content-Type")
        media = (content_type or "").split(";", 1)[0].strip().lower()
        via = f" (after redirects to {target.url})" if target.url != url else ""
        if not (media.startswith("image/") or media in _TOLERATED_TYPES):
            _discard(response)
            raise _Failure(
                "not_an_image",
                f"{url}: the server sent {media or 'no content type'}{via}, not an image (an error page or a "
                "web page rather than the image itself?); use the direct image URL",
                status=status,
            )
        declared = response.headers.get("Content-Length")
        length: int | None = None
        if declared is not None:
            with contextlib.suppress(ValueError):
                length = int(declared.strip())
        if length is not None and length > self.max_bytes:
            _discard(response)
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
                    _set_read_timeout(response, wait_for)
                    try:
                        chunk = response.read1(_CHUNK, decode_content=False)
                    except Exception as exc:
                        if _is_timeout(exc) and time.monotonic() >= deadline:
                            continue  # the loop reports the total time limit
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
                    self.cache.write_chunk(fd, chunk)
                if length is not None and size < length:
                    raise _Failure(
                        "connection_error",
                        f"{url}: the connection closed after {size} of {length} bytes",
                        retryable=True,
                        status=status,
                    )
                if size == 0:
                    raise _Failure("empty_image", f"{url}: the server sent an empty body{via}", status=status)
                if image_format is None:
                    image_format = self._sniff(url, head, media, via, status)
                self.cache.write_chunk(fd, None)
            finally:
                os.close(fd)
        except BaseException:
            _discard(response)
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        response.release_conn()  # read to its end: the connection goes back to the pool
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
