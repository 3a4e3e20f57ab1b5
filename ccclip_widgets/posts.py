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
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import stat
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import polars as pl

from .errors import DuplicatePostIdError, NoUsablePostsError, PostsSchemaError
from .fetch import DEFAULT_TIMEOUT, DEFAULT_WORKERS, FETCH_REASONS, DownloadCache, Fetcher, FetchResult
from .images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageDecodeError, load_image, probe_image

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

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS: tuple[str, ...] = ("post_id", "image", "text")
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

_FULL_CHECK_TARGET = 256  # "full" checks decode JPEGs at reduced size: same errors, far less memory
_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_DATA_URL_RE = re.compile(r"^data:[A-Za-z0-9.+-]*(?:/[A-Za-z0-9.+-]*)?[;,]", re.IGNORECASE)
_DOWNLOADED = ("http", "https")
_SURROGATE_RE = re.compile("[\udc80-\udcff]")
_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
}


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
# Loading sources into a common intermediate form


@dataclass
class _Reject:
    row: int
    post_id: str | None
    column: str | None
    reason: str
    detail: str


@dataclass
class _Loaded:
    """A source parsed into columns: ``frame`` holds every column but the image column (plus ``row``);
    ``images`` holds the image values (any Python objects) aligned with ``frame``."""

    columns: list[str]  # source columns, in source order (including the image column)
    frame: pl.DataFrame
    images: list[Any] | None
    rejects: list[_Reject]
    n_rows: int
    strings_only: bool = False  # text formats: metadata types are inferred afterwards


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return type(value).__name__ in ("NAType", "NaTType")


def _to_text(value: Any) -> str | None:
    """Stringify a scalar for a String column (None stays None)."""
    if _is_missing(value):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _series(name: str, values: list[Any]) -> pl.Series:
    """A Series from Python values; falls back to strings when the values have mixed types."""
    try:
        series = pl.Series(name, values, strict=True)
        if series.dtype != pl.Object:
            return series
    except Exception:  # polars raises several types for mixed values
        pass
    return pl.Series(name, [_to_text(v) for v in values], dtype=pl.String)


def _attach_rows(columns: pl.DataFrame | list[pl.Series], rows: Sequence[int]) -> pl.DataFrame:
    """Add the internal source-row column (works for frames without any other column too)."""
    row_series = pl.Series("__row__", list(rows), dtype=pl.Int64)
    frame = columns if isinstance(columns, pl.DataFrame) else pl.DataFrame(columns)
    return frame.with_columns(row_series) if frame.width else pl.DataFrame([row_series])


def _load_records(
    records: Iterable[dict[str, Any]], rows: Sequence[int] | None, image_column: str
) -> _Loaded:
    records = list(records)
    for record in records:
        if not isinstance(record, dict):
            raise TypeError(f"records must be dicts (one per post), got {type(record).__name__}")
    records = [
        r if all(isinstance(k, str) for k in r) else {str(k): v for k, v in r.items()} for r in records
    ]
    if rows is None:
        rows = range(len(records))
    columns: dict[str, None] = {}
    for record in records:
        for key in record:
            columns.setdefault(key, None)
    names = list(columns)
    data = {name: [record.get(name) for record in records] for name in names if name != image_column}
    images = [record.get(image_column) for record in records] if image_column in columns else None
    frame = _attach_rows([_series(name, values) for name, values in data.items()], rows)
    return _Loaded(columns=names, frame=frame, images=images, rejects=[], n_rows=len(records))


def _load_polars(frame: pl.DataFrame, image_column: str) -> _Loaded:
    names = list(frame.columns)
    n_rows = frame.height
    images = None
    if image_column in names:
        column = frame[image_column]
        if column.dtype == pl.Categorical or column.dtype == pl.Enum:
            column = column.cast(pl.String)
        images = column.to_list()
        frame = frame.drop(image_column)
    return _Loaded(
        columns=names,
        frame=_attach_rows(frame, range(n_rows)),
        images=images,
        rejects=[],
        n_rows=n_rows,
    )


def _is_pandas_frame(obj: Any) -> bool:
    return type(obj).__name__ == "DataFrame" and type(obj).__module__.split(".")[0] == "pandas"


