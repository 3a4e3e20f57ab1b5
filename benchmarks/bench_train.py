"""Fine-tuning throughput (pairs/s) and peak GPU memory, beside open_clip's own trainer, in one run.

What it measures with ViT-B-32 at 224 px, random weights, AdamW, batch 256, bf16 autocast (on a GPU):

(a) ``step_only``: the training step of :func:`ccclip_widgets.train.fine_tune` (both towers, ClipLoss, backward,
    gradient clipping, fused AdamW, temperature clamp, a loss read-back every ``--read-every`` steps) on tensors
    already on the GPU;
(b) ``fine_tune_synthetic``: ``fine_tune`` end to end on N distinct in-memory PNG images (solid colors, 224 px)
    with distinct texts: the DataLoader path on data as cheap as open_clip's synthetic set;
(c) ``fine_tune_jpeg``: ``fine_tune`` end to end on N JPEGs of 400 x 300 px (quality 90) on disk, with the
    default mild augmentation: what real posts cost;
(d) ``open_clip_train``: ``python -m open_clip_train.main --dataset-type csv`` on a csv of **the same JPEG files**
    as (c), with the same model, batch, precision, worker count and number of steps, logging (and so reading its
    loss back) every ``--read-every`` steps as ours does. Its log file alone is parsed (not also its stdout,
    where the same lines appear): each line holds the mean step time since the previous one.

Throughput is pairs per second over the steps after the first ``--warmup`` (both trainers; open_clip_train's
window starts at its first log line at or after that step). Peak memory: ``torch.cuda.max_memory_allocated`` for
(a)-(c) in this process; for (d), which runs in its own process, that process's own ``used_memory`` from
``nvidia-smi --query-compute-apps`` filtered by its PID (never the whole device's memory, which counts this
process too). GPU utilisation is the mean of ``nvidia-smi`` samples every 200 ms while each row ran; failed
reads are counted in ``sampler_errors``.

``--cpu-demo`` measures (b) and (c) on this machine's CPU for a demo-size model (the ``demo`` model if it loads,
else a ResNet-18 image tower at 64 px with a 6-layer MiniLM-size text tower), fp32. ``--quick`` is a fast CPU
smoke run of every path except (d).

(d) needs open_clip_train's own imports beyond open_clip: ``braceexpand`` and ``webdataset`` (pip wheels). Use
``--ablation`` for (a) with parts of the step switched off, ``--data-only`` for the DataLoader alone (its
ceiling), ``--variants`` for fp32/fp16/gradient checkpointing/compile/locked text/LoRA runs of (b), and
``--check-resume`` for a stop-and-resume versus uninterrupted comparison on the device.

Results go to ``benchmarks/results/train_<kind>.json`` (kind: ``gpu``, ``cpu-demo`` or ``quick``) and a
markdown table is printed. Examples::

    python benchmarks/bench_train.py                       # GPU: (a)-(d)
    python benchmarks/bench_train.py --skip-open-clip      # GPU: (a)-(c)
    python benchmarks/bench_train.py --cpu-demo            # this CPU, demo-size model
    python benchmarks/bench_train.py --quick               # smoke check anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):  # ccclip_widgets from this checkout; the sibling modules below
    if _p not in sys.path:
        sys.path.insert(0, _p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _bench_common import GpuSampler, usable_cores  # noqa: E402 - after the sys.path set-up above
from _open_clip_train import bench_open_clip_train  # noqa: E402
from _train_inputs import cpu_demo_spec, jpeg_posts, load_clip, quick_spec, synthetic_posts  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


# ----------------------------------------------------------------------------------------------- helpers
def hardware() -> dict[str, Any]:
    """Machine description for the results file."""
    import torch

    hw: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
    }
    try:
        import open_clip

        hw["open_clip"] = open_clip.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(0)
        hw["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return hw


# ----------------------------------------------------------------------------------------------- (a)
def bench_step_only(
    clip: Any,
    batch: int,
    steps: int,
    warmup: int,
    precision: str,
    compile_model: bool,
    *,
    channels_last: bool = True,
    sync_every_step: bool = True,
    grad_clip: bool = True,
    masks: bool = True,
    fused: bool = True,
    read_every: int = 10,
) -> dict:
    """The fine-tuning step on pre-made tensors on the model's device (switches: what each part costs)."""
    import torch

    from ccclip_widgets.train import ClipLoss, FineTuneConfig
    from ccclip_widgets.train.evaluation import _autocast
    from ccclip_widgets.train.freeze import apply_trainable
    from ccclip_widgets.train.run_setup import _no_decay
    from ccclip_widgets.train.step import MAX_LOGIT_SCALE, _DualEncoder

    device = clip.device
    model = clip.model
    apply_trainable(model, FineTuneConfig())
    model.train()
    wrapper = _DualEncoder(model)
    forward = torch.compile(wrapper) if compile_model else wrapper
    decay = [p for n, p in model.named_parameters() if p.requires_grad and not _no_decay(n, p)]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and _no_decay(n, p)]
    kwargs = {"fused": True} if device.type == "cuda" and fused else {}
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-5,
        betas=(0.9, 0.98),
        eps=1e-6,
        **kwargs,
    )
    g = torch.Generator(device="cpu").manual_seed(0)
    size = clip.image_size
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    if device.type == "cuda" and channels_last:
        model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    elif device.type == "cuda":
        model.to(memory_format=torch.contiguous_format)
    vocab = getattr(model, "vocab_size", 49408) or 49408
    tokens = torch.randint(1, min(vocab, 49000), (batch, clip.context_length), generator=g).to(device)
    valid = torch.ones(batch, dtype=torch.bool, device=device)
    ids = torch.arange(batch, device=device)
    loss_fn = ClipLoss(rank=0, world_size=1)
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        with _autocast(device, precision):
            img, txt, scale = forward(images, tokens)
        if masks:
            loss = loss_fn(img, txt, scale, valid=valid, image_ids=ids, text_ids=ids)
        else:
            loss = loss_fn(img, txt, scale)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        if sync_every_step and (i + 1) % read_every == 0:
            float(loss.item())  # the loop reads the losses back every read_every steps
    if cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    dt = t1 - t0
    out = {
        "samples_per_s": round(batch * steps / dt, 1),
        "step_ms": round(1000 * dt / steps, 2),
        "window_perf_counter": (t0, t1),
    }
    if cuda:
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


