"""Benchmark NeighborIndex: build time, click latency, recall, memory; against brute-force FAISS in the same run.

Usage::

    python benchmarks/bench_neighbors.py --n 10000 100000 1000000 --dim 512

For each N a fresh subprocess (so peak RSS belongs to that N alone) generates clustered synthetic L2-normalized
image vectors and paired text vectors, builds ``NeighborIndex`` with its defaults (exact below the threshold,
approximate above), and measures:

* ``build_s``: ``NeighborIndex.build`` over both modalities;
* single-query latency (p50/p95 over ``--queries`` queries) of ``index.image_to_texts(i, k=10)``: the backend part
  of a click, polars frame included;
* the same for a brute-force ``faiss.IndexFlatIP`` over the text vectors (the baseline), and its build time;
* recall@10 of the click results against the brute-force results for the same queries;
* peak RSS of the process (``resource.getrusage``).

Optionally (``--sweep``) the approximate index's recall/latency curve over ``nprobe`` or ``efSearch``.
Results go to ``benchmarks/results/bench_neighbors.json`` with hardware and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


#: Synthetic data regimes: (latent dimensions, latent scale, isotropic noise, topics cap).
DIFFICULTIES: dict[str, tuple[int, float, float, int | None]] = {
    "topics": (32, 0.8, 0.2, 1000),
    "spread": (32, 0.8, 0.2, None),
    "hard": (48, 1.0, 0.3, None),
}


def synthetic_posts(
    n: int, dim: int = 512, *, seed: int = 0, difficulty: str = "spread", chunk: int = 100_000
) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit image vectors and paired text vectors (each text near its image, across a modality gap).

    Posts belong to "topics" (random centers), spread along a shared low-dimensional latent space with a decaying
    spectrum, plus isotropic noise in all ``dim`` directions; the isotropic part flattens distance contrast the
    way real high-dimensional noise does and is what makes neighbors hard to find. Each text is its image moved
    by a fixed modality gap plus noise (CLIP's image and text vectors sit in two offset cones).

    Regimes (see :data:`DIFFICULTIES`):

    * ``topics``: at most 1,000 topics, so more posts make topics denser (as more posts about the same things
      do). At 1M an IVF index finds everything at a narrow probe: the optimistic case.
    * ``spread``: ``n / 100`` topics of about 100 posts each at every size, so at 1M neighbors spread over many
      inverted lists (same-modality IVF-2048 recall@10 about 0.55 at ``nprobe=32``): the pessimistic case.
    * ``hard``: ``spread`` with a 48-d latent space and more isotropic noise: a stress case (HNSW M=32 reached
      recall@10 0.34 at ``efSearch=256`` at 1M; IVF-4096 0.91 at ``nprobe=256``).
    """
    rng = np.random.default_rng(seed)
    latent, noise, iso, cap = DIFFICULTIES[difficulty]
    n_clusters = max(16, n // 100 if cap is None else min(n // 100, cap))
    centers = (rng.standard_normal((n_clusters, dim)) / np.sqrt(dim)).astype(np.float32)
    basis = (rng.standard_normal((latent, dim)) / np.sqrt(dim)).astype(np.float32)
    scales = (1.0 / np.sqrt(1.0 + np.arange(latent))).astype(np.float32)
    scales /= np.sqrt(scales @ scales)
    gap = rng.standard_normal(dim).astype(np.float32)
    gap *= 0.5 / np.linalg.norm(gap)
    labels = rng.integers(0, n_clusters, n)
    img = np.empty((n, dim), np.float32)
    txt = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        z = rng.standard_normal((e - s, latent)).astype(np.float32) * scales
        x = centers[labels[s:e]] + noise * (z @ basis)
        x += (iso / np.sqrt(dim)) * rng.standard_normal((e - s, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        img[s:e] = x
        t = x + gap + (0.6 / np.sqrt(dim)) * rng.standard_normal((e - s, dim)).astype(np.float32)
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        txt[s:e] = t
    return img, txt


def hardware() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": list(os.getloadavg()),
    }
    import faiss
    import polars

    info.update(numpy=np.__version__, faiss=faiss.__version__, polars=polars.__version__)
    info["faiss_omp_threads"] = faiss.omp_get_max_threads()
    return info


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def pct(lat: list[float]) -> dict[str, float]:
    a = np.asarray(lat) * 1e3
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p95_ms": float(np.percentile(a, 95)),
        "mean_ms": float(a.mean()),
    }


def run_one(n: int, dim: int, n_queries: int, k: int, ann: str | None, difficulty: str, sweep: bool) -> dict:
    import faiss

    from ccclip_widgets.neighbors import NeighborIndex

    out: dict[str, Any] = {"n": n, "dim": dim, "k": k, "queries": n_queries, "difficulty": difficulty}
    t = time.perf_counter()
    img, txt = synthetic_posts(n, dim, seed=0, difficulty=difficulty)
    out["generate_s"] = time.perf_counter() - t
    ids = [f"post{i:07d}" for i in range(n)]
    out["rss_after_data_mib"] = peak_rss_mib()

    rng = np.random.default_rng(1)
    queries = rng.choice(n, n_queries, replace=False)

    # Baseline: brute-force FAISS over the text vectors (what a click costs without our index).
    t = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(txt)
    out["flat_build_s"] = time.perf_counter() - t
    lat, exact = [], []
    for i in queries:
        t = time.perf_counter()
        _, ix = flat.search(img[i : i + 1], k)
        lat.append(time.perf_counter() - t)
        exact.append(ix[0])
    out["flat_latency"] = pct(lat)
    del flat

    kwargs: dict[str, Any] = {"show_progress": False}
    if ann:
        kwargs["ann"] = ann
    t = time.perf_counter()
    index = NeighborIndex.build(ids, img, txt, **kwargs)
    out["build_s"] = time.perf_counter() - t
    out["mode"] = index.mode
    out["params"] = index.params
    out["rss_after_build_mib"] = peak_rss_mib()
    del img, txt  # the index keeps what it needs

    index.image_to_texts(int(queries[0]), k=k)  # first call builds nothing lazily; warm the code path
    lat, hits, raw_lat = [], [], []
    for qi, i in enumerate(queries):
        t = time.perf_counter()
        frame = index.image_to_texts(int(i), k=k)
        lat.append(time.perf_counter() - t)
        hits.append(len(np.intersect1d(frame["index"].to_numpy(), exact[qi])) / k)
        q = index.vectors("image")[int(i)][None]
        t = time.perf_counter()
        index.search(q, target="text", k=k)
        raw_lat.append(time.perf_counter() - t)
    out["click_latency"] = pct(lat)
    out["search_latency"] = pct(raw_lat)
    out["recall_at_k_vs_flat"] = float(np.mean(hits))
    out["speedup_p95_vs_flat"] = out["flat_latency"]["p95_ms"] / out["click_latency"]["p95_ms"]
    if index.mode != "exact":
        out["recall_text_to_text"] = index.recall_at(k, 500, kind="text", seed=2)
        out["recall_image_to_text"] = index.recall_at(k, 500, kind="text", source="image", seed=2)
        if index.mode == "ivf":
            index.params["gap_shift"] = False
            out["recall_image_to_text_without_gap_shift"] = index.recall_at(
                k, 500, kind="text", source="image", seed=2
            )
            index.params["gap_shift"] = True

    if sweep and index.mode != "exact":
        curve = []
        knob = "nprobe" if index.mode == "ivf" else "ef_search"
        values = [16, 32, 64, 128, 256, 384] if knob == "nprobe" else [32, 64, 96, 128, 192, 256]
        for v in values:
            setattr(index, knob, v)
            lat, hits = [], []
            for qi, i in enumerate(queries):
                t = time.perf_counter()
                _, ix = index.search(index.vectors("image")[int(i)][None], target="text", k=k)
                lat.append(time.perf_counter() - t)
                hits.append(len(np.intersect1d(ix[0], exact[qi])) / k)
            curve.append({knob: v, "recall": float(np.mean(hits)), **pct(lat)})
            print(
                f"  {knob}={v}: recall {curve[-1]['recall']:.3f} p95 {curve[-1]['p95_ms']:.1f} ms", flush=True
            )
        out["sweep"] = curve
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument(
        "--ann", choices=["ivf", "hnsw"], default=None, help="approximate index (default: library's)"
    )
    p.add_argument(
        "--difficulty",
        nargs="+",
        choices=list(DIFFICULTIES),
        default=["topics", "spread"],
        help="synthetic data regimes to run (see synthetic_posts)",
    )
    p.add_argument("--sweep", action="store_true", help="also sweep nprobe / efSearch")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_neighbors.json")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker is not None:
        res = run_one(args.worker, args.dim, args.queries, args.k, args.ann, args.difficulty[0], args.sweep)
        print("RESULT " + json.dumps(res), flush=True)
        return

    results: dict[str, Any] = {
        "benchmark": "bench_neighbors",
        "hardware": hardware(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "runs": [],
    }
    for difficulty in args.difficulty:
        for n in args.n:
            cmd = [sys.executable, __file__, "--worker", str(n), "--dim", str(args.dim)]
            cmd += ["--queries", str(args.queries), "--k", str(args.k), "--difficulty", difficulty]
            if args.ann:
                cmd += ["--ann", args.ann]
            if args.sweep:
                cmd.append("--sweep")
            print(f"{difficulty} N={n} ...", flush=True)
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            sys.stdout.write(
                "".join(ln + "\n" for ln in proc.stdout.splitlines() if not ln.startswith("RESULT "))
            )
            if proc.returncode != 0 or not lines:
                print(proc.stderr[-3000:], file=sys.stderr)
                results["runs"].append({"n": n, "difficulty": difficulty, "error": proc.stderr[-2000:]})
                continue
            res = json.loads(lines[-1][len("RESULT ") :])
            res["wall_s"] = time.perf_counter() - t
            res["loadavg_after"] = list(os.getloadavg())
            results["runs"].append(res)
            print(
                f"{difficulty} N={n}: mode={res['mode']} build {res['build_s']:.1f}s | click p50/p95 "
                f"{res['click_latency']['p50_ms']:.2f}/{res['click_latency']['p95_ms']:.2f} ms | flat p50/p95 "
                f"{res['flat_latency']['p50_ms']:.2f}/{res['flat_latency']['p95_ms']:.2f} ms | recall@{args.k} "
                f"{res['recall_at_k_vs_flat']:.3f} | peak RSS {res['peak_rss_mib']:.0f} MiB | load "
                f"{res['loadavg_after'][0]:.1f}",
                flush=True,
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")  # partial results survive a crash
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results["hardware"]["loadavg_at_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
