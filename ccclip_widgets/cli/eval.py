"""``ccclip eval``: retrieval metrics of one or several models on a posts table, per caption kind and language.

::

    ccclip eval posts.csv --model demo --model runs/ft/final --split test --out gap.csv

Every model embeds the posts through the on-disk store (``--store``, default the toolkit cache), so evaluating
the same posts again, or another model next to one already evaluated, only encodes what is new. The table of
:func:`ccclip_widgets.evaluate.evaluate_retrieval` is printed with
:func:`~ccclip_widgets.evaluate.format_gap_table` and written atomically (temporary file, then rename) to CSV or
Parquet, chosen by the suffix of ``--out``.
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ._common import add_flags, out_suffix, read_posts_checked, stdout_line

__all__ = ["add_arguments", "parse_model_arg", "run", "write_table"]

DESCRIPTION = (
    "Embed a posts table with each model (reusing the embedding store) and report text-to-image and "
    "image-to-text Recall@1/5/10 with bootstrap 95%% confidence intervals, median and mean rank, per "
    "group (caption kind x language by default). --out writes the table as CSV or Parquet (by its suffix)."
)

_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_DEFAULT_GROUPS = ("caption_kind", "lang")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``eval`` arguments."""
    p.add_argument("posts", help="posts table: CSV, TSV, Parquet or JSONL with post_id, image, text columns")
    add_flags(
        p,
        "--model",
        "--out",
        "--image-root",
        "--device",
        "--allow-random",
        "--no-progress",
        model={
            "action": "append",
            "required": True,
            "metavar": "[NAME=]SPEC",
            "help": "model spec (demo, ARCH:TAG, ARCH:/weights, local-dir:DIR, checkpoint DIR); repeat to compare "
            "models; prefix NAME= to label it in the table (default: the spec)",
        },
        out={"default": None, "metavar": "FILE", "help": "write the table here: .csv, .parquet or .pq"},
    )
    p.add_argument(
        "--split",
        default="auto",
        help="evaluate posts whose split column has this value; 'all' for every post; 'auto' (default): "
        "'test' when the table has test posts, else all",
    )
    p.add_argument(
        "--group-by",
        nargs="*",
        default=None,
        metavar="COLUMN",
        help="grouping columns (default: caption_kind lang, those present); give none for one overall row",
    )
    p.add_argument("--store", default=None, help="embedding store folder (default: the toolkit cache)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass")
    p.add_argument("--workers", type=int, default=None, help="image-decoding worker processes")
    p.add_argument(
        "--pool",
        default="all",
        choices=["group", "all"],
        help="candidates per group: every post (all, the default) or the group's own posts",
    )
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the intervals (0: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")


def parse_model_arg(value: str) -> tuple[str, str]:
    """Split a ``--model`` value into ``(name, spec)``.

    ``NAME=SPEC`` gives an explicit name; a value that is an existing path, or whose part before ``=`` contains
    a path separator or a colon, is a plain spec named after itself.

    Parameters
    ----------
    value
        The argument.

    Returns
    -------
    tuple of str
        ``(name, spec)``.
    """
    if "=" in value and not Path(value).expanduser().exists():
        name, spec = value.split("=", 1)
        if name and spec and not any(c in name for c in "/\\:"):
            return name, spec
    return value, value


def write_table(df: Any, path: str | os.PathLike[str]) -> Path:
    """Write a polars table to CSV or Parquet (by suffix) atomically.

    Parameters
    ----------
    df
        A polars DataFrame.
    path
        Destination ending in ``.csv``, ``.parquet`` or ``.pq``.

    Returns
    -------
    Path
        The written path.

    Raises
    ------
    UsageError
        For another suffix (a ``ValueError``).
    """
    from .._io import atomic_write_bytes

    path = Path(path)
    kind = out_suffix(str(path), _SUFFIXES)
    buf = io.BytesIO()
    if kind == "csv":
        df.write_csv(buf)
    else:
        df.write_parquet(buf)
    return atomic_write_bytes(path, buf.getvalue())


def _select_split(table: Any, split: str) -> tuple[Any, str]:
    import polars as pl

    if split == "all":
        return table, "all posts"
    has = "split" in table.columns
    if split == "auto":
        if has and (table["split"] == "test").fill_null(False).any():
            return table.filter(pl.col("split") == "test"), "split == 'test'"
        return table, "all posts"
    if not has:
        raise UsageError(f"--split {split} was given but the posts have no split column; use --split all")
    sub = table.filter(pl.col("split") == split)
    if sub.height == 0:
        values = sorted(str(v) for v in table["split"].unique().to_list())
        raise UsageError(f"no posts with split == {split!r}; the split column holds {values}")
    return sub, f"split == {split!r}"


def run(args: argparse.Namespace) -> int:
    """Run ``ccclip eval``: embed with every model, evaluate, print, write.

    Returns
    -------
    int
        0; failures raise (the exit code comes from the error, see ``docs/cli.md``).
    """
    import sys

    import numpy as np
    import polars as pl

    from ..embed import embed_posts
    from ..evaluate import evaluate_retrieval, format_gap_table
    from ..models import load_model

    if args.out is not None:
        out_suffix(args.out, _SUFFIXES)
    names: dict[str, str] = {}
    for value in args.model:
        name, spec = parse_model_arg(value)
        base, i = name, 2
        while name in names:
            name, i = f"{base}#{i}", i + 1
        names[name] = spec

    rejects_to = None
    if args.out is not None:
        out = Path(args.out)
        rejects_to = out.with_name(f"{out.stem}.rejects.csv")
    posts = read_posts_checked(args.posts, image_root=args.image_root, rejects_to=rejects_to)
    table, which = _select_split(posts.table, args.split)
    posts = type(posts)(table=table, rejects=posts.rejects, image_root=posts.image_root, source=posts.source)

    if args.group_by is None:
        group_by = [g for g in _DEFAULT_GROUPS if g in table.columns]
    else:
        missing = [g for g in args.group_by if g not in table.columns]
        if missing:
            raise UsageError(f"--group-by columns {missing} are not in the posts (columns: {table.columns})")
        group_by = list(args.group_by)

    store = Path(args.store) if args.store else None
    vectors: dict[str, tuple[Any, Any, list[str]]] = {}
    for name, spec in names.items():
        model = load_model(spec, device=args.device, allow_random=args.allow_random)
        emb = embed_posts(
            posts,
            model,
            store=store,
            batch_size=args.batch_size,
            num_workers=args.workers,
            show_progress=not args.no_progress,
        )
        print(emb.summary(), file=sys.stderr)
        vectors[name] = (emb.image, emb.text, emb.post_ids)
        del model

    # Posts whose image failed to decode are dropped by every model alike; keep the rows all models share.
    common = set(table["post_id"].to_list())
    for _, _, ids in vectors.values():
        common &= set(ids)
    kept = table.filter(pl.col("post_id").is_in(sorted(common)))
    order = kept["post_id"].to_list()
    aligned: dict[str, tuple[Any, Any]] = {}
    for name, (img, txt, ids) in vectors.items():
        pos = {pid: i for i, pid in enumerate(ids)}
        idx = np.fromiter((pos[p] for p in order), dtype=np.int64, count=len(order))
        aligned[name] = (img[idx], txt[idx])
    dropped = table.height - kept.height
    df = evaluate_retrieval(
        aligned, kept, group_by=group_by, n_boot=args.n_boot, seed=args.seed, pool=args.pool
    )
    stdout_line(
        f"{kept.height} posts evaluated ({which}{f', {dropped} dropped: image failed to decode' if dropped else ''}); "
        f"pool: {args.pool}; intervals: {args.n_boot} bootstrap resamples, 95%"
    )
    stdout_line(format_gap_table(df))
    if args.out is not None:
        path = write_table(df, args.out)
        stdout_line(f"table written to {path}")
    return 0