# ----------------------------------------------------------------------------------------------- (b), (c)
def bench_fine_tune(
    clip: Any,
    posts: Any,
    batch: int,
    steps: int,
    warmup: int,
    precision: str,
    workers: int | None,
    augment: bool,
    compile_model: bool,
    grad_checkpointing: bool,
    **extra: Any,
) -> dict:
    """``fine_tune`` end to end for ``warmup + steps`` steps; throughput over the last ``steps``."""
    import torch

    from ccclip_widgets.train import FineTuneConfig, fine_tune

    cfg = FineTuneConfig(
        max_steps=warmup + steps,
        batch_size=batch,
        lr=1e-5,
        warmup_steps=0,
        precision=precision,
        num_workers=workers,
        augment=augment,
        checkpoint_every_steps=0,
        show_progress=False,
        compile=compile_model,
        grad_checkpointing=grad_checkpointing,
        **extra,
    )
    marks: dict[int, float] = {}

    def on_step(info: Any) -> None:
        if clip.device.type == "cuda" and info.step == warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        marks[info.step] = time.perf_counter()

    t0 = time.perf_counter()
    result = fine_tune(clip, posts, cfg, on_step=on_step)
    total = time.perf_counter() - t0
    window = (marks[warmup] if warmup > 0 else t0, marks[warmup + steps])
    timed = window[1] - window[0]
    n_timed = steps
    per_step = [h["samples_per_s"] for h in result.history[warmup:]]
    out = {
        "samples_per_s": round(result.batch_size * n_timed / timed, 1),
        "median_step_samples_per_s": round(statistics.median(per_step), 1) if per_step else None,
        "wall_s_including_setup": round(total, 1),
        "final_loss": round(result.history[-1]["loss"], 4),
        "trainable_params": result.trainable_params.get("total"),
        "workers": cfg.num_workers if cfg.num_workers is not None else "auto",
        "window_perf_counter": window,
    }
    if clip.device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


ABLATIONS: dict[str, dict[str, bool]] = {
    "no channels_last": {"channels_last": False},
    "no loss read-back": {"sync_every_step": False},
    "no gradient clipping": {"grad_clip": False},
    "no pair masks": {"masks": False},
    "foreach AdamW (not fused)": {"fused": False},
    "bare (none of the above)": {
        "channels_last": False,
        "sync_every_step": False,
        "grad_clip": False,
        "masks": False,
        "fused": False,
    },
}


