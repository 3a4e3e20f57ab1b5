"""Per-post colors for the Explorer's map: category codes or float values, and the legend that explains them.

Plain numpy/polars; no widget library. The map sends codes as int32 and values as float32 (binary buffers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import polars as pl

from ._common import escape, truncate

#: Qualitative palette for category codes (the last color is reserved for "other").
PALETTE: tuple[str, ...] = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
    "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#9edae5",
    "#dbdb8d", "#c7c7c7",
)  # fmt: skip
OTHER = "(other)"
MISSING = "(missing)"
NO_COLOR = "none"
SINGLE_COLOR = "#1f77b4"
CONTINUOUS_SCALE = "Viridis"
#: Viridis stops, for the HTML legend's gradient.
_VIRIDIS = ("#440154", "#3b528b", "#21918c", "#5ec962", "#fde725")


@dataclass
class ColorSpec:
    """Per-post color values for one column (``values`` is indexed by row)."""

    column: str
    kind: Literal["none", "categorical", "continuous"]
    values: np.ndarray | None = None  # int32 codes or float32 values, length N
    categories: list[str] = field(default_factory=list)

    def range(self) -> tuple[float, float]:
        """``(min, max)`` of the finite values of a continuous column (a unit range when empty or flat)."""
        if self.values is None:
            return (0.0, 1.0)
        finite = self.values[np.isfinite(self.values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        return (lo, hi if hi > lo else lo + 1.0)


def column_color(col: pl.Series, max_categories: int = len(PALETTE)) -> ColorSpec:
    """Int32 codes (strings, booleans, integers with few values) or float32 values (other numbers, times)."""
    dtype = col.dtype
    name = col.name
    if dtype.is_float() or dtype.is_temporal() or (dtype.is_integer() and col.n_unique() > max_categories):
        if dtype.is_temporal():
            col = col.dt.epoch("s")
        values = col.cast(pl.Float64).fill_null(float("nan")).to_numpy().astype(np.float32)
        return ColorSpec(name, "continuous", values)
    s = col.cast(pl.String).fill_null(MISSING)
    counts = s.value_counts(name="n").sort(["n", name], descending=[True, False])
    cats = counts[name].to_list()
    if len(cats) > max_categories:
        keep = sorted(cats[: max_categories - 1], key=category_key)
        cats = [*keep, OTHER]
    else:
        cats = sorted(cats, key=category_key)
    other = len(cats) - 1
    codes = s.replace_strict(cats, list(range(len(cats))), default=other, return_dtype=pl.Int32).to_numpy()
    return ColorSpec(name, "categorical", np.ascontiguousarray(codes, dtype=np.int32), cats)


def category_key(cat: str) -> tuple[int, Any]:
    """Sort categories naturally (numbers by value), with "(missing)" last."""
    if cat == MISSING:
        return (2, cat)
    try:
        return (0, float(cat))
    except ValueError:
        return (1, cat)


def stepped_scale(k: int) -> list[list[Any]]:
    """A colorscale giving codes ``0..k-1`` (with ``cmin=-0.5``, ``cmax=k-0.5``) one flat palette color each."""
    k = max(k, 1)
    scale: list[list[Any]] = []
    for i in range(k):
        c = PALETTE[i % len(PALETTE)]
        scale += [[i / k, c], [(i + 1) / k, c]]
    return scale


def legend_html(spec: ColorSpec) -> str:
    """The color legend as HTML, shown beside the map rather than on it, so hover labels never cover it."""
    if spec.kind == "none" or spec.values is None:
        return ""
    head = f'<b style="margin-right:6px">{escape(spec.column)}</b>'
    if spec.kind == "categorical":
        counts = np.bincount(spec.values[spec.values >= 0], minlength=len(spec.categories))
        chips = "".join(
            f'<span class="ccclip-legend-item" data-category="{escape(c)}" style="white-space:nowrap;'
            f'margin-right:10px"><span style="display:inline-block;width:10px;height:10px;border-radius:5px;'
            f'background:{PALETTE[i % len(PALETTE)]};margin-right:3px"></span>{escape(truncate(c, 28))} '
            f'<span style="color:#888">{int(counts[i]):,}</span></span>'
            for i, c in enumerate(spec.categories)
        )
        body = chips
    else:
        lo, hi = spec.range()
        stops = ", ".join(_VIRIDIS)
        body = (
            f'<span>{lo:.3g}</span><span style="display:inline-block;width:140px;height:10px;margin:0 6px;'
            f'background:linear-gradient(to right, {stops})"></span><span>{hi:.3g}</span>'
        )
    return (
        f'<div class="ccclip-legend-body" data-column="{escape(spec.column)}" '
        f'style="font-size:12px;line-height:1.6;display:flex;flex-wrap:wrap;align-items:center">{head}{body}</div>'
    )
