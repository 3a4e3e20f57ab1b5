"""Image references in a posts table: local paths, ``file://`` URLs, bytes and ``http(s)`` URLs.

:func:`resolve_images` turns each value of the image column into an :class:`ImageRef` (the reference as given,
the file to decode, the bytes, a content key) or a :class:`_RowReject` with a reason and a detail. Paths are
checked against ``image_root`` (``..``, absolute paths and symlinks that lead out are refused), files are
checked to be images (header or full decode, cached by content key), and ``http(s)`` URLs are downloaded once
per table by a :class:`~ccclip_widgets.fetch.Fetcher` before the per-row checks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from .fetch import FetchConfig, Fetcher, FetchResult
from .images import ImageDecodeError, load_image, probe_image
from .posts_readers import is_missing

logger = logging.getLogger(__name__)


_FULL_CHECK_TARGET = 256  # "full" checks decode JPEGs at reduced size: same errors, far less memory
_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_DATA_URL_RE = re.compile(r"^data:[A-Za-z0-9.+-]*(?:/[A-Za-z0-9.+-]*)?[;,]", re.IGNORECASE)
_DOWNLOADED = ("http", "https")


# ==============================================================================================================
# Image references


class _RowReject(Exception):
    """Internal: one image reference failed (carried out of worker threads as a value, not raised across)."""

    def __init__(self, reason: str, detail: str, path: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.path = path  # for outside_image_root: the absolute path that lies outside


@dataclass(frozen=True)
class ImageRef:
    image: str  # the reference as given, or "<bytes:N>"
    path: str | None
    data: bytes | None
    key: str


@dataclass
class ImageContext:
    base: str  # folder that relative paths are joined to (image_root, or the cwd)
    root: str | None  # image_root, absolute and normalized (not symlink-resolved)
    root_real: str | None  # image_root with symlinks resolved
    allow_outside: bool
    check: str
    max_pixels: int
    max_bytes: int
    dir_cache: dict[str, str] = field(default_factory=dict)
    # http(s) URL -> its download, fetched for the whole table before the per-row checks
    downloads: dict[str, FetchResult] = field(default_factory=dict)
    fetcher: Fetcher | None = None


_DECODE_REASONS = {
    "missing": "missing_image",
    "empty": "empty_image",
    "too_large_bytes": "too_large_image",
    "too_large_pixels": "too_large_image",
    "corrupt": "corrupt_image",
    "truncated": "truncated_image",
    "unsupported": "unsupported_image",
}


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root if root.endswith(os.sep) else root + os.sep)


def content_key(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


# Results of image checks keyed by (image_key, check, limits): re-reading the same table (a notebook cell run
# again) does not decode every header again. Bounded; cleared when full.
_CHECK_CACHE: dict[tuple[str, str, int, int], tuple[str, str] | None] = {}
_CHECK_CACHE_MAX = 500_000


def _resolve_remote_image(url: str, scheme: str, original: str, ctx: ImageContext) -> ImageRef:
    """The image of a URL: ``http(s)`` bodies were downloaded before (``ctx.downloads``); other schemes fail.

    The row keeps the URL in ``image``; ``image_path`` is the cached body, which every consumer decodes like any
    local file, and ``image_key`` is the body's content hash (so the same image under two URLs, or as bytes,
    is embedded once).
    """
    if scheme not in _DOWNLOADED:
        raise _RowReject(
            "unsupported_url_scheme",
            f"{url!r} is a {scheme}:// URL; only http and https URLs are downloaded: fetch it yourself and put "
            "a local path (relative to image_root) or the image bytes in the image column",
        )
    result = ctx.downloads.get(url)
    if result is None:  # not collected up front (cannot happen through read_posts); fetch it now
        if ctx.fetcher is None:
            ctx.fetcher = Fetcher()
        result = ctx.downloads[url] = ctx.fetcher.fetch(url)
    if not result.ok:
        raise _RowReject(result.reason or "connection_error", result.detail)
    assert result.path is not None and result.key is not None
    if ctx.check == "none" and result.size > ctx.max_bytes:
        raise _RowReject("too_large_image", f"{url}: {result.size} bytes exceeds max_bytes={ctx.max_bytes}")
    try:
        _check_decodable(str(result.path), result.key, ctx)
    except _RowReject as reject:
        raise _RowReject(
            reject.reason,
            f"{url} (downloaded to {result.path}): {reject.detail}; the server sent a bad image",
        ) from None
    return ImageRef(image=original, path=str(result.path), data=None, key=result.key)


def remote_url(value: Any) -> str | None:
    """The stripped URL when ``value`` is an http(s) URL string (the values read_posts downloads), else None."""
    if not isinstance(value, str):
        return None
    ref = value.strip()
    match = _URL_RE.match(ref)
    if match and match.group(1).lower() in _DOWNLOADED:
        return ref
    return None


def _check_decodable(source: str | bytes, key: str, ctx: ImageContext) -> None:
    """Run the header/full check (cached by content key); raise _RowReject on failure."""
    if ctx.check == "none":
        return
    cache_key = (key, ctx.check, ctx.max_pixels, ctx.max_bytes)
    if cache_key in _CHECK_CACHE:
        failure = _CHECK_CACHE[cache_key]
    else:
        failure = None
        try:
            if ctx.check == "header":
                probe_image(source, max_pixels=ctx.max_pixels, max_bytes=ctx.max_bytes)
            else:
                load_image(
                    source, target_size=_FULL_CHECK_TARGET, max_pixels=ctx.max_pixels, max_bytes=ctx.max_bytes
                )
        except ImageDecodeError as exc:
            failure = (_DECODE_REASONS.get(exc.reason, f"{exc.reason}_image"), str(exc))
        if len(_CHECK_CACHE) >= _CHECK_CACHE_MAX:
            _CHECK_CACHE.clear()
        _CHECK_CACHE[cache_key] = failure
    if failure is not None:
        raise _RowReject(*failure)


def _resolve_bytes(value: bytes | bytearray | memoryview, ctx: ImageContext) -> ImageRef:
    data = bytes(value)
    if not data:
        raise _RowReject("empty_image", "the image bytes are empty")
    if ctx.check == "none" and len(data) > ctx.max_bytes:
        raise _RowReject("too_large_image", f"{len(data)} bytes exceeds max_bytes={ctx.max_bytes}")
    key = content_key(data)
    _check_decodable(data, key, ctx)
    return ImageRef(image=f"<bytes:{len(data)}>", path=None, data=data, key=key)


def _real_dir(folder: str, ctx: ImageContext) -> str:
    real = ctx.dir_cache.get(folder)
    if real is None:
        real = os.path.realpath(folder)
        ctx.dir_cache[folder] = real
    return real


_POSIX = os.sep == "/" and os.altsep is None


def _lexical_path(ref: str, base: str) -> tuple[str, bool]:
    """Absolute, normalized path of ``ref`` (joined to ``base`` when relative), and whether it was absolute."""
    if _POSIX:
        is_absolute = ref[0] == "/"
        if not is_absolute and "/." not in ref and "//" not in ref and ref[0] != "." and ref[-1] != "/":
            return base + ref if base[-1] == "/" else base + "/" + ref, False  # already normal (hot path)
    else:
        is_absolute = os.path.isabs(ref)
    return os.path.normpath(ref if is_absolute else os.path.join(base, ref)), is_absolute


def _resolve_path(ref: str, original: str, ctx: ImageContext) -> ImageRef:
    lexical, is_absolute = _lexical_path(ref, ctx.base)
    root, root_real = ctx.root, ctx.root_real
    check_root = root is not None and root_real is not None and not ctx.allow_outside
    if check_root and not (_within(lexical, root) or _within(lexical, root_real)):  # type: ignore[arg-type]
        how = "is an absolute path" if is_absolute else "climbs out with '..'"
        raise _RowReject(
            "outside_image_root",
            f"{original!r} {how} outside image_root {root}; move the image under image_root or pass "
            "allow_outside_root=True if you trust the table",
            path=lexical,
        )
    if _POSIX:
        cut = lexical.rfind("/")
        folder, name = lexical[:cut] or "/", lexical[cut + 1 :]
    else:
        folder, name = os.path.split(lexical)
    real_folder = _real_dir(folder, ctx)
    joined = real_folder + name if real_folder.endswith(os.sep) else real_folder + os.sep + name
    if check_root and not _within(joined, root_real):  # type: ignore[arg-type]
        raise _RowReject(
            "outside_image_root",
            f"{original!r} goes through a symlinked folder to {joined}, outside image_root {root_real}",
        )
    real = joined
    try:
        info = os.lstat(joined)
        if stat.S_ISLNK(info.st_mode):
            real = os.path.realpath(joined)
            if check_root and not _within(real, root_real):  # type: ignore[arg-type]
                raise _RowReject(
                    "outside_image_root",
                    f"{original!r} is a symlink to {real}, outside image_root {root_real}",
                )
            info = os.stat(real)
    except (FileNotFoundError, NotADirectoryError):
        raise _RowReject("missing_image", f"file not found: {real} (image {original!r})") from None
    except PermissionError as exc:
        raise _RowReject("unreadable_image", f"cannot access {real}: {exc.strerror}") from None
    except OSError as exc:  # symlink loops, names too long, ...
        raise _RowReject("missing_image", f"cannot access {real}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise _RowReject("missing_image", f"{real} is not a regular file (a folder?)")
    try:
        identity = f"{real}\0{info.st_size}\0{info.st_mtime_ns}".encode()
    except UnicodeEncodeError:
        raise _RowReject("bad_image_reference", f"the path {real!r} is not valid UTF-8") from None
    if info.st_size == 0:
        raise _RowReject("empty_image", f"{real} is an empty (zero-byte) file")
    if ctx.check == "none" and info.st_size > ctx.max_bytes:
        raise _RowReject("too_large_image", f"{real}: {info.st_size} bytes exceeds max_bytes={ctx.max_bytes}")
    key = content_key(identity)
    _check_decodable(real, key, ctx)
    return ImageRef(image=original, path=real, data=None, key=key)


def _resolve_image(value: Any, ctx: ImageContext) -> ImageRef | _RowReject:
    """Resolve one image value; failures are returned (not raised) so worker threads never raise."""
    try:
        if is_missing(value):
            raise _RowReject("missing_image", "no image reference (null)")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return _resolve_bytes(value, ctx)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise _RowReject(
                "bad_image_reference",
                f"expected a path, URL or bytes, got {type(value).__name__}: {str(value)[:80]!r}",
            )
        ref = value.strip()
        if not ref:
            raise _RowReject("missing_image", "no image reference (empty string)")
        if _DATA_URL_RE.match(ref):
            raise _RowReject(
                "unsupported_url_scheme",
                f"{ref[:40]!r}... is a data: URL; decode it and put the image bytes in the image column",
            )
        match = _URL_RE.match(ref)
        if match:
            scheme = match.group(1).lower()
            if scheme != "file":
                return _resolve_remote_image(ref, scheme, value, ctx)
            parsed = urllib.parse.urlparse(ref)
            if parsed.netloc not in ("", "localhost"):
                raise _RowReject("bad_image_reference", f"{ref!r} names a remote host; use a local path")
            ref = urllib.request.url2pathname(parsed.path)
        return _resolve_path(ref, value, ctx)
    except _RowReject as reject:
        return reject


def image_root_hints(
    resolved: list[ImageRef | _RowReject], root: str | None, explicit: bool
) -> tuple[str, ...]:
    """When no local image path lies under the image root, say which root would admit them all."""
    outside = [r.path for r in resolved if isinstance(r, _RowReject) and r.path is not None]
    if not outside or any(isinstance(r, ImageRef) and r.path is not None for r in resolved):
        return ()
    parent = os.path.commonpath([os.path.dirname(p) for p in outside])
    which = "the given image_root" if explicit else "the default image_root (the posts table's folder)"
    return (
        f"all {len(outside)} local image paths lie outside {which} {root}; pass image_root={parent!r} "
        f"(ccclip: --image-root {parent}), their common parent, to admit them",
    )


def resolve_images(values: list[Any], ctx: ImageContext, n_workers: int) -> list[ImageRef | _RowReject]:
    """Resolve all image values, in order, using a thread pool for the file system and header reads."""
    if n_workers <= 1 or len(values) < 64:
        return [_resolve_image(v, ctx) for v in values]
    chunk = max(16, min(512, len(values) // (n_workers * 4) + 1))
    chunks = [values[i : i + chunk] for i in range(0, len(values), chunk)]

    def work(part: list[Any]) -> list[ImageRef | _RowReject]:
        return [_resolve_image(v, ctx) for v in part]

    with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="ccclip-posts") as pool:
        return list(chain.from_iterable(pool.map(work, chunks)))


@dataclass
class Downloads:
    """How read_posts downloads http(s) image URLs: a given Fetcher (left open), or a FetchConfig to build one."""

    fetcher: Fetcher | FetchConfig | None = None
    show_progress: bool = False

    def fetch(self, urls: list[str], source: str) -> tuple[dict[str, FetchResult], Fetcher]:
        given = self.fetcher if isinstance(self.fetcher, Fetcher) else None
        config = self.fetcher if isinstance(self.fetcher, FetchConfig) else FetchConfig()
        fetcher = given if given is not None else config.fetcher()
        try:
            results = fetcher.fetch_many(urls, show_progress=self.show_progress)
        finally:
            if given is None:
                fetcher.close()
        n_cached = sum(r.from_cache for r in results.values())
        n_failed = sum(not r.ok for r in results.values())
        logger.info(
            "%s: %d distinct image URLs: %d from the download cache (%s), %d downloaded, %d failed",
            source,
            len(results),
            n_cached,
            fetcher.cache.root,
            len(results) - n_cached - n_failed,
            n_failed,
        )
        return results, fetcher