def bench_ablation(spec: str, device: str, batch: int, steps: int, warmup: int, precision: str) -> dict:
    """step_only with one part switched off at a time (what each costs)."""
    out: dict[str, Any] = {}
    for name, switches in ABLATIONS.items():
        try:
            r = bench_step_only(load_clip(spec, device), batch, steps, warmup, precision, False, **switches)
        except Exception as exc:  # report and go on
            r = {"error": f"{type(exc).__name__}: {exc}"}
        out[name] = r
        print(f"    {name}: {json.dumps(r)}", flush=True)
    return out


def bench_data_only(clip: Any, posts: Any, batch: int, n_batches: int, workers: int, augment: bool) -> dict:
    """The training DataLoader alone (decode + transform + collate + pin), no model: its ceiling in pairs/s."""
    import torch

    from ccclip_widgets.train.data import PairDataset, RunBatchSampler, make_loader, prepare_posts

    data = prepare_posts(posts, clip)
    ds = PairDataset(
        data.sources, clip.image_size, clip.preprocess, clip.preprocess_cfg, augment=augment, seed=0
    )
    t0 = time.perf_counter()
    for i in range(32):
        ds[(i, 0)]
    per_sample_ms = 1000 * (time.perf_counter() - t0) / 32
    loader = make_loader(
        ds,
        RunBatchSampler(len(data), batch, seed=0),
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        seed=0,
    )
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    dt = time.perf_counter() - t0
    del it
    return {
        "samples_per_s": round(batch * n_batches / dt, 1),
        "single_process_ms_per_sample": round(per_sample_ms, 2),
        "workers": workers,
        "augment": augment,
    }


# ----------------------------------------------------------------------------------------------- variants
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {"precision": "fp32"},
    "fp16": {"precision": "fp16"},
    "bf16+grad_checkpointing": {"grad_checkpointing": True},
    "bf16+compile": {"compile_model": True},
    "bf16+lock_text": {"lock_text": True},
    "bf16+lora": {"lora": {"r": 16, "alpha": 32.0}},
}


def bench_variants(
    spec: str, device: str, posts: Any, batch: int, steps: int, warmup: int, workers: int
) -> dict:
    """``fine_tune`` on the synthetic posts with other precisions and training modes (all code paths run)."""
    from ccclip_widgets.train import LoraSettings

    out: dict[str, Any] = {}
    for name, v in VARIANTS.items():
        v = dict(v)
        precision = v.pop("precision", "bf16")
        compile_model = v.pop("compile_model", False)
        grad_ckpt = v.pop("grad_checkpointing", False)
        if "lora" in v:
            v["lora"] = LoraSettings(**v["lora"])
        try:
            r = bench_fine_tune(
                load_clip(spec, device),
                posts,
                batch,
                steps,
                warmup,
                precision,
                workers,
                False,
                compile_model,
                grad_ckpt,
                **v,
            )
        except Exception as exc:  # report and go on
            r = {"error": f"{type(exc).__name__}: {exc}"}
        out[name] = r
        print(f"    {name}: {json.dumps(r)}", flush=True)
    return out


def check_resume(spec: str, device: str, posts: Any, batch: int, steps: int, workers: int) -> dict:
    """Stop a run half-way, resume it, and compare with an uninterrupted run (max abs weight difference)."""
    import threading as th

    from ccclip_widgets.train import FineTuneConfig, fine_tune

    cfg = FineTuneConfig(
        max_steps=steps,
        batch_size=batch,
        lr=1e-4,
        num_workers=workers,
        show_progress=False,
        checkpoint_every_steps=0,
        augment=True,
    )
    root = Path(tempfile.mkdtemp(prefix="resume_"))
    import torch

    torch.manual_seed(0)
    a = load_clip(spec, device)
    fine_tune(a, posts, cfg, out_dir=root / "a")
    torch.manual_seed(0)
    b = load_clip(spec, device)
    stop = th.Event()
    fine_tune(
        b,
        posts,
        cfg,
        out_dir=root / "b",
        stop_event=stop,
        on_step=lambda i: stop.set() if i.step == steps // 2 else None,
    )
    torch.manual_seed(0)
    c = load_clip(spec, device)
    fine_tune(c, posts, cfg, resume_from=root / "b")
    sa, sc = a.model.state_dict(), c.model.state_dict()
    diff = max(float((sa[k].float() - sc[k].float()).abs().max()) for k in sa)
    return {"max_abs_weight_diff": diff, "bit_identical": diff == 0.0, "steps": steps}


