"""Reading posts tables: CSV / TSV / Parquet / JSON Lines / JSON files and in-memory frames into columns.

Each reader returns a :class:`Loaded`: the columns as parsed (text formats keep every value a string; types are
inferred later by :mod:`ccclip_widgets.posts`), the image values aligned with them, and the rows that could not
be parsed at all (``malformed_row``, ``undecodable_text``) as :class:`Reject` values. Nothing here validates
posts; :func:`ccclip_widgets.read_posts` does that.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from .errors import PostsSchemaError

REQUIRED_COLUMNS: tuple[str, ...] = ("post_id", "image", "text")

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

_SURROGATE_RE = re.compile("[\udc80-\udcff]")
# ==============================================================================================================
# Loading sources into a common intermediate form


@dataclass
class Reject:
    row: int
    post_id: str | None
    column: str | None
    reason: str
    detail: str


@dataclass
class Loaded:
    """A source parsed into columns: ``frame`` holds every column but the image column (plus ``row``);
    ``images`` holds the image values (any Python objects) aligned with ``frame``."""

    columns: list[str]  # source columns, in source order (including the image column)
    frame: pl.DataFrame
    images: list[Any] | None
    rejects: list[Reject]
    n_rows: int
    strings_only: bool = False  # text formats: metadata types are inferred afterwards


def is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return type(value).__name__ in ("NAType", "NaTType")


def to_text(value: Any) -> str | None:
    """Stringify a scalar for a String column (None stays None)."""
    if is_missing(value):
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
    return pl.Series(name, [to_text(v) for v in values], dtype=pl.String)


def _attach_rows(columns: pl.DataFrame | list[pl.Series], rows: Sequence[int]) -> pl.DataFrame:
    """Add the internal source-row column (works for frames without any other column too)."""
    row_series = pl.Series("__row__", list(rows), dtype=pl.Int64)
    frame = columns if isinstance(columns, pl.DataFrame) else pl.DataFrame(columns)
    return frame.with_columns(row_series) if frame.width else pl.DataFrame([row_series])


def load_records(records: Iterable[dict[str, Any]], rows: Sequence[int] | None, image_column: str) -> Loaded:
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
    return Loaded(columns=names, frame=frame, images=images, rejects=[], n_rows=len(records))


def load_polars(frame: pl.DataFrame, image_column: str) -> Loaded:
    names = list(frame.columns)
    n_rows = frame.height
    images = None
    if image_column in names:
        column = frame[image_column]
        if column.dtype == pl.Categorical or column.dtype == pl.Enum:
            column = column.cast(pl.String)
        images = column.to_list()
        frame = frame.drop(image_column)
    return Loaded(
        columns=names,
        frame=_attach_rows(frame, range(n_rows)),
        images=images,
        rejects=[],
        n_rows=n_rows,
    )


def is_pandas_frame(obj: Any) -> bool:
    return type(obj).__name__ == "DataFrame" and type(obj).__module__.split(".")[0] == "pandas"


def load_pandas(frame: Any, image_column: str) -> Loaded:
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
                _series(name, [None if is_missing(v) else v for v in rest[name].tolist()])
                for name in rest.columns
            ]
        )
    return Loaded(
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
) -> Loaded:
    raw = path.read_bytes()
    text, bad_offsets, bad_lines = _decode_lenient(raw, encoding)
    has_bad = bool(bad_offsets)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=False)
    header: list[str] | None = None
    rows_out: list[int] = []
    cells_out: list[list[str]] = []
    rejects: list[Reject] = []
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
                    Reject(
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
                    Reject(
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
    return Loaded(
        columns=header, frame=frame, images=images, rejects=rejects, n_rows=row + 1, strings_only=True
    )


def _load_jsonl(path: Path, *, encoding: str, id_column: str, image_column: str) -> Loaded:
    raw = path.read_bytes()
    if codecs.lookup(encoding).name == "utf-8" and raw.startswith(codecs.BOM_UTF8):
        raw = b"   " + raw[3:]  # keep byte offsets
    records: list[dict[str, Any]] = []
    rows: list[int] = []
    rejects: list[Reject] = []
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
                post_id = to_text(obj.get(id_column)) if isinstance(obj, dict) else None
            except ValueError:
                pass
            rejects.append(
                Reject(
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
            rejects.append(Reject(row, None, None, "malformed_row", f"line {line_no}: invalid JSON: {exc}"))
            continue
        if not isinstance(obj, dict):
            rejects.append(
                Reject(
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
    loaded = load_records(records, rows, image_column)
    loaded.rejects = rejects
    loaded.n_rows = row + 1
    return loaded


def _load_json(path: Path, *, encoding: str, id_column: str, image_column: str) -> Loaded:
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
        return load_records(data, None, image_column)
    return _load_jsonl(path, encoding=encoding, id_column=id_column, image_column=image_column)


def load_file(path: Path, *, encoding: str, id_column: str, image_column: str) -> Loaded:
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
        return load_polars(pl.read_parquet(path), image_column)
    if kind == "json":
        return _load_json(path, encoding=encoding, id_column=id_column, image_column=image_column)
    return _load_jsonl(path, encoding=encoding, id_column=id_column, image_column=image_column)
