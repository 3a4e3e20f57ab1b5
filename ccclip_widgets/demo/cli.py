"""The offline C-CLIP story end to end (what ``ccclip demo`` runs; its flags are in :mod:`ccclip_widgets.cli`).

1. embed the demo posts' test split with the demo model (a stand-in for stock CLIP that only saw descriptive
   captions) and print retrieval for descriptive vs commentative captions, per language;
2. fine-tune a demo C-CLIP on the commentative train split (minutes on a laptop CPU);
3. re-embed, print the table for both models side by side, save it;
4. open JupyterLab on the Explorer notebook (``--no-lab`` stays headless).

Every step reuses its cache on later runs: stored vectors, and the fine-tuned checkpoint (keyed by the
training data and config).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["demo_finetune_config", "open_lab", "run_demo"]


def demo_finetune_config(smoke: bool, epochs: int | None, seed: int) -> Any:
    """The fine-tuning recipe of the demo C-CLIP (see data/models/README.md for why these settings)."""
    from ..train import FineTuneConfig

    return FineTuneConfig(
        epochs=epochs if epochs is not None else (1 if smoke else 10),
        max_steps=3 if smoke else None,
        batch_size=16 if smoke else 128,
        lr=1e-4,
        weight_decay=0.1,
        warmup_fraction=0.1,
        precision="fp32",
        lock_text=True,
        unlock_last_text_blocks=2,
        augment=True,
        seed=seed,
        eval_every_steps=0,
        eval_at_start=False,
        checkpoint_every_steps=0 if smoke else 50,
        num_workers=0,
    )


def run_demo(
    out_dir: str | os.PathLike[str] | None = None,
    *,
    smoke: bool = False,
    device: str | None = None,
    epochs: int | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> Path:
    """Embed, evaluate, fine-tune, re-embed and compare on the demo posts; print and save the gap table.

    Parameters
    ----------
    out_dir
        Work folder (store, fine-tuned checkpoint, tables).
    smoke
        Small subset and a few training steps (CI).
    device
        Torch device.
    epochs
        Fine-tuning epochs.
    seed
        Seed for fine-tuning and the bootstrap.
    show_progress
        Progress bars.

    Returns
    -------
    Path
        The work folder.
    """
    import polars as pl

    from .._io import atomic_write_json, default_cache_dir
    from ..embed import embed_posts
    from ..evaluate import evaluate_retrieval, format_gap_table
    from ..models import load_model
    from ..train import fine_tune
    from . import load_demo_posts

    t0 = time.perf_counter()
    out = Path(out_dir) if out_dir else default_cache_dir() / ("demo-smoke" if smoke else "demo")
    out.mkdir(parents=True, exist_ok=True)
    posts = load_demo_posts()
    if smoke:
        posts = _smoke_subset(posts)
    # Commentative pairs plus the same images' descriptive captions: the descriptive pairs keep the image
    # tower from forgetting what it knew (measured in data/models/README.md: commentative-only training
    # raised commentative recall less and lowered descriptive recall).
    train = posts.filter(pl.col("split") == "train")
    test = posts.filter(pl.col("split") == "test")
    print(
        f"demo posts: {len(posts)} ({posts.table['image_key'].n_unique()} images); fine-tuning on {len(train)} "
        f"train posts (descriptive + commentative); testing on {len(test)} posts of {test.table['image_key'].n_unique()} held-out "
        "images"
    )
    store = out / "store"
    baseline = load_model("demo", device=device)
    emb_base = embed_posts(test, baseline, store=store, show_progress=show_progress)
    print(emb_base.summary())
    vectors = {"stand-in CLIP": (emb_base.image, emb_base.text)}
    n_boot = 200 if smoke else 1000
    kw = dict(group_by=("caption_kind", "lang"), pool="all", n_boot=n_boot, seed=seed)
    table = evaluate_retrieval(vectors, emb_base.posts.table, **kw)
    print("\nBefore fine-tuning (candidate pool: all held-out images / captions):")
    print(format_gap_table(table))

    config = demo_finetune_config(smoke, epochs, seed)
    ck_dir = out / "c-clip-demo"
    key = _finetune_key(train, baseline.fingerprint, config)
    if _cached_checkpoint(ck_dir, key):
        print(f"\nReusing the fine-tuned model in {ck_dir} (same data and settings).")
        tuned = load_model(ck_dir, device=device)
    else:
        print(f"\nFine-tuning a demo C-CLIP on {len(train)} image-text pairs ...")
        tuned = load_model("demo", device=device)
        result = fine_tune(tuned, train, config, out_dir=out / "finetune-run")
        tuned = result.model
        from ..models import save_checkpoint

        save_checkpoint(
            tuned,
            ck_dir,
            provenance={"base": "demo", "recipe": "ccclip demo", "train_posts": len(train)},
            extra={"demo_key": key, "training_config": config.to_dict()},
        )
        tuned = load_model(ck_dir, device=device)
    emb_tuned = embed_posts(test, tuned, store=store, show_progress=show_progress)
    if emb_tuned.post_ids != emb_base.post_ids:
        raise RuntimeError(
            "baseline and fine-tuned embeddings cover different posts; clear the store and rerun"
        )
    vectors["C-CLIP (fine-tuned)"] = (emb_tuned.image, emb_tuned.text)
    table = evaluate_retrieval(vectors, emb_base.posts.table, **kw)
    print("\nAfter fine-tuning, both models on the same held-out posts:")
    print(format_gap_table(table))
    import io

    from .._io import atomic_write_bytes

    buf = io.BytesIO()
    table.write_csv(buf)
    atomic_write_bytes(out / "gap_table.csv", buf.getvalue())
    atomic_write_json(
        out / "demo_run.json",
        {
            "smoke": smoke,
            "seconds": round(time.perf_counter() - t0, 1),
            "baseline": baseline.fingerprint,
            "fine_tuned": tuned.fingerprint,
            "fine_tuned_checkpoint": str(ck_dir),
            "store": str(store),
            "test_posts": len(test),
            "train_posts": len(train),
        },
    )
    print(f"\nTable saved to {out / 'gap_table.csv'}; fine-tuned model in {ck_dir}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return out


def _smoke_subset(posts: Any) -> Any:
    """A few dozen images of each split, every post of those images (all kinds and languages)."""
    import polars as pl

    keys = []
    for split, n in (("train", 24), ("test", 24)):
        ks = posts.table.filter(pl.col("split") == split)["image_key"].unique(maintain_order=True).head(n)
        keys.extend(ks.to_list())
    return posts.filter(pl.col("image_key").is_in(keys))


def _finetune_key(train: Any, base_fingerprint: str, config: Any) -> str:
    from .._io import blake2b_hex

    t = train.table
    rows = "\n".join((t["post_id"] + "\t" + t["image_key"] + "\t" + t["text_key"]).to_list())
    return blake2b_hex(base_fingerprint + json.dumps(config.to_dict(), sort_keys=True, default=str) + rows)


def _cached_checkpoint(folder: Path, key: str) -> bool:
    meta = folder / "ccclip.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("demo_key") == key
    except json.JSONDecodeError:
        return False


def open_lab(port: int | None = None, work_dir: Path | None = None) -> int:
    """Start JupyterLab on the Explorer notebook (blocks until JupyterLab exits)."""
    from .._io import repo_data_dir

    notebooks = repo_data_dir().parent / "notebooks"
    nb = notebooks / "01_explore.ipynb"
    if shutil.which("jupyter") is None and not _has_module("jupyterlab"):
        print('JupyterLab is not installed: pip install "ccclip_widgets[widgets]"', file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "jupyterlab", str(nb) if nb.exists() else str(notebooks)]
    if port:
        cmd += ["--port", str(port)]
    if os.geteuid() == 0 if hasattr(os, "geteuid") else False:
        cmd.append("--allow-root")
    env = {**os.environ}
    if work_dir is not None:
        env["CCCLIP_DEMO_WORK_DIR"] = str(work_dir)
    print("Opening JupyterLab:", " ".join(cmd))
    return subprocess.call(cmd, cwd=str(notebooks.parent), env=env)


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
