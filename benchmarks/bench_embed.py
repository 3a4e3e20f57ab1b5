"""End-to-end embedding throughput (posts/s) beside a naive loop and the forward-only ceiling, in one run.

What it measures, on generated data (N JPEGs of 400 x 300 px, quality 90, plus a posts CSV of short
social-media texts) with ViT-B-32 at 224 px and random weights:

(a) naive loop: PIL open + open_clip preprocess in the main process, fp32, image and text forward one batch at a
    time, no workers;
(b) ``embed_posts`` end to end (fresh store each run), once per ``--decode`` choice;
(c) forward-only ceiling: pixels already on the device and texts already tokenized, image + text forward in the
    model's precision (bf16 autocast on GPU);
(d) decode + preprocess only (no model), per decode choice;
(e) image forward only and text forward only;
(f) text preparation only (tokenize; count truncated texts), serial.

During (b)-(e) on GPU it samples ``nvidia-smi`` every 200 ms (utilisation mean and p90, memory used).
Results go to ``benchmarks/results/embed_<host-kind>.json`` and a markdown table is printed.

Needs only ccclip_widgets (from this checkout, no install needed) and its runtime imports: torch, torchvision,
numpy, pillow, polars, open_clip_torch (with ftfy, wcwidth, regex, tqdm). Examples::

    python benchmarks/bench_embed.py --quick                  # smoke check (32 posts)
    python benchmarks/bench_embed.py --n 256                  # 2-core CPU figures
    python benchmarks/bench_embed.py                          # GPU: 8192 posts, decode gpu and cpu
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from multiprocessing import get_context
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):  # ccclip_widgets from this checkout; the sibling _bench_common
    if _p not in sys.path:
        sys.path.insert(0, _p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _bench_common import (  # noqa: E402 - after the sys.path set-up above
    GpuSampler,
    gpu_index,
    host_kind,
    make_photo,
    make_text,
    system_info,
    usable_cores,
)
from _embed_report import markdown  # noqa: E402

REQUIRED = ("numpy", "PIL", "torch", "torchvision", "polars", "ftfy", "regex", "tqdm", "open_clip")


# --------------------------------------------------------------------------------------------- helpers
def preflight() -> None:
    """Fail early, with the list of what to install, when a runtime import is missing."""
    missing = []
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, or a broken install
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
    if missing:
        sys.exit("bench_embed.py: missing runtime modules: " + "; ".join(missing))


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _rate(items: int, seconds: float) -> float:
    return round(items / seconds, 1) if seconds > 0 else float("nan")


def _rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of its largest waited-for child (DataLoader workers)."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"self_peak_mb": round(self_kb / 1024, 1), "largest_child_peak_mb": round(child_kb / 1024, 1)}


@contextlib.contextmanager
def measured(device: Any, sample_gpu: bool = False) -> Iterator[dict[str, Any]]:
    """Time a block (device synchronised), with peak GPU memory and optional nvidia-smi sampling."""
    import torch

    rec: dict[str, Any] = {}
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    sampler = GpuSampler(gpu_index(device) if (cuda and sample_gpu) else None)
    with sampler.active():
        t0 = time.perf_counter()
        yield rec
        _sync(device)
        rec["seconds"] = round(time.perf_counter() - t0, 4)
    if cuda:
        rec["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    gpu = sampler.utilisation()
    if gpu is not None:
        rec["gpu"] = gpu


# --------------------------------------------------------------------------------------------- data
def _write_photo(job: tuple[str, int]) -> int:
    path, seed = job
    data = make_photo(seed)
    Path(path).write_bytes(data)
    return len(data)


def generate_dataset(folder: Path, n: int, seed: int, processes: int) -> dict[str, Any]:
    """Write ``n`` JPEGs and ``posts.csv`` (post_id, image, text, caption_kind, lang) into ``folder``."""
    import numpy as np
    import polars as pl

    folder.mkdir(parents=True, exist_ok=True)
    names = [f"img_{i:06d}.jpg" for i in range(n)]
    jobs = [(str(folder / name), seed * 1_000_003 + i) for i, name in enumerate(names)]
    t0 = time.perf_counter()
    if processes > 1 and n >= 64:
        with get_context("fork").Pool(processes) as pool:
            sizes = pool.map(_write_photo, jobs, chunksize=16)
    else:
        sizes = [_write_photo(j) for j in jobs]
    rng = np.random.default_rng(seed)
    texts = [make_text(rng) for _ in range(n)]
    pl.DataFrame(
        {
            "post_id": [f"p{i:06d}" for i in range(n)],
            "image": names,
            "text": texts,
            "caption_kind": ["commentative"] * n,
            "lang": ["en"] * n,
        }
    ).write_csv(folder / "posts.csv")
    kb = np.array(sizes) / 1024
    return {
        "n": n,
        "seconds": round(time.perf_counter() - t0, 2),
        "jpeg_kb_mean": round(float(kb.mean()), 1),
        "jpeg_kb_p10": round(float(np.percentile(kb, 10)), 1),
        "jpeg_kb_p90": round(float(np.percentile(kb, 90)), 1),
        "text_words_mean": round(float(np.mean([len(t.split()) for t in texts])), 1),
    }


# --------------------------------------------------------------------------------------------- measurements
def _normalise(feats: Any) -> Any:
    import torch.nn.functional as F

    return F.normalize(feats.float(), dim=-1)


def bench_naive(model: Any, paths: Sequence[str], texts: Sequence[str], batch_size: int) -> dict[str, Any]:
    """(a) PIL open + preprocess in the main process, fp32 forward of images and texts, one batch at a time."""
    import torch
    from PIL import Image

    device = model.device
    n = len(paths)
    with torch.no_grad(), measured(device) as rec:
        for start in range(0, n, batch_size):
            pixels = []
            for p in paths[start : start + batch_size]:
                with Image.open(p) as im:
                    pixels.append(model.preprocess(im.convert("RGB")))
            x = torch.stack(pixels).to(device)
            tokens = model.tokenize(list(texts[start : start + batch_size])).to(device)
            _normalise(model.model.encode_image(x)).cpu()
            _normalise(model.model.encode_text(tokens)).cpu()
    rec.update(posts=n, throughput=_rate(n, rec["seconds"]), unit="posts/s", batch_size=batch_size)
    return rec


def make_pool(model: Any, paths: Sequence[str], batch_size: int, pool_size: int) -> Any:
    """Pre-decoded pixels on the device: a whole number of batches of distinct images (cycled by the loops)."""
    import torch

    from ccclip_widgets.images import load_image

    count = max(1, min(len(paths), pool_size) // batch_size) * batch_size
    count = min(count, len(paths))
    pixels = torch.stack(
        [model.preprocess(load_image(p, target_size=model.image_size)) for p in paths[:count]]
    )
    pixels = pixels.to(model.device)
    if model.device.type == "cuda":
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    return pixels


def bench_forward(
    model: Any,
    pool: Any,
    tokens: Any,
    n: int,
    batch_size: int,
    *,
    images: bool,
    texts: bool,
    sample_gpu: bool,
) -> dict[str, Any]:
    """(c)/(e) forward passes over pre-made device tensors, in the model's precision; vectors stay on device."""
    import torch

    device = model.device
    pool_batches = max(1, pool.shape[0] // batch_size)
    bs = min(batch_size, pool.shape[0])
    out_i = torch.empty((n, model.embed_dim), device=device) if images else None
    out_t = torch.empty((n, model.embed_dim), device=device) if texts else None

    def run(count: int) -> None:
        for k, start in enumerate(range(0, count, bs)):
            stop = min(start + bs, count)
            if images:
                b = k % pool_batches
                x = pool[b * bs : b * bs + (stop - start)]
                with model.autocast():
                    out_i[start:stop] = _normalise(model.model.encode_image(x))
            if texts:
                with model.autocast():
                    out_t[start:stop] = _normalise(model.model.encode_text(tokens[start:stop]))

    with torch.no_grad():
        run(min(n, (2 if device.type == "cuda" else 1) * bs))  # warm-up (kernel selection, allocator)
        with measured(device, sample_gpu) as rec:
            run(n)
    rec.update(items=n, throughput=_rate(n, rec["seconds"]), batch_size=bs, precision=model.precision)
    return rec


def bench_decode(
    model: Any, paths: Sequence[str], mode: str, batch_size: int, workers: int
) -> dict[str, Any]:
    """(d) decode + preprocess only, pixels delivered on the model's device.

    Besides the overall rate it records the time to the first batch (worker start-up, which grows with the
    parent's memory because of fork) and the steady rate after it.
    """
    from torch.utils.data import DataLoader

    from ccclip_widgets.embed import _collate, _ImageDataset
    from ccclip_widgets.gpu_decode import iter_decoded_batches

    device = model.device
    n = 0
    failed = 0
    first: tuple[float, int] | None = None
    with measured(device, sample_gpu=True) as rec:
        t0 = time.perf_counter()
        if mode == "gpu":
            batches: Any = iter_decoded_batches(model, paths, batch_size=batch_size, num_workers=workers)
        else:
            batches = DataLoader(
                _ImageDataset(list(paths), model.preprocess, model.image_size),
                batch_size=batch_size,
                num_workers=workers,
                collate_fn=_collate,
                pin_memory=device.type == "cuda",
                prefetch_factor=4 if workers else None,
            )
        for _, pixels, errors in batches:
            pixels = pixels.to(device, non_blocking=True)
            n += pixels.shape[0]
            failed += sum(1 for e in errors if e)
            if first is None:
                _sync(device)
                first = (time.perf_counter() - t0, n)
    rec.update(images=n, failed=failed, throughput=_rate(n, rec["seconds"]), unit="img/s", workers=workers)
    if first is not None:
        rec["first_batch_s"] = round(first[0], 3)
        rec["steady_img_per_s"] = _rate(n - first[1], rec["seconds"] - first[0]) if n > first[1] else None
    return rec


def bench_decode_in_memory(
    model: Any, paths: Sequence[str], batch_size: int, limit: int, decode_batches: Sequence[int]
) -> dict[str, Any]:
    """(d0) the decoder alone and (d1) decode_and_preprocess alone, on encoded bytes already in memory.

    No workers, no files, no thread: compared with (d) it tells whether the decoder itself or the pipeline
    around it (workers, IPC, the decoding thread) sets the pace.
    """
    import torch

    from ccclip_widgets.decode_device import _torchvision_io
    from ccclip_widgets.gpu_decode import decode_and_preprocess

    device = model.device
    tvio = _torchvision_io()
    data = [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p in paths[:limit]]
    n = len(data)
    out: dict[str, Any] = {"images": n}
    for b in decode_batches:
        tvio.decode_jpeg(data[:b], mode=tvio.ImageReadMode.RGB, device=device)  # warm-up (decoder init)
        with measured(device) as rec:
            for s in range(0, n, b):
                tvio.decode_jpeg(data[s : s + b], mode=tvio.ImageReadMode.RGB, device=device)
        out[f"decode_only_batch_{b}_img_per_s"] = _rate(n, rec["seconds"])
    cfg, size = model.preprocess_cfg, model.image_size
    decode_and_preprocess(data[:batch_size], device, cfg, size, orientations=[1] * min(n, batch_size))
    with measured(device, sample_gpu=True) as rec:
        for s in range(0, n, batch_size):
            chunk = data[s : s + batch_size]
            decode_and_preprocess(chunk, device, cfg, size, orientations=[1] * len(chunk))
    rec.update(out, throughput=_rate(n, rec["seconds"]), unit="img/s", batch_size=batch_size)
    return rec


def _keep_best(results: dict[str, Any], path: tuple[str, ...], rec: dict[str, Any]) -> None:
    """Store ``rec`` at ``results[path]`` if its throughput beats what is there; keep every run's figure."""
    parent = results
    for key in path[:-1]:
        parent = parent.setdefault(key, {})
    old = parent.get(path[-1])
    runs = ([*old.get("all_runs", [])] if old else []) + [rec["throughput"]]
    if old is None or rec["throughput"] > old["throughput"]:
        parent[path[-1]] = rec
    parent[path[-1]]["all_runs"] = runs


def embed_supports_decode() -> bool:
    from ccclip_widgets.embed import embed_posts

    return "decode" in inspect.signature(embed_posts).parameters


def bench_embed_posts(
    posts: Any,
    model: Any,
    store: Path,
    mode: str | None,
    batch_size: int,
    workers: int | None,
    sample_gpu: bool = True,
) -> dict[str, Any]:
    """(b) ``embed_posts`` end to end into a fresh store."""
    from ccclip_widgets.embed import embed_posts

    kwargs: dict[str, Any] = {
        "store": store,
        "batch_size": batch_size,
        "text_batch_size": batch_size,
        "num_workers": workers,
        "show_progress": False,
    }
    if mode is not None:
        kwargs["decode"] = mode
    with measured(model.device, sample_gpu) as rec:
        emb = embed_posts(posts, model, **kwargs)
    n = len(posts)
    if len(emb) != n or len(emb.rejects):
        raise RuntimeError(f"embed_posts embedded {len(emb)} of {n} posts ({len(emb.rejects)} rejects)")
    rec.update(posts=n, throughput=_rate(n, rec["seconds"]), unit="posts/s", stats=emb.stats)
    return rec


def bench_text_prep(model: Any, texts: Sequence[str]) -> dict[str, Any]:
    """(f) serial tokenization and truncation counting: the CPU cost per text that embed_posts pays."""
    model.tokenize(list(texts[:2048]))  # warm-up: fills the tokenizer's BPE cache for every variant alike
    t0 = time.perf_counter()
    model.tokenize(list(texts))
    tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.count_truncated(list(texts))
    cnt = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.tokenize_counting(list(texts))
    both = time.perf_counter() - t0
    n = len(texts)
    return {
        "texts": n,
        "tokenize_texts_per_s": _rate(n, tok),
        "count_truncated_texts_per_s": _rate(n, cnt),
        "tokenize_counting_one_pass_texts_per_s": _rate(n, both),
    }


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8192, help="posts (images + texts) to generate and embed")
    p.add_argument("--quick", action="store_true", help="smoke check: 32 posts, batch 8")
    p.add_argument("--batch-size", type=int, default=None, help="images/texts per forward (512 GPU, 32 CPU)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers for (b) and (d) (default: embed_posts chooses; (d) uses default_num_workers)",
    )
    p.add_argument(
        "--decode",
        nargs="+",
        choices=("gpu", "cpu", "auto"),
        default=["gpu", "cpu"],
        help="decode modes for (b) and (d): gpu = batched decode on the model's device (libjpeg-turbo in the "
        "main process on a CPU machine), cpu = PIL in DataLoader workers",
    )
    p.add_argument(
        "--decode-workers",
        type=int,
        nargs="*",
        default=[],
        help="extra (d) runs of the gpu pipeline with these worker counts (e.g. 2 4 8)",
    )
    p.add_argument("--repeats", type=int, default=1, help="rounds of every measurement (best of each kept)")
    p.add_argument("--naive-n", type=int, default=2048, help="posts for the naive loop (slow; at most --n)")
    p.add_argument("--pool", type=int, default=1024, help="distinct pre-decoded images cycled by (c)/(e)")
    p.add_argument("--model", default="ViT-B-32:random", help="model spec (random weights by default)")
    p.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")
    p.add_argument("--data-dir", type=Path, default=None, help="reuse/keep generated data here")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/embed_<kind>.json)"
    )
    p.add_argument("--host-kind", default=None, help="label for the results file (default from the hardware)")
    p.add_argument(
        "--skip", nargs="*", default=[], choices=("naive", "ceiling", "decode", "forward", "embed")
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.n = min(args.n, 32)
        args.naive_n = min(args.naive_n, 32)
        args.pool = min(args.pool, 32)
        args.batch_size = args.batch_size or 8
    return args


def prepare_data(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    """Generate the posts (or reuse them from ``--data-dir``); runs before torch starts threads or CUDA."""
    existing = sorted(data_dir.glob("img_*.jpg")) if data_dir.exists() else []
    if (data_dir / "posts.csv").exists() and len(existing) == args.n:
        return {"n": args.n, "reused": str(data_dir)}
    return generate_dataset(data_dir, args.n, args.seed, usable_cores())


def run(args: argparse.Namespace, tmp: Path, data_dir: Path, gen: dict[str, Any]) -> dict[str, Any]:
    """Load the model and posts, run every measurement; return the report."""
    import torch

    from ccclip_widgets.embed import default_num_workers
    from ccclip_widgets.gpu_decode import use_device_decode
    from ccclip_widgets.models import load_model
    from ccclip_widgets.posts import read_posts

    t0 = time.perf_counter()
    model = load_model(args.model, device=args.device, allow_random=True)
    load_s = time.perf_counter() - t0
    device = model.device
    _ = model.fingerprint  # hashed once here, not inside the timed runs
    bs = args.batch_size or (512 if device.type == "cuda" else 32)
    args.batch_size = bs
    info = system_info(device)
    kind = args.host_kind or host_kind(info)
    print(
        f"# bench_embed: {info.get('gpu_name') or 'CPU'} ({kind}), model {args.model} on {device}, batch {bs}"
    )
    report: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "host_kind": kind,
    }
    results: dict[str, Any] = {}

    t0 = time.perf_counter()
    posts = read_posts(data_dir / "posts.csv", image_root=data_dir)
    read_s = time.perf_counter() - t0
    if len(posts) != args.n:
        raise RuntimeError(f"read_posts kept {len(posts)} of {args.n} posts: {posts.rejects}")
    paths = posts.table["image_path"].to_list()
    texts = posts.table["text"].to_list()
    workers = args.workers if args.workers is not None else default_num_workers(device, len(paths))
    modes: list[str] = []
    for m in args.decode:
        resolved = "gpu" if use_device_decode(m, device) else "cpu"
        if resolved not in modes:
            modes.append(resolved)
    report["setup"] = {
        "model_load_s": round(load_s, 2),
        "read_posts_s": round(read_s, 2),
        "data": gen,
        "workers": workers,
    }

    results["text_prep"] = bench_text_prep(model, texts)
    has_decode = embed_supports_decode()
    warm_n = min(args.n, (2 if device.type == "cuda" else 1) * bs)
    warm = dataclasses.replace(posts, table=posts.table.head(warm_n))
    warmed: set[str] = set()
    # Every measurement runs once per round, rounds repeated --repeats times, the best of each kept: on a
    # shared machine a load spike then hits one round of everything rather than one row of the table.
    for rnd in range(max(1, args.repeats)):
        tag = f" (round {rnd + 1})" if args.repeats > 1 else ""
        if "forward" not in args.skip or "ceiling" not in args.skip:
            pool = make_pool(model, paths, bs, args.pool)
            tokens = model.tokenize(texts).to(device)
            if "ceiling" not in args.skip:
                rec = bench_forward(model, pool, tokens, args.n, bs, images=True, texts=True, sample_gpu=True)
                rec["unit"] = "posts/s"
                _keep_best(results, ("ceiling",), rec)
                print(f"# (c) ceiling{tag}: {rec['throughput']} posts/s")
            if "forward" not in args.skip:
                rec_i = bench_forward(
                    model, pool, tokens, args.n, bs, images=True, texts=False, sample_gpu=True
                )
                rec_t = bench_forward(
                    model, pool, tokens, args.n, bs, images=False, texts=True, sample_gpu=True
                )
                rec_i["unit"], rec_t["unit"] = "img/s", "texts/s"
                _keep_best(results, ("image_forward",), rec_i)
                _keep_best(results, ("text_forward",), rec_t)
                print(
                    f"# (e) image forward{tag} {rec_i['throughput']} img/s, text {rec_t['throughput']} texts/s"
                )
            del pool, tokens
            if device.type == "cuda":
                torch.cuda.empty_cache()

        if "decode" not in args.skip:
            if "gpu" in modes:
                rec = bench_decode_in_memory(model, paths, bs, min(args.n, 4096), sorted({128, 256, bs}))
                _keep_best(results, ("decode_in_memory",), rec)
                print(f"# (d0/d1) decoder alone, bytes in memory{tag}: {rec}")
            runs_d = [(mode, workers, mode) for mode in modes]
            runs_d += [("gpu", w, f"gpu, {w} workers") for w in args.decode_workers if "gpu" in modes]
            for mode, w, label in runs_d:
                rec = bench_decode(model, paths, mode, bs, w)
                _keep_best(results, ("decode_only", label), rec)
                print(
                    f"# (d) decode only, {label}{tag}: {rec['throughput']} img/s (first batch after "
                    f"{rec.get('first_batch_s')} s, then {rec.get('steady_img_per_s')} img/s)"
                )

        if "embed" not in args.skip:
            for mode in modes:
                if not has_decode and mode == "gpu":
                    results.setdefault("embed_posts", {})[mode] = {
                        "skipped": "embed_posts has no decode parameter yet (apply the gpu_decode integration)"
                    }
                    print("# (b) decode=gpu skipped: embed_posts has no decode parameter")
                    continue
                kw_mode = mode if has_decode else None
                # embed_posts picks its own worker counts unless --workers was given
                if mode not in warmed:
                    bench_embed_posts(
                        warm, model, tmp / f"warm-{mode}", kw_mode, bs, args.workers, sample_gpu=False
                    )
                    warmed.add(mode)
                rec = bench_embed_posts(posts, model, tmp / f"store-{mode}-{rnd}", kw_mode, bs, args.workers)
                rec["workers"] = args.workers if args.workers is not None else "embed_posts default"
                rec["embed_posts_has_decode"] = has_decode
                _keep_best(results, ("embed_posts", mode), rec)
                print(f"# (b) embed_posts decode={mode}{tag}: {rec['throughput']} posts/s")

        if "naive" not in args.skip:
            k = min(args.naive_n, args.n)
            if rnd == 0:
                bench_naive(model, paths[: min(k, bs)], texts[: min(k, bs)], bs)  # warm-up
            rec = bench_naive(model, paths[:k], texts[:k], bs)
            _keep_best(results, ("naive",), rec)
            print(f"# (a) naive{tag}: {rec['throughput']} posts/s")

    ratios: dict[str, Any] = {}
    ceiling = results.get("ceiling", {}).get("throughput")
    naive = results.get("naive", {}).get("throughput")
    for label, rec in results.get("embed_posts", {}).items():
        if "throughput" in rec and ceiling and naive:
            ratios[label] = {
                "of_ceiling": round(rec["throughput"] / ceiling, 3),
                "x_naive": round(rec["throughput"] / naive, 2),
            }
    info["rss"] = _rss_mb()
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report.update(meta=info, results=results, ratios=ratios)
    headline = "gpu" if use_device_decode("auto", device) else "cpu"
    if device.type == "cuda" and headline in ratios:
        r = ratios[headline]
        report["gpu_target"] = {
            "decode": headline,
            "of_ceiling": r["of_ceiling"],
            "x_naive": r["x_naive"],
            "met": r["of_ceiling"] >= 0.8 and r["x_naive"] >= 3.0,
        }
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; write the JSON and print the table."""
    args = parse_args(argv)
    preflight()
    warnings.filterwarnings("ignore", message="No pretrained weights loaded")
    logging.getLogger().setLevel(logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="ccclip-bench-"))
    data_dir = args.data_dir or tmp / "data"
    try:
        gen = prepare_data(args, data_dir)  # first: it forks processes, before torch starts threads or CUDA
        print(f"# data: {gen}")
        report = run(args, tmp, data_dir, gen)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # stores, and the generated data unless --data-dir was given
    out = args.out or REPO / "benchmarks" / "results" / f"embed_{report['host_kind']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print()
    print(markdown(report))
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
