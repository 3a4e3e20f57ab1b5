"""Download-and-embed throughput (posts/s): posts whose images are http URLs beside the same posts as local files.

What it measures, in one run, on generated data (N photo-like JPEGs of 160-400 px and short captions):

(a) local: ``read_posts`` on a table of local image paths + ``embed_posts`` into a fresh store;
(b) URL, cold cache: ``read_posts`` on the same table with every image as an ``http://`` URL served by a local
    ``ThreadingHTTPServer`` (HTTP/1.1 keep-alive, in its own process on the same machine), with an empty
    download cache, so every image is downloaded (``Fetcher`` defaults: 16 workers) + ``embed_posts``;
(c) URL, warm cache: (b) again on the largest size with the download cache of (b): no request is made, every
    cached body is re-hashed (checksum check) before use.

Each measurement runs in a fresh worker process (model load and imports not timed), at several sizes
(default 2,000, 5,000 and 10,000 posts), in ``--repeats`` interleaved rounds (default 3). It records the wall
time and CPU seconds of each phase (worker with its DataLoader workers, and the server process) and samples the
worker's resident memory every 50 ms (psutil, else /proc): peak RSS of the main process and of the main process
plus its DataLoader workers. The summary takes, per run, the fastest round of each phase (shared machines are
noisy; the embedding phase is the same work in every mode) and the highest memory peak of any round. Flat peaks
across sizes show that downloads stream to disk and nothing grows with N but the posts table and the vectors.

The model is the tiny open_clip configuration the tests register (``tests/conftest.py``: ViT, 32 px, 2 layers,
width 64, random weights), so decoding and downloading, not the forward pass, dominate: the worst case for the
download overhead. ``--model small`` uses a 64 px, 4-layer, width-192 ViT instead.

Results go to ``benchmarks/results/fetch_cpu.json`` (hardware, versions, every run) and a table is printed::

    python benchmarks/bench_fetch.py                      # 2k, 5k, 10k posts (a few minutes on 2 cores)
    python benchmarks/bench_fetch.py --sizes 500 --quick  # smoke check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from multiprocessing import get_context
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
for _p in (str(REPO), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODELS: dict[str, dict[str, Any]] = {
    # the configuration tests/conftest.py registers as "ccclip-test-tiny"
    "tiny": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "small": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 192, "head_width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4},
    },
}


# --------------------------------------------------------------------------------------------- data
def _write_photo(job: tuple[str, int, int, int]) -> int:
    from _bench_common import make_photo

    path, seed, width, height = job
    data = make_photo(seed, width=width, height=height, quality=85)
    Path(path).write_bytes(data)
    return len(data)


def generate_images(folder: Path, n: int, seed: int = 0) -> dict[str, Any]:
    """Write ``n`` JPEGs (160-400 px a side) and ``posts-<n>-<seed>.csv`` (post_id, image, text) into
    ``folder``, once (a later call with the same ``n`` and ``seed`` reuses them)."""
    import numpy as np
    import polars as pl
    from _bench_common import make_text

    marker = folder / f".complete-{n}-{seed}.json"
    if marker.exists():
        return json.loads(marker.read_text())
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = rng.integers(160, 401, (n, 2))
    names = [f"img_{i:06d}.jpg" for i in range(n)]
    jobs = [
        (str(folder / "images" / name), seed * 1_000_003 + i, int(w), int(h))
        for i, (name, (w, h)) in enumerate(zip(names, sizes))
    ]
    t0 = time.perf_counter()
    with get_context("fork").Pool(max(1, min(4, os.cpu_count() or 1))) as pool:
        nbytes = pool.map(_write_photo, jobs, chunksize=32)
    texts = [make_text(rng) for _ in range(n)]
    posts_csv = f"posts-{n}-{seed}.csv"
    pl.DataFrame({"post_id": [f"p{i:06d}" for i in range(n)], "image": names, "text": texts}).write_csv(
        folder / posts_csv
    )
    kb = np.asarray(nbytes) / 1024
    info = {
        "n": n,
        "posts_csv": posts_csv,
        "px_range": [160, 400],
        "jpeg_quality": 85,
        "jpeg_kb_mean": round(float(kb.mean()), 1),
        "jpeg_kb_p90": round(float(np.percentile(kb, 90)), 1),
        "total_mb": round(float(kb.sum()) / 1024, 1),
        "seconds_to_generate": round(time.perf_counter() - t0, 1),
    }
    marker.write_text(json.dumps(info))
    return info


# --------------------------------------------------------------------------------------------- server
def serve(directory: str, port_file: str) -> None:
    """Serve ``directory`` over HTTP/1.1 (keep-alive) on 127.0.0.1; write the port to ``port_file``."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Handler(SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # TCP_NODELAY, as production web servers and CDNs set it. Without it the headers and the body's last
        # segment wait on each other (Nagle + delayed ACK): a 40 ms stall per keep-alive request, which would
        # cap the download rate at workers / 40 ms whatever the client does.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128

    httpd = Server(("127.0.0.1", 0), partial(Handler, directory=directory))
    tmp = port_file + ".tmp"
    Path(tmp).write_text(str(httpd.server_address[1]))
    os.replace(tmp, port_file)
    httpd.serve_forever(poll_interval=0.2)


