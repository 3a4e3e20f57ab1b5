"""The HTTP side of :mod:`ccclip_widgets.fetch`: which URLs are fetched, what answers count as images, and how a
transport failure becomes a reason.

urllib3 moves the bytes (pooling, proxies, TLS, timeouts, retry bookkeeping); this module holds the toolkit's
policy for untrusted image URLs: only ``http``/``https`` (every redirect hop re-checked), the image's first bytes
(magic numbers), the answers worth retrying, and a reason plus a sentence for every failure.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import ssl
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import urllib3
from urllib3 import exceptions as u3exc
from urllib3.util import Retry

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
#: answers worth another attempt: request timeout, too early, too many requests, server errors (but 501, 505)
_RETRY_STATUSES = frozenset({408, 425, 429} | set(range(500, 600)) - {501, 505})
_HEIF_BRANDS = frozenset({b"avif", b"avis", b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"})
_BMP_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})


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
# URLs, the transport (urllib3) and failures


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

    @property
    def request_url(self) -> str:
        """The URL as sent: IDNA host, percent-encoded path and query, no fragment."""
        return f"{self.scheme}://{self.host_header}{self.request_path}"


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


class _Policy(Retry):
    """urllib3's retry bookkeeping with this toolkit's back-off: attempt ``n`` (from 1) waits a random time in
    ``[b/2, b]`` with ``b = min(backoff_max, backoff_factor * 2**(n-1))`` (urllib3 waits 0 after the first)."""

    def get_backoff_time(self) -> float:
        failed = len(self.history)
        if failed == 0:
            return 0.0
        base = min(self.backoff_max, self.backoff_factor * 2 ** (failed - 1))
        return base / 2 + random.uniform(0, base / 2)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it wraps (urllib3 keeps the cause in ``__cause__``, ``reason`` or ``args``)."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 16:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo.extend(
            x
            for x in (e.__cause__, e.__context__, getattr(e, "reason", None))
            if isinstance(x, BaseException)
        )
        todo.extend(x for x in e.args if isinstance(x, BaseException))
    return seen


def _classify(exc: BaseException, url: str, *, phase: str, timeout: float) -> _Failure:
    """Turn a transport exception into a _Failure with a reason, a detail and whether to retry."""
    if isinstance(exc, _Failure):
        return exc
    chain = _chain(exc)

    def find(*types: type[BaseException]) -> BaseException | None:
        return next((e for e in chain if isinstance(e, types)), None)

    cert = find(ssl.SSLCertVerificationError)
    if cert is not None:
        return _Failure(
            "tls_error",
            f"{url}: the server's TLS certificate failed verification "
            f"({getattr(cert, 'verify_message', None) or cert}); fix the system's CA certificates "
            "(SSL_CERT_FILE, or FetchConfig(ca_certs=...)) or the URL",
        )
    if find(ssl.SSLError, u3exc.SSLError) is not None:
        return _Failure("tls_error", f"{url}: TLS error ({exc})", retryable=True)
    resolve = find(socket.gaierror)
    if resolve is not None or find(u3exc.NameResolutionError) is not None:
        errno_ = getattr(resolve, "errno", None)
        permanent = errno_ in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None))
        return _Failure(
            "connection_error",
            f"{url}: cannot resolve the host name ({getattr(resolve, 'strerror', None) or exc}); check the URL "
            "and the network (or DNS/proxy settings)",
            retryable=not permanent,
        )
    if find(ConnectionRefusedError) is not None:
        return _Failure(
            "connection_error", f"{url}: connection refused (nothing listens on that port)", retryable=True
        )
    if find(u3exc.NewConnectionError) is None and find(
        u3exc.ConnectTimeoutError, u3exc.ReadTimeoutError, socket.timeout, TimeoutError
    ):
        read = find(u3exc.ReadTimeoutError) is not None or phase == "read"
        what = (
            f"the server sent nothing for {timeout:g} s (read timeout)"
            if read
            else f"connecting timed out after {timeout:g} s"
        )
        return _Failure("timeout", f"{url}: {what}; the server is slow or unreachable", retryable=True)
    if find(u3exc.LocationValueError, http.client.InvalidURL) is not None:
        return _Failure("bad_url", f"{url}: invalid URL ({exc}); fix the URL in the image column")
    if isinstance(exc, (u3exc.HTTPError, http.client.HTTPException, OSError)):
        name = type(exc).__name__
        return _Failure("connection_error", f"{url}: connection failed ({name}: {exc})", retryable=True)
    raise exc  # programming errors and KeyboardInterrupt propagate


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
    retryable = status in _RETRY_STATUSES
    advice = "the server is overloaded or failing: run again later" if retryable else "check the URL"
    return _Failure(
        "http_error",
        f"{url}: {answer}{attempts_hint}; {advice}",
        retryable=retryable,
        retry_after=retry_after,
        status=status,
    )


def _is_connect_failure(exc: BaseException) -> bool:
    chain = _chain(exc)
    return any(isinstance(e, (u3exc.ConnectTimeoutError, u3exc.NewConnectionError)) for e in chain)


def _is_timeout(exc: BaseException) -> bool:
    chain = _chain(exc)
    return any(isinstance(e, (u3exc.ReadTimeoutError, socket.timeout, TimeoutError)) for e in chain)


def _discard(response: urllib3.BaseHTTPResponse) -> None:
    """Close a response's connection instead of reusing it (body not read to its end)."""
    with contextlib.suppress(Exception):
        response.close()
    with contextlib.suppress(Exception):
        response.release_conn()


def _finish(response: urllib3.BaseHTTPResponse) -> None:
    """Read a small redirect/error body so its connection can be reused; close it otherwise."""
    remaining = getattr(response, "length_remaining", None)
    if remaining is not None and remaining <= _DRAIN_LIMIT:
        response.drain_conn()
        response.release_conn()
    else:
        _discard(response)


def _set_read_timeout(response: urllib3.BaseHTTPResponse, seconds: float) -> None:
    """Bound the next wait for body bytes (the rest of the total time limit may be shorter than the read timeout)."""
    with contextlib.suppress(Exception):
        response.connection.sock.settimeout(seconds)  # type: ignore[union-attr]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")
