"""bench_embed.py's report as a markdown table: a function of the results dict alone.

It reads nothing but the report that ``bench_embed.py`` writes as JSON, so it renders any
``benchmarks/results/embed_*.json`` as well as a fresh run.
"""

from __future__ import annotations

import math
from typing import Any


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def _runs(rec: dict[str, Any]) -> str:
    runs = rec.get("all_runs") or []
    return f"; best of {runs}" if len(runs) > 1 else ""


def _gpu_cell(rec: dict[str, Any]) -> str:
    g = rec.get("gpu")
    mem = rec.get("peak_gpu_mem_gib")
    parts = []
    if g and "util_mean_pct" in g:
        parts.append(f"util {g['util_mean_pct']:.0f}% mean / {g['util_p90_pct']:.0f}% p90")
    if g and g.get("sampler_errors"):
        parts.append(f"{g['sampler_errors']} failed utilisation reads")
    if mem is not None:
        parts.append(f"peak {mem} GiB")
    return ", ".join(parts)


def markdown(report: dict[str, Any]) -> str:
    """The results as a markdown table plus ratios."""
    r = report["results"]
    bs = report["args"]["batch_size"]
    rows = ["| measure | throughput | GPU | notes |", "|---|---|---|---|"]
    if "naive" in r:
        rows.append(
            f"| (a) naive loop: PIL + preprocess in main process, fp32, batch {bs}, no workers "
            f"| {_fmt(r['naive']['throughput'])} posts/s | {_gpu_cell(r['naive'])} "
            f"| {r['naive']['posts']} posts{_runs(r['naive'])} |"
        )
    for label, rec in r.get("embed_posts", {}).items():
        if "throughput" not in rec:
            rows.append(f"| (b) embed_posts, decode={label} | n/a | | {rec.get('skipped', '')} |")
            continue
        note = f"workers {rec.get('workers')}, {rec['posts']} posts{_runs(rec)}"
        rows.append(
            f"| (b) embed_posts end to end, decode={label} | {_fmt(rec['throughput'])} posts/s "
            f"| {_gpu_cell(rec)} | {note} |"
        )
    if "ceiling" in r:
        c = r["ceiling"]
        rows.append(
            f"| (c) forward-only ceiling: image + text, tensors on device, {c['precision']} "
            f"| {_fmt(c['throughput'])} posts/s | {_gpu_cell(c)} | batch {c['batch_size']}{_runs(c)} |"
        )
    for label, rec in r.get("decode_only", {}).items():
        rows.append(
            f"| (d) decode + preprocess only, {label} | {_fmt(rec['throughput'])} img/s | {_gpu_cell(rec)} "
            f"| workers {rec['workers']}, first batch after {rec.get('first_batch_s')} s, then "
            f"{_fmt(rec.get('steady_img_per_s'))} img/s{_runs(rec)} |"
        )
    if "decode_in_memory" in r:
        d = r["decode_in_memory"]
        alone = ", ".join(
            f"batch {k.split('_')[3]}: {_fmt(v)}" for k, v in d.items() if k.startswith("decode_only_batch_")
        )
        rows.append(
            f"| (d1) decode_and_preprocess alone, bytes in memory, no workers | {_fmt(d['throughput'])} img/s "
            f"| {_gpu_cell(d)} | batch {d['batch_size']}, {d['images']} images |"
        )
        rows.append(f"| (d0) decode_jpeg alone, bytes in memory | see notes | | img/s at {alone} |")
    if "image_forward" in r:
        rows.append(
            f"| (e) image forward only | {_fmt(r['image_forward']['throughput'])} img/s "
            f"| {_gpu_cell(r['image_forward'])} | {_runs(r['image_forward']).lstrip('; ')} |"
        )
    if "text_forward" in r:
        rows.append(
            f"| (e) text forward only | {_fmt(r['text_forward']['throughput'])} texts/s "
            f"| {_gpu_cell(r['text_forward'])} | {_runs(r['text_forward']).lstrip('; ')} |"
        )
    if "text_prep" in r:
        t = r["text_prep"]
        rows.append(
            f"| (f) tokenize only, serial | {_fmt(t['tokenize_texts_per_s'])} texts/s | | "
            f"count_truncated {_fmt(t['count_truncated_texts_per_s'])} texts/s; both in one pass "
            f"{_fmt(t.get('tokenize_counting_one_pass_texts_per_s'))} texts/s (embed_posts runs it in workers) |"
        )
    lines = ["\n".join(rows), ""]
    for label, ratio in report.get("ratios", {}).items():
        lines.append(
            f"- decode={label}: {ratio['of_ceiling']:.0%} of the forward-only ceiling, "
            f"{ratio['x_naive']:.1f}x the naive loop"
        )
    target = report.get("gpu_target")
    if target:
        lines.append(
            f"- GPU target (>= 80% of ceiling and >= 3x naive, decode={target['decode']}): "
            f"{'MET' if target['met'] else 'NOT MET'}"
        )
    m = report["meta"]
    hw = m.get("gpu_name") or "no GPU"
    lines.append(
        f"- machine: {hw}; {m.get('cpu_model', '?')} ({m.get('cpu_cores_usable')} usable cores); torch "
        f"{m['torch']}, torchvision {m['torchvision']}, open_clip {m.get('open_clip')}; host peak RSS "
        f"{m['rss']['self_peak_mb']} MB (largest worker {m['rss']['largest_child_peak_mb']} MB); load average "
        f"{m.get('load_average_1_5_15')} at start, {m.get('load_average_at_end')} at end"
    )
    return "\n".join(lines)