def _load_pandas(frame: Any, image_column: str) -> _Loaded:
    names = [str(c) for c in frame.columns]
    if len(set(names)) != len(names):
        raise PostsSchemaError(f"duplicate column names in the pandas frame: {names}")
    frame = frame.copy(deep=False)
    frame.columns = names
    images = frame[image_column].tolist() if image_column in names else None
    rest = frame.drop(columns=[image_column]) if images is not None else frame
    try:
        converted = pl.from_pandas(rest)
    except Exception:  # mixed object columns: convert column by column
        converted = pl.DataFrame(
            [
                _series(name, [None if _is_missing(v) else v for v in rest[name].tolist()])
                for name in rest.columns
            ]
        )
    return _Loaded(
        columns=names,
        frame=_attach_rows(converted, range(len(frame))),
        images=images,
        rejects=[],
        n_rows=len(frame),
    )


def _decode_lenient(raw: bytes, encoding: str) -> tuple[str, list[int], list[int]]:
    """Decode ``raw`` (dropping a UTF-8 BOM); undecodable bytes become lone surrogates (U+DC80..U+DCFF).

    Returns
    -------
    text, byte_offsets, line_numbers
        Byte offsets in ``raw`` and 1-based line numbers of every undecodable byte, in file order.
    """
    codec = codecs.lookup(encoding).name
    bom = 0
    if codec == "utf-8" and raw.startswith(codecs.BOM_UTF8):
        bom = len(codecs.BOM_UTF8)
    body = raw[bom:]
    try:
        return body.decode(encoding), [], []
    except UnicodeDecodeError:
        pass
    text = body.decode(encoding, "surrogateescape")
    offsets: list[int] = []
    lines: list[int] = []
    byte_pos, char_pos, line = bom, 0, 1
    for match in _SURROGATE_RE.finditer(text):
        chunk = text[char_pos : match.start()]
        byte_pos += len(chunk.encode(encoding, "surrogateescape"))
        line += chunk.count("\n")
        offsets.append(byte_pos)
        lines.append(line)
        byte_pos += 1
        char_pos = match.end()
    return text, offsets, lines