# ----------------------------------------------------------------------------------------------- main
def table(results: dict[str, dict]) -> str:
    """Markdown table of the measurements."""
    rows = [
        "| pipeline | pairs/s | vs open_clip_train | GPU util (mean: timed steps / whole row) "
        "| peak GPU mem, this process |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if not isinstance(r, dict) or "samples_per_s" not in r:
            continue
        sps = r.get("samples_per_s")
        mem = r.get("peak_memory_gib")
        own = r.get("process_peak_memory_gib")
        mem_cell = f"{mem} GiB allocated" if mem else ""
        if own:
            mem_cell += f"{'; ' if mem_cell else ''}{own} GiB by nvidia-smi (its PID)"
        util = r.get("smi_mean_util_pct")
        util_cell = f"{util}%" if util is not None else "n/a"
        if "smi_window_samples" in r:
            w = r.get("smi_window_mean_util_pct")
            shown = f"{w}%" if w is not None else "no sample"
            util_cell = f"{shown} ({r['smi_window_samples']} samples) / {util_cell}"
        if r.get("sampler_errors"):
            util_cell += f" ({r['sampler_errors']} failed reads)"
        vs = r.get("vs_open_clip_train")
        rows.append(
            f"| {name} | {sps if sps is not None else 'n/a'} | {f'{vs}x' if vs else ''} | {util_cell} "
            f"| {mem_cell or 'n/a'} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-demo", action="store_true", help="CPU figures for a demo-size model")
    p.add_argument("--quick", action="store_true", help="fast CPU smoke run of (a)-(c)")
    p.add_argument("--model", default=None, help="model spec (default: ViT-B-32:random, or demo-size on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="default 256 on GPU, 32 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 40 GPU, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 10 GPU, 2 CPU)")
    p.add_argument(
        "--n-images", type=int, default=None, help="posts for (b) and (c) (default 8192 GPU, 256 CPU)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers (default: cores - 2, max 12; both trainers)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model in (a)-(c)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--skip-open-clip", action="store_true", help="do not run open_clip_train")
    p.add_argument("--skip-jpeg", action="store_true", help="do not run (c) (nor open_clip_train)")
    p.add_argument("--skip-synthetic", action="store_true", help="do not run (b)")
    p.add_argument(
        "--read-every", type=int, default=10, help="host reads of the loss every N steps (both trainers)"
    )
    p.add_argument("--variants", action="store_true", help="also fp32/fp16/grad-ckpt/compile/lock/LoRA runs")
    p.add_argument("--check-resume", action="store_true", help="also stop + resume vs uninterrupted run")
    p.add_argument("--ablation", action="store_true", help="also step_only with parts switched off")
    p.add_argument(
        "--data-only", action="store_true", help="also the DataLoader alone, per data kind and transform"
    )
    p.add_argument("--out", default=None, help="results JSON path")
    args = p.parse_args(argv)

    import torch

    gpu = torch.cuda.is_available() and not (args.cpu_demo or args.quick)
    kind = "gpu" if gpu else ("quick" if args.quick else "cpu-demo")
    device = "cuda" if gpu else "cpu"
    precision = "bf16" if gpu else "fp32"
    batch = args.batch_size or (256 if gpu else (8 if args.quick else 32))
    steps = args.steps or (40 if gpu else (2 if args.quick else 5))
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 1 if args.quick else 2)
    n_images = args.n_images or (8192 if gpu else (32 if args.quick else 256))
    cores = usable_cores()
    workers = args.workers if args.workers is not None else (min(12, max(1, cores - 2)) if gpu else 0)
    if args.model:
        spec = args.model
    elif gpu:
        spec = "ViT-B-32:random"
    elif args.quick:
        spec = quick_spec()
    else:
        spec = cpu_demo_spec()

    print(
        f"bench_train: {kind}, model {spec}, batch {batch}, {warmup}+{steps} steps, {n_images} posts, "
        f"{workers} workers, precision {precision}",
        flush=True,
    )
    results: dict[str, Any] = {
        "kind": kind,
        "model": spec,
        "batch_size": batch,
        "timed_steps": steps,
        "warmup_steps": warmup,
        "n_posts": n_images,
        "workers": workers,
        "precision": precision,
        "compile": args.compile,
        "grad_checkpointing": args.grad_checkpointing,
        "read_every_steps": args.read_every,
        "hardware": hardware(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    sampler = GpuSampler()

    def measure(name: str, fn: Any) -> None:
        if gpu:
            torch.cuda.empty_cache()
        with sampler.active(watch={os.getpid()}):
            try:
                r = fn()
            except Exception as exc:  # keep the other measurements
                r = {"error": f"{type(exc).__name__}: {exc}"}
        window = r.pop("window_perf_counter", None) if isinstance(r, dict) else None
        if gpu:
            summ = sampler.summary()
            if window is not None:  # utilisation over the timed steps alone, besides the whole row's
                summ.update(sampler.window_util(*window))
            own = summ.pop(f"smi_process_peak_memory_gib[{os.getpid()}]", None)
            r.update(summ)
            # this process holds the caching allocator's reserve and its CUDA context: an upper bound
            r["process_peak_memory_gib"] = own
        results[name] = r
        print(f"  {name}: {json.dumps(r)}", flush=True)

    if gpu or args.quick:
        measure(
            "step_only",
            lambda: bench_step_only(load_clip(spec, device), batch, steps, warmup, precision, args.compile),
        )
    if args.ablation and (gpu or args.quick):
        results["ablation"] = bench_ablation(spec, device, batch, steps, warmup, precision)
    posts = synthetic_posts(min(n_images, 512) if args.skip_synthetic else n_images, size=224 if gpu else 96)
    measure_synthetic = measure if not args.skip_synthetic else (lambda name, fn: None)
    measure_synthetic(
        "fine_tune_synthetic",
        lambda: bench_fine_tune(
            load_clip(spec, device),
            posts,
            batch,
            steps,
            warmup,
            precision,
            workers,
            False,
            args.compile,
            args.grad_checkpointing,
            read_every_steps=args.read_every,
        ),
    )
    if args.data_only:
        dclip = load_clip(spec, "cpu")
        for aug in (False, True):
            measure(
                f"data_only_synthetic{'_augment' if aug else ''}",
                lambda aug=aug: bench_data_only(dclip, posts, batch, steps, workers, aug),
            )
    if args.variants:
        results["variants"] = bench_variants(spec, device, posts, batch, steps, warmup, workers)
    if args.check_resume:
        measure("resume_check", lambda: check_resume(spec, device, posts, batch, 2 * (warmup + 2), workers))
    if not args.skip_jpeg:
        folder = Path(tempfile.gettempdir()) / f"ccclip_bench_jpeg_{n_images}"
        jposts = jpeg_posts(n_images, folder)
        if args.data_only:
            for aug in (False, True):
                measure(
                    f"data_only_jpeg{'_augment' if aug else ''}",
                    lambda aug=aug: bench_data_only(dclip, jposts, batch, steps, workers, aug),
                )
        measure(
            "fine_tune_jpeg",
            lambda: bench_fine_tune(
                load_clip(spec, device),
                jposts,
                batch,
                steps,
                warmup,
                precision,
                workers,
                True,
                args.compile,
                args.grad_checkpointing,
                read_every_steps=args.read_every,
            ),
        )
    if gpu and not args.skip_open_clip and not args.skip_jpeg:
        torch.cuda.empty_cache()
        oc = bench_open_clip_train(jposts, batch, warmup, steps, workers, args.read_every, sampler)
        results["open_clip_train"] = oc
        print(f"  open_clip_train: {json.dumps({k: v for k, v in oc.items() if k != 'error_tail'})}")
        base = oc.get("samples_per_s")
        if base:
            for name in ("step_only", "fine_tune_synthetic", "fine_tune_jpeg"):
                sps = results.get(name, {}).get("samples_per_s")
                if sps:
                    results[name]["vs_open_clip_train"] = round(sps / base, 2)
    print()
    skip = ("hardware", "variants", "ablation")
    rows = {k: v for k, v in results.items() if isinstance(v, dict) and k not in skip}
    rows.update({f"fine_tune_synthetic {k}": v for k, v in results.get("variants", {}).items()})
    rows.update({f"step_only, {k}": v for k, v in results.get("ablation", {}).items()})
    print(table(rows))
    out = Path(args.out) if args.out else RESULTS / f"train_{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