def start_server(directory: Path, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port_file = work / "port"
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(directory), "--port-file", str(port_file)]
    )
    for _ in range(300):
        if port_file.exists():
            return proc, f"http://127.0.0.1:{port_file.read_text().strip()}"
        if proc.poll() is not None:
            raise RuntimeError("the image server exited at start")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the image server did not start")


# --------------------------------------------------------------------------------------------- memory
class RssSampler:
    """Samples resident memory of this process (and with its children) every ``interval`` seconds."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_self = 0
        self.peak_tree = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        try:
            import psutil

            self._proc: Any = psutil.Process()
        except ImportError:  # pragma: no cover - psutil is installed with the dev extras
            self._proc = None

    def _rss(self) -> tuple[int, int]:
        if self._proc is not None:
            own = self._proc.memory_info().rss
            tree = own
            for child in self._proc.children(recursive=True):
                with contextlib.suppress(Exception):
                    tree += child.memory_info().rss
            return own, tree
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        own = pages * os.sysconf("SC_PAGE_SIZE")
        return own, own

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                own, tree = self._rss()
                self.peak_self = max(self.peak_self, own)
                self.peak_tree = max(self.peak_tree, tree)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------- one run
def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process: read_posts (+ downloads) then embed_posts."""
    import warnings

    import torch

    from ccclip_widgets.embed import embed_posts
    from ccclip_widgets.fetch import Fetcher
    from ccclip_widgets.models import load_model, register_model_config
    from ccclip_widgets.posts import read_posts

    torch.manual_seed(0)
    torch.set_num_threads(spec["torch_threads"])
    arch = register_model_config(f"ccclip-bench-{spec['model']}", MODELS[spec["model"]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = load_model(f"{arch}:random", device="cpu", allow_random=True)
    fetcher = Fetcher(cache=spec["download_cache"]) if spec["mode"] != "local" else None
    load_before = os.getloadavg()[0]
    with RssSampler() as rss:
        t0, c0 = time.perf_counter(), _cpu_seconds()
        posts = read_posts(spec["csv"], spec.get("image_root"), fetcher=fetcher, show_progress=False)
        t1, c1 = time.perf_counter(), _cpu_seconds()
        emb = embed_posts(posts, model, store=spec["store"], show_progress=False)
        t2, c2 = time.perf_counter(), _cpu_seconds()
    if fetcher is not None:
        fetcher.close()
    n = spec["n"]
    return {
        "mode": spec["mode"],
        "n": n,
        "valid": len(posts),
        "rejected": posts.n_rejected,
        "embedded": len(emb),
        "read_posts_s": round(t1 - t0, 2),
        "embed_s": round(t2 - t1, 2),
        "total_s": round(t2 - t0, 2),
        "posts_per_s": round(n / (t2 - t0), 1),
        "read_posts_per_s": round(n / (t1 - t0), 1),
        "read_posts_cpu_s": round(c1 - c0, 2),
        "embed_cpu_s": round(c2 - c1, 2),
        "load_average_1min_before": round(load_before, 2),
        "peak_rss_mb": round(rss.peak_self / 2**20, 1),
        "peak_rss_with_workers_mb": round(rss.peak_tree / 2**20, 1),
        "downloads": dict(fetcher.stats) if fetcher is not None else None,
        "embed_stats": {k: emb.stats[k] for k in ("images_encoded", "images_failed", "texts_encoded")},
    }


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process plus its finished children (DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _process_cpu(pid: int) -> float:
    """CPU seconds used so far by another process (the image server), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def run_worker(spec: dict[str, Any], work: Path, server_pid: int) -> dict[str, Any]:
    out = work / f"result-{spec['mode']}-{spec['n']}-{spec['repeat']}.json"
    before = _process_cpu(server_pid)
    subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec), "--result", str(out)], check=True, cwd=REPO
    )
    result = json.loads(out.read_text())
    result["repeat"] = spec["repeat"]
    result["server_cpu_s"] = round(_process_cpu(server_pid) - before, 2)
    return result


def best_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (mode, n), in first-seen order: the fastest round of each phase (read_posts, embed_posts) and
    their sum, and the highest memory peak of any round (time: best case; memory: worst case)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["mode"], r["n"]), []).append(r)
    out = []
    for (mode, n), rounds in groups.items():
        read = min(rounds, key=lambda r: r["read_posts_s"])
        embed = min(rounds, key=lambda r: r["embed_s"])
        total = read["read_posts_s"] + embed["embed_s"]
        out.append(
            {
                "mode": mode,
                "n": n,
                "rounds": len(rounds),
                "read_posts_s": read["read_posts_s"],
                "read_posts_cpu_s": read["read_posts_cpu_s"],
                "server_cpu_s": read.get("server_cpu_s", 0.0),
                "embed_s": embed["embed_s"],
                "embed_cpu_s": embed["embed_cpu_s"],
                "total_s": round(total, 2),
                "posts_per_s": round(n / total, 1),
                "read_posts_per_s": round(n / read["read_posts_s"], 1),
                "embed_s_all_rounds": [r["embed_s"] for r in rounds],
                "peak_rss_mb": max(r["peak_rss_mb"] for r in rounds),
                "peak_rss_with_workers_mb": max(r["peak_rss_with_workers_mb"] for r in rounds),
                "rejected": max(r["rejected"] for r in rounds),
                "embedded": min(r["embedded"] for r in rounds),
            }
        )
    return out


# --------------------------------------------------------------------------------------------- report
def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| posts | mode | posts/s (read + embed) | read_posts s (CPU s, server CPU s) | embed s (CPU s) "
        "| peak RSS MB | with workers MB |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        server = r.get("server_cpu_s", 0.0) if r["mode"] != "local" else 0.0
        lines.append(
            f"| {r['n']:,} | {r['mode']} | {r['posts_per_s']:.0f} | {r['read_posts_s']:.1f} "
            f"({r['read_posts_cpu_s']:.1f}, {server:.1f}) | {r['embed_s']:.1f} ({r['embed_cpu_s']:.1f}) "
            f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_with_workers_mb']:.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 10000], help="posts per run")
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--data-dir", default=None, help="keep and reuse the generated images here")
    p.add_argument("--out", default=str(HERE / "results" / "fetch_cpu.json"))
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds of every run; the fastest round of each phase is reported",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads in the worker (default 1: with one DataLoader worker that fills 2 cores, and "
        "idle threads do not spin against other load)",
    )
    p.add_argument("--quick", action="store_true", help="smoke check: one round, no warm-cache run")
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    p.add_argument("--port-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.serve:
        serve(args.serve, args.port_file)
        return None
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(json.loads(args.worker))))
        return None

    import polars as pl
    from _bench_common import system_info

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up (stop the server) on kill
    sizes = sorted(set(args.sizes))
    n_max = sizes[-1]
    with tempfile.TemporaryDirectory(prefix="bench_fetch_") as tmp_name:
        tmp = Path(tmp_name)
        data = Path(args.data_dir) if args.data_dir else tmp / "data"
        print(f"generating {n_max} JPEGs in {data} ...", flush=True)
        images = generate_images(data, n_max)
        server, base = start_server(data / "images", tmp)
        runs: list[dict[str, Any]] = []
        repeats = 1 if args.quick else max(1, args.repeats)
        try:
            posts = pl.read_csv(data / images["posts_csv"])
            specs: list[dict[str, Any]] = []
            for n in sizes:
                part = posts.head(n)
                local_csv = tmp / f"local_{n}.csv"
                part.write_csv(local_csv)
                url_csv = tmp / f"url_{n}.csv"
                part.with_columns((pl.lit(base + "/") + pl.col("image")).alias("image")).write_csv(url_csv)
                for mode, csv in (("local", local_csv), ("url-cold", url_csv)):
                    specs.append({"mode": mode, "n": n, "csv": str(csv)})
            if not args.quick:
                specs.append({"mode": "url-warm", "n": n_max, "csv": str(tmp / f"url_{n_max}.csv")})
            for repeat in range(repeats):  # rounds interleave the modes, so a noisy minute hits all of them
                for spec in specs:
                    mode, n = spec["mode"], spec["n"]
                    cache = f"downloads-{n}-{repeat}"
                    full = {
                        **spec,
                        "repeat": repeat,
                        "model": args.model,
                        "torch_threads": args.torch_threads,
                        "store": str(tmp / f"store-{mode}-{n}-{repeat}"),
                        "download_cache": str(tmp / cache),  # url-warm reuses this round's url-cold cache
                        "image_root": str(data / "images") if mode == "local" else None,
                    }
                    print(f"round {repeat + 1}/{repeats}: {mode}, {n} posts ...", flush=True)
                    runs.append(run_worker(full, tmp, server.pid))
                    print(table(runs[-1:]).splitlines()[-1], flush=True)
        finally:
            server.terminate()
            server.wait(10)
    report = {
        "benchmark": "bench_fetch",
        "what": "read_posts + embed_posts throughput, image URLs (local HTTP server) vs local files",
        "model": {
            "name": args.model,
            "config": MODELS[args.model],
            "weights": "random",
            "device": "cpu",
            "torch_threads": args.torch_threads,
        },
        "server": "http.server.ThreadingHTTPServer + SimpleHTTPRequestHandler, HTTP/1.1 keep-alive, "
        "separate process on the same machine (it shares the CPU with the client)",
        "fetcher": "ccclip_widgets.fetch.Fetcher defaults (16 workers, checksum-verified cache)",
        "images": images,
        "system": system_info("cpu"),
        "repeats": repeats,
        "best": best_runs(runs),
        "runs": runs,
        "command": "python benchmarks/bench_fetch.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    for r in runs:
        if r["rejected"] or r["embedded"] != r["n"]:  # every round of every run must keep every post
            print(f"WARNING: {r['mode']} at {r['n']}: {r['rejected']} rejected, {r['embedded']} embedded")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(best_runs(runs)))
    print(f"\nresults: {out}")
    return report


if __name__ == "__main__":
    main()