class _FieldLimit:
    """Temporarily lift the csv module's per-field size limit (long posts, unbalanced quotes)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.previous = 0

    def __enter__(self) -> None:
        self.previous = csv.field_size_limit()
        csv.field_size_limit(max(self.previous, self.limit))

    def __exit__(self, *exc: object) -> None:
        csv.field_size_limit(self.previous)


def _load_delimited(
    path: Path, *, delimiter: str, encoding: str, id_column: str, image_column: str
) -> _Loaded:
    raw = path.read_bytes()
    text, bad_offsets, bad_lines = _decode_lenient(raw, encoding)
    has_bad = bool(bad_offsets)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=False)
    header: list[str] | None = None
    rows_out: list[int] = []
    cells_out: list[list[str]] = []
    rejects: list[_Reject] = []
    bad_seen = 0  # undecodable bytes consumed so far (in file order)
    row = -1
    id_index = None
    with _FieldLimit(max(len(text), 1) + 1):
        for cells in reader:
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue  # blank line (surrogates are not whitespace, so no undecodable bytes here)
            n_bad = sum(len(_SURROGATE_RE.findall(c)) for c in cells) if has_bad else 0
            if header is None:
                if n_bad:
                    raise PostsSchemaError(
                        f"{path}: the header has bytes that are not valid {encoding} at byte offset "
                        f"{bad_offsets[0]} (line {bad_lines[0]}); pass the right encoding=..."
                    )
                header = [c.strip() or f"column_{i}" for i, c in enumerate(cells)]
                if len(set(header)) != len(header):
                    dupes = sorted({h for h in header if header.count(h) > 1})
                    raise PostsSchemaError(f"{path}: duplicate column names in the header: {dupes}")
                id_index = header.index(id_column) if id_column in header else None
                continue
            row += 1
            post_id = cells[id_index] if id_index is not None and id_index < len(cells) else None
            if post_id is not None:
                post_id = _SURROGATE_RE.sub("\ufffd", post_id) or None
            if n_bad:
                column = next(
                    header[i] if i < len(header) else f"field_{i}"
                    for i, c in enumerate(cells)
                    if _SURROGATE_RE.search(c)
                )
                offset, line = bad_offsets[bad_seen], bad_lines[bad_seen]
                bad_seen += n_bad
                rejects.append(
                    _Reject(
                        row,
                        post_id,
                        column,
                        "undecodable_text",
                        f"byte offset {offset} (line {line}) is not valid {encoding} "
                        f"(column {column!r}); fix the file or pass encoding=...",
                    )
                )
                continue
            if len(cells) != len(header):
                rejects.append(
                    _Reject(
                        row,
                        post_id,
                        None,
                        "malformed_row",
                        f"expected {len(header)} fields, found {len(cells)} "
                        "(an unquoted separator or an unbalanced quote?)",
                    )
                )
                continue
            rows_out.append(row)
            cells_out.append(cells)
    if header is None:
        raise PostsSchemaError(
            f"{path}: the file is empty (no header row); expected columns {list(REQUIRED_COLUMNS)}"
        )
    data = {name: [c[i] or None for c in cells_out] for i, name in enumerate(header) if name != image_column}
    images = None
    if image_column in header:
        image_index = header.index(image_column)
        images = [c[image_index] or None for c in cells_out]
    frame = _attach_rows(
        [pl.Series(name, values, dtype=pl.String) for name, values in data.items()], rows_out
    )
    return _Loaded(
        columns=header, frame=frame, images=images, rejects=rejects, n_rows=row + 1, strings_only=True
    )


def _load_jsonl(path: Path, *, encoding: str, id_column: str, image_column: str) -> _Loaded:
    raw = path.read_bytes()
    if codecs.lookup(encoding).name == "utf-8" and raw.startswith(codecs.BOM_UTF8):
        raw = b"   " + raw[3:]  # keep byte offsets
    records: list[dict[str, Any]] = []
    rows: list[int] = []
    rejects: list[_Reject] = []
    offset = 0
    row = -1
    for line_no, line in enumerate(raw.split(b"\n"), start=1):
        start = offset
        offset += len(line) + 1
        if not line.strip():
            continue
        row += 1
        try:
            text = line.decode(encoding)
        except UnicodeDecodeError as exc:
            post_id = None
            try:
                obj = json.loads(line.decode(encoding, "replace"))
                post_id = _to_text(obj.get(id_column)) if isinstance(obj, dict) else None
            except ValueError:
                pass
            rejects.append(
                _Reject(
                    row,
                    post_id,
                    None,
                    "undecodable_text",
                    f"byte offset {start + exc.start} (line {line_no}) is not valid {encoding}; "
                    "fix the file or pass encoding=...",
                )
            )
            continue
        try:
            obj = json.loads(text)
        except ValueError as exc:
            rejects.append(_Reject(row, None, None, "malformed_row", f"line {line_no}: invalid JSON: {exc}"))
            continue
        if not isinstance(obj, dict):
            rejects.append(
                _Reject(
                    row,
                    None,
                    None,
                    "malformed_row",
                    f"line {line_no}: expected a JSON object, got {type(obj).__name__}",
                )
            )
            continue
        records.append(obj)
        rows.append(row)
    loaded = _load_records(records, rows, image_column)
    loaded.rejects = rejects
    loaded.n_rows = row + 1
    return loaded


def _load_json(path: Path, *, encoding: str, id_column: str, image_column: str) -> _Loaded:
    raw = path.read_bytes()
    if raw.lstrip(codecs.BOM_UTF8 + b" \t\r\n").startswith(b"["):
        try:
            data = json.loads(raw.decode(encoding).lstrip("\ufeff"))
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{path}: byte offset {exc.start} is not valid {encoding}; a JSON array is read as a whole, "
                "so fix the file or write it as JSON Lines (.jsonl) to have single bad rows rejected"
            ) from None
        except ValueError as exc:
            raise ValueError(f"{path}: invalid JSON: {exc}") from None
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            raise PostsSchemaError(f"{path}: expected a JSON array of objects (one per post)")
        return _load_records(data, None, image_column)
    return _load_jsonl(path, encoding=encoding, id_column=id_column, image_column=image_column)


def _load_file(path: Path, *, encoding: str, id_column: str, image_column: str) -> _Loaded:
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; expected one of {sorted(_SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"posts file not found: {path}")
    if kind in ("csv", "tsv"):
        delimiter = "," if kind == "csv" else "\t"
        return _load_delimited(
            path, delimiter=delimiter, encoding=encoding, id_column=id_column, image_column=image_column
        )
    if kind == "parquet":
        return _load_polars(pl.read_parquet(path), image_column)
    if kind == "json":
        return _load_json(path, encoding=encoding, id_column=id_column, image_column=image_column)
    return _load_jsonl(path, encoding=encoding, id_column=id_column, image_column=image_column)


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
class _ImageRef:
    image: str  # the reference as given, or "<bytes:N>"
    path: str | None
    data: bytes | None
    key: str


@dataclass
class _ImageContext:
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


def _key(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


# Results of image checks keyed by (image_key, check, limits): re-reading the same table (a notebook cell run
# again) does not decode every header again. Bounded; cleared when full.
_CHECK_CACHE: dict[tuple[str, str, int, int], tuple[str, str] | None] = {}
_CHECK_CACHE_MAX = 500_000


def _resolve_remote_image(url: str, scheme: str, original: str, ctx: _ImageContext) -> _ImageRef:
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
    return _ImageRef(image=original, path=str(result.path), data=None, key=result.key)


def _remote_url(value: Any) -> str | None:
    """The stripped URL when ``value`` is an http(s) URL string (the values read_posts downloads), else None."""
    if not isinstance(value, str):
        return None
    ref = value.strip()
    match = _URL_RE.match(ref)
    if match and match.group(1).lower() in _DOWNLOADED:
        return ref
    return None


def _check_decodable(source: str | bytes, key: str, ctx: _ImageContext) -> None:
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


def _resolve_bytes(value: bytes | bytearray | memoryview, ctx: _ImageContext) -> _ImageRef:
    data = bytes(value)
    if not data:
        raise _RowReject("empty_image", "the image bytes are empty")
    if ctx.check == "none" and len(data) > ctx.max_bytes:
        raise _RowReject("too_large_image", f"{len(data)} bytes exceeds max_bytes={ctx.max_bytes}")
    key = _key(data)
    _check_decodable(data, key, ctx)
    return _ImageRef(image=f"<bytes:{len(data)}>", path=None, data=data, key=key)


def _real_dir(folder: str, ctx: _ImageContext) -> str:
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


def _resolve_path(ref: str, original: str, ctx: _ImageContext) -> _ImageRef:
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
    key = _key(identity)
    _check_decodable(real, key, ctx)
    return _ImageRef(image=original, path=real, data=None, key=key)


def _resolve_image(value: Any, ctx: _ImageContext) -> _ImageRef | _RowReject:
    """Resolve one image value; failures are returned (not raised) so worker threads never raise."""
    try:
        if _is_missing(value):
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


def _image_root_hints(
    resolved: list[_ImageRef | _RowReject], root: str | None, explicit: bool
) -> tuple[str, ...]:
    """When no local image path lies under the image root, say which root would admit them all."""
    outside = [r.path for r in resolved if isinstance(r, _RowReject) and r.path is not None]
    if not outside or any(isinstance(r, _ImageRef) and r.path is not None for r in resolved):
        return ()
    parent = os.path.commonpath([os.path.dirname(p) for p in outside])
    which = "the given image_root" if explicit else "the default image_root (the posts table's folder)"
    return (
        f"all {len(outside)} local image paths lie outside {which} {root}; pass image_root={parent!r} "
        f"(ccclip: --image-root {parent}), their common parent, to admit them",
    )


def _resolve_images(values: list[Any], ctx: _ImageContext, n_workers: int) -> list[_ImageRef | _RowReject]:
    """Resolve all image values, in order, using a thread pool for the file system and header reads."""
    if n_workers <= 1 or len(values) < 64:
        return [_resolve_image(v, ctx) for v in values]
    chunk = max(16, min(512, len(values) // (n_workers * 4) + 1))
    chunks = [values[i : i + chunk] for i in range(0, len(values), chunk)]

    def work(part: list[Any]) -> list[_ImageRef | _RowReject]:
        return [_resolve_image(v, ctx) for v in part]

    with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="ccclip-posts") as pool:
        return list(chain.from_iterable(pool.map(work, chunks)))


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
    return [_to_text(v) for v in series.to_list()]


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
    return [_to_text(v) for v in series.to_list()], bad


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
    loaded: _Loaded, *, id_column: str, text_column: str, image_column: str, source: str
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
    network: bool | None = None,
    download_cache: str | os.PathLike[str] | DownloadCache | None = None,
    max_download_bytes: int | None = None,
    download_workers: int = DEFAULT_WORKERS,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
    retries: int = 3,
    fetcher: Fetcher | None = None,
    show_progress: bool = True,
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
    network
        Whether ``http(s)`` image URLs may be downloaded. ``None`` (default): yes, unless the environment
        variable ``CCCLIP_OFFLINE`` is ``1``/``true``/``yes``/``on``; ``False``: air-gapped, no connection is
        ever opened; URLs already in the download cache are still used (verified local copies), every other
        URL is rejected with ``network_disabled``.
    download_cache
        Folder (or :class:`~ccclip_widgets.fetch.DownloadCache`) for downloaded images (default:
        ``<toolkit cache>/downloads``, i.e. ``$CCCLIP_CACHE/downloads``). Bodies are stored once by content
        hash; a URL is never downloaded twice, across runs too.
    max_download_bytes
        Size cap per downloaded image (default: ``max_bytes``); larger bodies are cut off and rejected
        (``too_large_image``).
    download_workers
        Concurrent downloads.
    timeout
        Download timeouts in seconds: one number, or ``(connect, read)``.
    retries
        Extra attempts per URL after transient failures (connection errors, timeouts, 429 and 5xx answers),
        with exponential back-off; 404/403/410 are never retried.
    fetcher
        A configured :class:`~ccclip_widgets.fetch.Fetcher` (back-off, redirects, proxies, ...); when given, the
        download arguments above are ignored.
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
        loaded = _load_file(path, encoding=encoding, **kw)
        description = str(path)
        default_root = path.resolve().parent
    elif isinstance(source, pl.LazyFrame):
        loaded = _load_polars(source.collect(), image_column)
        description = "polars.LazyFrame"
    elif isinstance(source, pl.DataFrame):
        loaded = _load_polars(source, image_column)
        description = f"polars.DataFrame ({source.height} rows)"
    elif _is_pandas_frame(source):
        loaded = _load_pandas(source, image_column)
        description = f"pandas.DataFrame ({len(source)} rows)"
    elif isinstance(source, list):
        loaded = _load_records(source, None, image_column)
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
        downloads=_Downloads(
            fetcher=fetcher,
            options={
                "cache": download_cache,
                "network": network,
                "workers": download_workers,
                "timeout": timeout,
                "retries": retries,
                "max_bytes": max_download_bytes if max_download_bytes is not None else max_bytes,
            },
            show_progress=show_progress,
        ),
    )


@dataclass
class _Downloads:
    """How read_posts downloads http(s) image URLs: a given Fetcher, or the options to build one."""

    fetcher: Fetcher | None = None
    options: dict[str, Any] = field(default_factory=dict)
    show_progress: bool = False

    def fetch(self, urls: list[str], source: str) -> tuple[dict[str, FetchResult], Fetcher]:
        fetcher = self.fetcher if self.fetcher is not None else Fetcher(**self.options)
        try:
            results = fetcher.fetch_many(urls, show_progress=self.show_progress)
        finally:
            if self.fetcher is None:
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
    loaded: _Loaded,
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
    downloads: _Downloads | None = None,
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
    rejects: list[_Reject] = list(loaded.rejects)
    ok = [True] * n

    def reject(i: int, column: str | None, reason: str, detail: str) -> None:
        ok[i] = False
        rejects.append(_Reject(rows[i], ids[i], column, reason, detail))

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

    ctx = _ImageContext(
        base=base,
        root=root_abs,
        root_real=root_real,
        allow_outside=allow_outside_root,
        check=check_images,
        max_pixels=max_pixels,
        max_bytes=max_bytes,
    )
    urls = list(dict.fromkeys(url for url in map(_remote_url, images) if url is not None))
    if urls:
        ctx.downloads, ctx.fetcher = (downloads or _Downloads()).fetch(urls, source)
    resolved = _resolve_images(images, ctx, n_workers)
    for i, ref in enumerate(resolved):
        if isinstance(ref, _RowReject):
            reject(i, "image", ref.reason, ref.detail)
    hints = _image_root_hints(resolved, root_abs, explicit_root)

    keep = [i for i in range(n) if ok[i]]
    refs = [resolved[i] for i in keep]
    assert all(isinstance(r, _ImageRef) for r in refs)
    kept_texts = [texts[i] for i in keep]
    table = pl.DataFrame(
        [
            pl.Series("post_id", [ids[i] for i in keep], dtype=pl.String),
            pl.Series("image", [r.image for r in refs], dtype=pl.String),  # type: ignore[union-attr]
            pl.Series("image_path", [r.path for r in refs], dtype=pl.String),  # type: ignore[union-attr]
            pl.Series("image_bytes", [r.data for r in refs], dtype=pl.Binary),  # type: ignore[union-attr]
            pl.Series("text", kept_texts, dtype=pl.String),
            pl.Series("image_key", [r.key for r in refs], dtype=pl.String),  # type: ignore[union-attr]
            pl.Series("text_key", [_key(t.encode()) for t in kept_texts], dtype=pl.String),  # type: ignore[union-attr]
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
