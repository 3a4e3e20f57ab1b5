"""The posts table: one row per social-media post (an image plus its text).

:func:`read_posts` reads CSV / TSV / Parquet / JSONL files or in-memory frames, validates every row and returns a
:class:`Posts`: the valid rows in a fixed schema plus every rejected row with a machine-friendly ``reason`` and a
human ``detail``. No row is ever dropped silently: each input row is either in ``Posts.table`` or in
``Posts.rejects`` (a row may be rejected for several reasons at once, one rejects row per reason).

Reject reasons
--------------
``missing_post_id``, ``duplicate_post_id``, ``empty_text``, ``undecodable_text``, ``malformed_row``,
``bad_caption_kind``, ``missing_image``, ``outside_image_root``, ``bad_image_reference``, ``unreadable_image``,
from image checks ``empty_image``, ``corrupt_image``, ``truncated_image``, ``unsupported_image``,
``too_large_image``, and from downloading ``http(s)`` image URLs (see :mod:`ccclip_widgets.fetch`)
``unsupported_url_scheme``, ``bad_url``, ``network_disabled``, ``http_not_found``, ``http_forbidden``,
``http_error``, ``timeout``, ``connection_error``, ``tls_error``, ``too_many_redirects``, ``redirect_loop``,
``not_an_image``.

The work is split in three: :mod:`ccclip_widgets.posts_readers` parses the file formats and frames,
:mod:`ccclip_widgets.image_refs` resolves and checks image references (paths, bytes, downloaded URLs), and this
module validates the rows and builds :class:`Posts`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import polars as pl

from .errors import DuplicatePostIdError, NoUsablePostsError, PostsSchemaError
from .fetch import FETCH_REASONS, FetchConfig, Fetcher
from .image_refs import (
    Downloads,
    ImageContext,
    ImageRef,
    _RowReject,
    content_key,
    image_root_hints,
    remote_url,
    resolve_images,
)
from .images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS

__all__ = [
    "CAPTION_KINDS",
    "KNOWN_COLUMNS",
    "REJECTS_SCHEMA",
    "REJECT_REASONS",
    "REQUIRED_COLUMNS",
    "TABLE_COLUMNS",
    "DuplicatePostIdError",
    "Posts",
    "PostsSchemaError",
    "posts_from_records",
    "read_posts",
]
from .posts_readers import (
    REQUIRED_COLUMNS,
    Loaded,
    Reject,
    is_pandas_frame,
    load_file,
    load_pandas,
    load_polars,
    load_records,
    to_text,
)

logger = logging.getLogger(__name__)

KNOWN_COLUMNS: tuple[str, ...] = ("lang", "caption_kind", "split", "timestamp")
CAPTION_KINDS: tuple[str, ...] = ("descriptive", "commentative")
#: Columns computed by read_posts; if an input already has them (a saved Posts.table), they are recomputed.
DERIVED_COLUMNS: tuple[str, ...] = ("image_path", "image_bytes", "image_key", "text_key", "row")
TABLE_COLUMNS: tuple[str, ...] = (
    "post_id",
    "image",
    "image_path",
    "image_bytes",
    "text",
    "image_key",
    "text_key",
    "row",
)

REJECT_REASONS: dict[str, str] = {
    "missing_post_id": "post_id is null, empty or blank",
    "duplicate_post_id": "post_id already used by an earlier row (the first row with an id is kept)",
    "empty_text": "text is null, empty or blank",
    "undecodable_text": "the row contains bytes that are not valid in the file's encoding",
    "malformed_row": "the row cannot be parsed (wrong number of fields, invalid JSON)",
    "bad_caption_kind": "caption_kind is not one of " + ", ".join(CAPTION_KINDS),
    "missing_image": "no image reference, or the file does not exist",
    "outside_image_root": "the image path leaves image_root ('..', absolute path, or symlink)",
    "bad_image_reference": "the image value is neither a path, a URL nor bytes",
    "unreadable_image": "the image file exists but cannot be read (permissions)",
    "empty_image": "the image file or bytes are empty",
    "corrupt_image": "the image is damaged",
    "truncated_image": "the image file ends early",
    "unsupported_image": "not an image in a supported format",
    "too_large_image": "the image exceeds max_pixels or max_bytes (or, downloaded, max_download_bytes)",
}
for _reason, _text in FETCH_REASONS.items():
    REJECT_REASONS.setdefault(_reason, _text)

REJECTS_SCHEMA: dict[str, pl.DataType] = {
    "post_id": pl.String(),
    "row": pl.Int64(),
    "column": pl.String(),
    "reason": pl.String(),
    "detail": pl.String(),
}

CheckImages = Literal["none", "header", "full"]
OnDuplicate = Literal["reject", "keep_first", "error"]


def _empty_rejects() -> pl.DataFrame:
    return pl.DataFrame(schema=REJECTS_SCHEMA)


# ==============================================================================================================
# The Posts container


@dataclass(frozen=True, eq=False)
class Posts:
    """Valid posts plus the rejected rows of the source they came from.

    Attributes
    ----------
    table
        Valid rows. Columns, in order: ``post_id``, ``image`` (the reference as given, or ``"<bytes:N>"``),
        ``image_path`` (resolved absolute path or null), ``image_bytes`` (raw encoded image or null), ``text``,
        ``image_key`` (content identity for caches), ``text_key`` (blake2b-128 of the UTF-8 text), ``row``
        (0-based row in the source), then ``lang``/``caption_kind``/``split``/``timestamp`` when present, then
        any other source columns (metadata) in source order.
    rejects
        One row per (rejected row, reason): ``post_id``, ``row``, ``column``, ``reason``, ``detail``.
    image_root
        Resolved folder that relative image paths were read from (None for frames without one).
    source
        Where the posts came from (a path or a description).
    hints
        What would admit rejected rows, when one setting would (e.g. the ``image_root`` that holds every
        image path of a table whose paths are all absolute); shown by :meth:`summary` and in
        :class:`~ccclip_widgets.NoUsablePostsError`.
    """

    table: pl.DataFrame
    rejects: pl.DataFrame = field(default_factory=_empty_rejects)
    image_root: Path | None = None
    source: str = ""
    hints: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.table.height

    def __repr__(self) -> str:
        return f"Posts({len(self)} valid, {self.n_rejected} rejected, source={self.source!r})"

    @property
    def n_rejected(self) -> int:
        """Number of distinct source rows that were rejected."""
        return self.rejects["row"].n_unique() if self.rejects.height else 0

    def reject_counts(self) -> dict[str, int]:
        """Distinct rejected rows per reason, most frequent first.

        Returns
        -------
        dict[str, int]
            ``{reason: number of rows}``; a row rejected for two reasons counts under both.
        """
        if not self.rejects.height:
            return {}
        counts = (
            self.rejects.group_by("reason")
            .agg(pl.col("row").n_unique().alias("n"))
            .sort(["n", "reason"], descending=[True, False])
        )
        return dict(zip(counts["reason"].to_list(), counts["n"].to_list(), strict=True))

    def summary(self) -> str:
        """Human-readable summary: valid rows, rejected rows, and rejected rows by reason.

        Returns
        -------
        str
            A few lines of text.
        """
        lines = [
            f"Posts from {self.source or '<unknown>'}",
            f"  valid rows:    {len(self)}",
            f"  rejected rows: {self.n_rejected}",
        ]
        counts = self.reject_counts()
        if counts:
            width = max(len(reason) for reason in counts)
            lines += [f"    {reason:<{width}}  {n}" for reason, n in counts.items()]
        if self.image_root is not None:
            lines.append(f"  image_root:    {self.image_root}")
        lines += [f"  hint: {hint}" for hint in self.hints]
        return "\n".join(lines)

    def require_usable(self, rejects_file: str | os.PathLike[str] | None = None) -> Posts:
        """Return the posts unchanged, or raise when no row is usable.

        Parameters
        ----------
        rejects_file
            Where the rejects were written, named in the message.

        Returns
        -------
        Posts
            ``self``, when it holds at least one valid row.

        Raises
        ------
        NoUsablePostsError
            Every row was rejected (or the table is empty); the message gives the reasons and, where one
            setting would admit the rows, that setting.
        """
        if len(self):
            return self
        counts = self.reject_counts()
        listing = ", ".join(f"{reason}: {n}" for reason, n in counts.items()) or "the table has no rows"
        message = (
            f"no usable post in {self.source or 'the posts'}: {self.n_rejected} row(s) rejected ({listing})"
        )
        for hint in self.hints:
            message += f"; {hint}"
        if rejects_file is not None:
            message += f"; rejects written to {rejects_file}"
        raise NoUsablePostsError(message, counts)

    def write_rejects(self, path: str | os.PathLike[str]) -> Path:
        """Write the rejects to a CSV file atomically (temporary file, then rename).

        Parameters
        ----------
        path
            Destination file; parent folders are created.

        Returns
        -------
        Path
            The written path.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                self.rejects.write_csv(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return path

    def filter(self, *predicates: Any, **constraints: Any) -> Posts:
        """Keep the valid rows matching polars predicates (``DataFrame.filter`` arguments); rejects are kept.

        Parameters
        ----------
        *predicates, **constraints
            Passed to :meth:`polars.DataFrame.filter`, e.g. ``pl.col("lang") == "en"`` or ``split="train"``.

        Returns
        -------
        Posts
            A new Posts with the filtered table.
        """
        return replace(self, table=self.table.filter(*predicates, **constraints))

    def head(self, n: int = 5) -> Posts:
        """First ``n`` valid rows as a new :class:`Posts` (rejects are kept).

        Parameters
        ----------
        n
            Number of rows.

        Returns
        -------
        Posts
            A new Posts with ``table.head(n)``.
        """
        return replace(self, table=self.table.head(n))


# ==============================================================================================================
# Validation


def _as_text_list(series: pl.Series) -> list[str | None]:
    """Column values as strings (ids, labels); integral floats (pandas ints with gaps) lose their '.0'."""
    if series.dtype.is_float():
        finite = series.drop_nulls().drop_nans()
        if finite.len() == 0 or (finite == finite.round(0)).all():
            series = series.fill_nan(None).cast(pl.Int64, strict=False)
    if series.dtype == pl.Binary:
        return [None if v is None else v.decode("utf-8", "replace") for v in series.to_list()]
    if series.dtype in (pl.String, pl.Null) or series.dtype.is_numeric() or series.dtype == pl.Categorical:
        return series.cast(pl.String).to_list()
    return [to_text(v) for v in series.to_list()]


def _texts_as_text(series: pl.Series, encoding: str) -> tuple[list[str | None], dict[int, str]]:
    """Text values as strings plus {index: detail} for binary values that do not decode."""
    bad: dict[int, str] = {}
    if series.dtype == pl.Binary:
        out: list[str | None] = []
        for i, value in enumerate(series.to_list()):
            if value is None:
                out.append(None)
                continue
            try:
                out.append(value.decode(encoding))
            except UnicodeDecodeError as exc:
                out.append(None)
                bad[i] = f"byte offset {exc.start} of the text is not valid {encoding}"
        return out, bad
    if series.dtype in (pl.String, pl.Null) or series.dtype.is_numeric() or series.dtype == pl.Categorical:
        return series.cast(pl.String).to_list(), bad
    return [to_text(v) for v in series.to_list()], bad


def _infer_metadata_types(frame: pl.DataFrame, columns: Iterable[str]) -> pl.DataFrame:
    """Type string columns from text files: Int64, else Float64, else Boolean, else String (whole column)."""
    casts = []
    for name in columns:
        series = frame[name]
        if series.dtype != pl.String or series.null_count() == series.len():
            continue
        for dtype in (pl.Int64, pl.Float64):
            try:
                casts.append(series.cast(dtype, strict=True))
                break
            except Exception:  # polars raises InvalidOperationError
                continue
        else:
            lowered = series.str.to_lowercase()
            if lowered.drop_nulls().is_in(["true", "false"]).all():
                casts.append(lowered == "true")
    return frame.with_columns(casts) if casts else frame


def _parse_timestamps(series: pl.Series) -> pl.Series:
    if series.dtype != pl.String or series.null_count() == series.len():
        return series
    try:
        return series.str.strip_chars().str.to_datetime(strict=True)
    except Exception:  # mixed formats: keep the strings
        return series


def _prepare_columns(
    loaded: Loaded, *, id_column: str, text_column: str, image_column: str, source: str
) -> tuple[pl.DataFrame, list[Any]]:
    """Check required columns, rename to the canonical names, drop derived columns."""
    present = loaded.columns
    wanted = {"post_id": id_column, "image": image_column, "text": text_column}
    missing = [
        f"{canon!r}" + (f" (as {given!r})" if given != canon else "")
        for canon, given in wanted.items()
        if given not in present
    ]
    if missing:
        raise PostsSchemaError(
            f"{source}: missing required column(s) {', '.join(missing)}. Columns present: {present}. "
            f"Expected {list(REQUIRED_COLUMNS)}; map other names with id_column=, image_column=, text_column=."
        )
    if len({id_column, image_column, text_column}) != 3:
        raise PostsSchemaError(f"id_column, image_column and text_column must differ, got {wanted}")
    for canon, given in wanted.items():
        if given != canon and canon in present:
            raise PostsSchemaError(
                f"{source}: column {canon!r} exists but {given!r} was chosen as the {canon} column; "
                f"rename or drop {canon!r} first"
            )
    frame = loaded.frame
    images = list(loaded.images or [])
    derived = [c for c in DERIVED_COLUMNS if c in frame.columns]
    if derived and not {"image_key", "text_key", "row"} <= set(frame.columns):
        raise PostsSchemaError(
            f"{source}: column(s) {derived} are computed by read_posts; rename them (e.g. 'source_row')"
        )
    if derived:  # a saved Posts.table: recompute the derived columns; stored bytes are the images
        if "image_bytes" in frame.columns:
            stored = frame["image_bytes"].to_list()
            images = [b if b is not None else v for v, b in zip(images, stored, strict=True)]
        logger.info("%s: recomputing derived column(s) %s", source, derived)
        frame = frame.drop(derived)
    frame = frame.rename({id_column: "post_id", text_column: "text"})
    return frame, images


def read_posts(
    source: str | os.PathLike[str] | pl.DataFrame | pl.LazyFrame | Any,
    image_root: str | os.PathLike[str] | None = None,
    fetcher: Fetcher | FetchConfig | None = None,
    *,
    check_images: CheckImages = "header",
    text_column: str = "text",
    id_column: str = "post_id",
    image_column: str = "image",
    encoding: str = "utf-8",
    allow_outside_root: bool = False,
    on_duplicate: OnDuplicate = "reject",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    n_workers: int | None = None,
    show_progress: bool = True,
    **download: Any,
) -> Posts:
    """Read and validate a posts table.

    Parameters
    ----------
    source
        A CSV (``.csv``), TSV (``.tsv``/``.tab``), Parquet (``.parquet``/``.pq``), JSON Lines
        (``.jsonl``/``.ndjson``) or JSON (``.json``: an array of objects, or JSON Lines) file; or a polars
        DataFrame/LazyFrame or a pandas DataFrame.
    image_root
        Folder that relative image paths are relative to. Defaults to the file's folder for file sources; for
        frames, ``None`` means relative paths are relative to the current folder and absolute paths may lie
        anywhere.
    check_images
        ``"header"`` (default) reads every image header (fast, catches missing, non-image, corrupt headers and
        oversized images); ``"full"`` decodes every image (also catches truncated files; slow); ``"none"``
        only checks that files exist.
    text_column, id_column, image_column
        Source names of the text, post id and image columns; renamed to ``text``, ``post_id``, ``image``.
    encoding
        Encoding of CSV/TSV/JSONL files and of binary text columns. Rows with bytes that do not decode are
        rejected (``undecodable_text``) and the rest of the file still loads.
    allow_outside_root
        Accept image paths outside ``image_root`` (``..``, absolute paths, symlinks pointing out).
    on_duplicate
        ``"reject"`` (default) and ``"keep_first"``: the first row with a post_id is kept and every later row
        with the same id is rejected (``duplicate_post_id``); ``"error"``: raise :class:`DuplicatePostIdError`.
    max_pixels, max_bytes
        Image size limits for the header/full checks.
    n_workers
        Threads for the image checks (default: ``min(32, cpu_count + 4)``).
    fetcher
        How ``http(s)`` image URLs are downloaded: a :class:`~ccclip_widgets.fetch.FetchConfig` (e.g.
        ``FetchConfig(network=False)`` for air-gapped use: no connection is ever opened, URLs already in the
        download cache are still used, every other URL is rejected with ``network_disabled``), or a configured
        :class:`~ccclip_widgets.fetch.Fetcher` to share one across calls. Default: ``FetchConfig()``; the
        network is on unless ``CCCLIP_OFFLINE`` is ``1``/``true``/``yes``/``on``, downloads land in
        ``$CCCLIP_CACHE/downloads`` (stored once by content hash, never downloaded twice), the size cap is
        ``max_bytes``.
    **download
        The earlier spelling of the same settings, still accepted: ``network``, ``download_cache``,
        ``max_download_bytes``, ``download_workers``, ``timeout``, ``retries`` (the fields ``network``,
        ``cache``, ``max_bytes``, ``workers``, ``timeout``, ``retries`` of ``FetchConfig``). Not together with
        a ``Fetcher``.
    show_progress
        Show a progress bar while downloading image URLs.

    Returns
    -------
    Posts
        Valid rows (``Posts.table``) and rejected rows with reasons (``Posts.rejects``). A warning with the
        counts by reason is logged when rows are rejected.

    Raises
    ------
    PostsSchemaError
        If required columns are missing (the message lists the columns present and expected) or the columns
        conflict.
    DuplicatePostIdError
        With ``on_duplicate="error"`` when a post_id repeats.
    FileNotFoundError
        If the source file or an explicit ``image_root`` does not exist.

    Notes
    -----
    CSV/TSV are parsed as text (post ids keep leading zeros; ``""`` is null); other columns are then typed
    per whole column (Int64, Float64, Boolean, else String). A string ``timestamp`` column is parsed to a
    datetime when every value parses. Image values may be paths, ``file://`` URLs (local paths, checked against
    ``image_root`` like any path), bytes, or ``http``/``https`` URLs. Each distinct URL is downloaded once
    (see :mod:`ccclip_widgets.fetch` for the timeouts, retries, size and content checks); the row keeps the URL
    in ``image``, ``image_path`` is the cached file, and a failed download rejects the row with a reason such
    as ``http_not_found``, ``timeout`` or ``not_an_image`` and a detail naming the URL. Other URL schemes
    (``ftp://``, ``s3://``, ``data:``) are rejected (``unsupported_url_scheme``). Rows rejected for one reason
    are still checked for the others, so fixing a file takes one round.
    """
    if check_images not in ("none", "header", "full"):
        raise ValueError(f"check_images must be 'none', 'header' or 'full', got {check_images!r}")
    if on_duplicate not in ("reject", "keep_first", "error"):
        raise ValueError(f"on_duplicate must be 'reject', 'keep_first' or 'error', got {on_duplicate!r}")
    kw = {"id_column": id_column, "image_column": image_column}
    default_root: Path | None = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        loaded = load_file(path, encoding=encoding, **kw)
        description = str(path)
        default_root = path.resolve().parent
    elif isinstance(source, pl.LazyFrame):
        loaded = load_polars(source.collect(), image_column)
        description = "polars.LazyFrame"
    elif isinstance(source, pl.DataFrame):
        loaded = load_polars(source, image_column)
        description = f"polars.DataFrame ({source.height} rows)"
    elif is_pandas_frame(source):
        loaded = load_pandas(source, image_column)
        description = f"pandas.DataFrame ({len(source)} rows)"
    elif isinstance(source, list):
        loaded = load_records(source, None, image_column)
        description = f"records ({len(source)})"
    else:
        raise TypeError(
            "source must be a path (CSV/TSV/Parquet/JSONL), a polars or pandas DataFrame, or a list of dicts; "
            f"got {type(source).__name__}"
        )
    return _validate(
        loaded,
        source=description,
        image_root=Path(image_root).expanduser() if image_root is not None else default_root,
        explicit_root=image_root is not None,
        check_images=check_images,
        text_column=text_column,
        id_column=id_column,
        image_column=image_column,
        encoding=encoding,
        allow_outside_root=allow_outside_root,
        on_duplicate=on_duplicate,
        max_pixels=max_pixels,
        max_bytes=max_bytes,
        n_workers=n_workers if n_workers is not None else min(32, (os.cpu_count() or 1) + 4),
        downloads=Downloads(
            fetcher=_fetcher_from(fetcher, download, max_bytes),
            show_progress=show_progress,
        ),
    )


#: read_posts' earlier download keywords -> FetchConfig fields
_DOWNLOAD_KEYWORDS = {
    "network": "network",
    "download_cache": "cache",
    "max_download_bytes": "max_bytes",
    "download_workers": "workers",
    "timeout": "timeout",
    "retries": "retries",
}


def _fetcher_from(
    fetcher: Fetcher | FetchConfig | None, download: dict[str, Any], max_bytes: int
) -> Fetcher | FetchConfig:
    """One Fetcher or FetchConfig from read_posts' ``fetcher`` and its earlier download keywords."""
    unknown = sorted(set(download) - set(_DOWNLOAD_KEYWORDS))
    if unknown:
        raise TypeError(f"read_posts() got unexpected keyword arguments: {', '.join(unknown)}")
    if isinstance(fetcher, Fetcher):
        if download:
            raise TypeError(f"pass {sorted(download)} to the Fetcher, not beside it")
        return fetcher
    if fetcher is not None and not isinstance(fetcher, FetchConfig):
        raise TypeError(f"fetcher must be a Fetcher or a FetchConfig, got {type(fetcher).__name__}")
    config = fetcher or FetchConfig()
    changes = {_DOWNLOAD_KEYWORDS[k]: v for k, v in download.items() if v is not None or k == "network"}
    config = dataclasses.replace(config, **changes)
    if config.max_bytes is None:
        config = dataclasses.replace(config, max_bytes=max_bytes)
    return config


def posts_from_records(
    records: Sequence[dict[str, Any]], image_root: str | os.PathLike[str] | None = None, **kw: Any
) -> Posts:
    """Build :class:`Posts` from a list of dicts (one per post), e.g. in tests and notebooks.

    Parameters
    ----------
    records
        Dicts with at least ``post_id``, ``image`` (path, URL or bytes) and ``text``; other keys are metadata.
    image_root
        Folder that relative image paths are relative to (``None``: the current folder, no root check).
    **kw
        Any keyword argument of :func:`read_posts`.

    Returns
    -------
    Posts
        As :func:`read_posts`.
    """
    return read_posts(list(records), image_root, **kw)


def _validate(
    loaded: Loaded,
    *,
    source: str,
    image_root: Path | None,
    explicit_root: bool,
    check_images: str,
    text_column: str,
    id_column: str,
    image_column: str,
    encoding: str,
    allow_outside_root: bool,
    on_duplicate: str,
    max_pixels: int,
    max_bytes: int,
    n_workers: int,
    downloads: Downloads | None = None,
) -> Posts:
    frame, images = _prepare_columns(
        loaded, id_column=id_column, text_column=text_column, image_column=image_column, source=source
    )
    if image_root is not None:
        root_abs = os.path.normpath(os.path.abspath(image_root))
        if explicit_root and not os.path.isdir(root_abs):
            raise FileNotFoundError(f"image_root is not an existing folder: {root_abs}")
        root_real: str | None = os.path.realpath(root_abs)
        base = root_abs
    else:
        root_abs = root_real = None
        base = os.getcwd()

    n = frame.height
    rows: list[int] = frame["__row__"].to_list()
    ids = _as_text_list(frame["post_id"])
    texts, bad_texts = _texts_as_text(frame["text"], encoding)
    rejects: list[Reject] = list(loaded.rejects)
    ok = [True] * n

    def reject(i: int, column: str | None, reason: str, detail: str) -> None:
        ok[i] = False
        rejects.append(Reject(rows[i], ids[i], column, reason, detail))

    first_row: dict[str, int] = {}
    duplicates: list[int] = []
    for i in range(n):
        post_id = ids[i]
        if post_id is None or not post_id.strip():
            reject(i, "post_id", "missing_post_id", "post_id is null or blank")
        elif post_id in first_row:
            duplicates.append(i)
            reject(
                i,
                "post_id",
                "duplicate_post_id",
                f"post_id {post_id!r} already used by row {first_row[post_id]} (the first one is kept)",
            )
        else:
            first_row[post_id] = rows[i]
        if i in bad_texts:
            reject(i, "text", "undecodable_text", bad_texts[i])
        elif texts[i] is None or not texts[i].strip():
            reject(i, "text", "empty_text", "text is null or blank")
    if duplicates and on_duplicate == "error":
        examples = ", ".join(f"{ids[i]!r} (rows {first_row[ids[i]]} and {rows[i]})" for i in duplicates[:5])
        raise DuplicatePostIdError(
            f"{source}: {len(duplicates)} row(s) repeat an earlier post_id, e.g. {examples}; "
            "use on_duplicate='reject' to keep the first row of each id"
        )

    caption_kind: pl.Series | None = None
    if "caption_kind" in frame.columns:
        values = [None if v is None or not v.strip() else v for v in _as_text_list(frame["caption_kind"])]
        for i, value in enumerate(values):
            if value is not None and value not in CAPTION_KINDS:
                reject(
                    i,
                    "caption_kind",
                    "bad_caption_kind",
                    f"caption_kind {value!r} is not one of {list(CAPTION_KINDS)} (or empty)",
                )
        caption_kind = pl.Series("caption_kind", values, dtype=pl.String)

    ctx = ImageContext(
        base=base,
        root=root_abs,
        root_real=root_real,
        allow_outside=allow_outside_root,
        check=check_images,
        max_pixels=max_pixels,
        max_bytes=max_bytes,
    )
    urls = list(dict.fromkeys(url for url in map(remote_url, images) if url is not None))
    if urls:
        ctx.downloads, ctx.fetcher = (downloads or Downloads()).fetch(urls, source)
    resolved = resolve_images(images, ctx, n_workers)
    for i, ref in enumerate(resolved):
        if isinstance(ref, _RowReject):
            reject(i, "image", ref.reason, ref.detail)
    hints = image_root_hints(resolved, root_abs, explicit_root)

    keep = [i for i in range(n) if ok[i]]
    refs = [resolved[i] for i in keep]
    assert all(isinstance(r, ImageRef) for r in refs)
    kept_texts = [texts[i] for i in keep]
    table = pl.DataFrame(
        [
            pl.Series("post_id", [ids[i] for i in keep], dtype=pl.String),
            pl.Series("image", [r.image for r in refs], dtype=pl.String),  # type: ignore[union-attr]
            pl.Series("image_path", [r.path for r in refs], dtype=pl.String),  # type: ignore[union-attr]
            pl.Series("image_bytes", [r.data for r in refs], dtype=pl.Binary),  # type: ignore[union-attr]
            pl.Series("text", kept_texts, dtype=pl.String),
            pl.Series("image_key", [r.key for r in refs], dtype=pl.String),  # type: ignore[union-attr]
            pl.Series("text_key", [content_key(t.encode()) for t in kept_texts], dtype=pl.String),  # type: ignore[union-attr]
            pl.Series("row", [rows[i] for i in keep], dtype=pl.Int64),
        ]
    )
    rest = frame.drop(["post_id", "text", "__row__"])
    if caption_kind is not None:
        rest = rest.with_columns(caption_kind)
    metadata = [c for c in rest.columns if c not in KNOWN_COLUMNS]
    if loaded.strings_only:
        rest = _infer_metadata_types(rest, metadata)
    for name in ("lang", "split"):
        if name in rest.columns and rest[name].dtype != pl.String:
            rest = rest.with_columns(pl.Series(name, _as_text_list(rest[name]), dtype=pl.String))
    if "timestamp" in rest.columns:
        rest = rest.with_columns(_parse_timestamps(rest["timestamp"]))
    ordered = [c for c in KNOWN_COLUMNS if c in rest.columns] + metadata
    if ordered:
        table = table.hstack(rest.select(ordered)[keep] if keep else rest.select(ordered).clear())

    reject_frame = (
        pl.DataFrame(
            {
                "post_id": [r.post_id for r in rejects],
                "row": [r.row for r in rejects],
                "column": [r.column for r in rejects],
                "reason": [r.reason for r in rejects],
                "detail": [r.detail for r in rejects],
            },
            schema=REJECTS_SCHEMA,
        ).sort("row", maintain_order=True)
        if rejects
        else _empty_rejects()
    )
    posts = Posts(
        table=table,
        rejects=reject_frame,
        image_root=Path(root_real) if root_real is not None else None,
        source=source,
        hints=hints,
    )
    if rejects:
        counts = ", ".join(f"{reason}: {k}" for reason, k in posts.reject_counts().items())
        logger.warning(
            "%s: rejected %d of %d rows (%s); see Posts.rejects or Posts.write_rejects(path)%s",
            source,
            posts.n_rejected,
            loaded.n_rows,
            counts,
            "".join(f"; {hint}" for hint in hints),
        )
    return posts
