"""Benchmark our UMAP path against plain umap-learn on the same vectors: time, trustworthiness, peak RSS.

Usage::

    python benchmarks/bench_umap.py --n 100000 --dim 512

Configurations (each in its own subprocess, after a small warm-up fit so numba compilation is not timed; the
warm-up time is reported as ``warmup_s``):

* ``plain``: ``umap.UMAP(n_neighbors=15, metric="cosine").fit_transform(x)``: umap-learn's defaults (no seed, so
  its optimizer may use every core; NN-descent neighbors; spectral init; 200 epochs above 10k points).
* ``plain_seeded``: the same with ``random_state=0`` (reproducible; umap-learn then runs on one thread).
* ``ours``: ``NeighborIndex.build`` + ``project_posts`` with the library defaults (FAISS kNN graph reused, seed 0),
  timed end to end, index build included.
* ``ours_unseeded``: the same with ``seed=None`` (parallel optimizer).

Trustworthiness (k=10) is measured on the same 5,000-point sample for every configuration. Results go to
``benchmarks/results/bench_umap.json`` with hardware and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_neighbors import hardware, peak_rss_mib, synthetic_posts  # noqa: E402

CONFIGS = ("plain", "plain_seeded", "ours", "ours_unseeded")


def run_one(config: str, n: int, dim: int, difficulty: str, extra: dict[str, Any]) -> dict[str, Any]:
    import umap

    from ccclip_widgets.neighbors import NeighborIndex
    from ccclip_widgets.projection import project_posts, trustworthiness

    warnings.filterwarnings("ignore")
    img, _ = synthetic_posts(n, dim, seed=3, difficulty=difficulty)
    out: dict[str, Any] = {"config": config, "n": n, "dim": dim, "difficulty": difficulty, "extra": extra}

    # Warm-up: compile numba functions on a small problem through the same code path (above 4,096 points, so that
    # umap-learn takes its NN-descent path rather than exact distances).
    t = time.perf_counter()
    small = img[:6000]
    if config.startswith("plain"):
        umap.UMAP(n_neighbors=15, metric="cosine", random_state=0 if config == "plain_seeded" else None).fit(
            small
        )
    else:
        from ccclip_widgets import neighbors_graph

        # The full-size graph goes through nearest-neighbor descent (above GRAPH_EXACT_MAX points): send the
        # warm-up through it too, so its numba compilation is not timed either (as umap-learn's is not).
        limit, neighbors_graph.GRAPH_EXACT_MAX = neighbors_graph.GRAPH_EXACT_MAX, len(small) // 2
        try:
            warm = NeighborIndex.build([str(i) for i in range(len(small))], small, show_progress=False)
            project_posts(warm, kind="image", seed=0 if config == "ours" else None, show_progress=False)
        finally:
            neighbors_graph.GRAPH_EXACT_MAX = limit
    out["warmup_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if config == "plain":
        xy = umap.UMAP(n_neighbors=15, metric="cosine").fit_transform(img)
    elif config == "plain_seeded":
        xy = umap.UMAP(n_neighbors=15, metric="cosine", random_state=0).fit_transform(img)
    else:
        ids = [str(i) for i in range(n)]
        t0 = time.perf_counter()
        index = NeighborIndex.build(ids, img, show_progress=False)
        out["index_build_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        index.knn_graph("image", k=15, show_progress=False)
        out["knn_graph_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        seed = 0 if config == "ours" else None
        xy = project_posts(index, kind="image", seed=seed, show_progress=False, **extra)
        out["umap_s"] = time.perf_counter() - t0
    out["total_s"] = time.perf_counter() - t
    out["trustworthiness_5k"] = trustworthiness(img, xy, k=10, sample=5000, seed=0)
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--difficulty", choices=["topics", "spread", "hard"], default="topics")
    p.add_argument("--extra", type=json.loads, default={}, help="JSON of extra fit_umap arguments for 'ours'")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_umap.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker is not None:
        res = run_one(args.worker, args.n, args.dim, args.difficulty, args.extra)
        print("RESULT " + json.dumps(res), flush=True)
        return

    hw = hardware()
    import numba
    import sklearn
    import umap

    hw.update(umap_learn=umap.__version__, numba=numba.__version__, sklearn=sklearn.__version__)
    hw["numba_threads"] = numba.config.NUMBA_NUM_THREADS
    results: dict[str, Any] = {
        "benchmark": "bench_umap",
        "hardware": hw,
        "runs": [],
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for config in args.configs:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            config,
            "--n",
            str(args.n),
            "--dim",
            str(args.dim),
            "--difficulty",
            args.difficulty,
            "--extra",
            json.dumps(args.extra),
        ]
        print(f"{config} ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stderr[-3000:], file=sys.stderr)
            results["runs"].append({"config": config, "error": proc.stderr[-2000:]})
            continue
        res = json.loads(lines[-1][len("RESULT ") :])
        results["runs"].append(res)
        print(
            f"{config}: total {res['total_s']:.1f}s trustworthiness {res['trustworthiness_5k']:.4f} "
            f"peak RSS {res['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
    by = {r["config"]: r for r in results["runs"] if "total_s" in r}
    for ours, plain in (("ours", "plain"), ("ours", "plain_seeded"), ("ours_unseeded", "plain")):
        if ours in by and plain in by:
            results[f"ratio_{ours}_vs_{plain}"] = by[ours]["total_s"] / by[plain]["total_s"]
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results["hardware"]["loadavg_at_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k.startswith("ratio")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
