"""Train the demo model's image tower (and its text head) on descriptive captions only.

Standalone on purpose: it needs torch, timm, numpy, Pillow and safetensors, nothing of the toolkit, so it runs
on a bare GPU machine with a carried folder. Text-tower features are precomputed (the multilingual-e5-small
tower is locked: its output for a fixed caption never changes), so a step is one image-tower forward and
backward plus two small heads.

Input folder (``--data``): ``rows.csv`` (``image_id``, ``split``, ``text``; ``split`` is ``train`` or
``test`` = held out), ``text_features.npy`` (one L2-normalised 384-d row per ``rows.csv`` row, in order) and
``images/<image_id>.webp``.

Output (``--out``): ``standin-<i>.safetensors`` shards (fp16) with open_clip state-dict names for the architecture
``ccclip-demo-e5-rn18`` (``visual.trunk.*``, ``visual.head.proj.weight``, ``text.proj.0.weight``,
``text.proj.2.weight``, ``logit_scale``) and ``standin.json`` with the settings and held-out retrieval.

Several settings may be given (``--grid``); each is trained and scored on the held-out rows, and the best by
held-out text-to-image R@10 is written (the demo's own test images are never in the input).

    python tools/train_standin.py --data DIR --out DIR --grid 200:1e-3:0 200:2e-3:0
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def load_image(path: Path, size: int) -> np.ndarray:
    """Resize so the longest side is ``size`` (bicubic) and pad to a white square, as the demo preprocess does."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = size / max(w, h)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
        return np.asarray(canvas, dtype=np.uint8)


class Heads(torch.nn.Module):
    def __init__(self, embed_dim: int = 256, text_dim: int = 384) -> None:
        import timm

        super().__init__()
        self.trunk = timm.create_model("resnet18", pretrained=False, num_classes=0, global_pool="avg")
        self.img_proj = torch.nn.Linear(self.trunk.num_features, embed_dim, bias=False)
        hidden = (text_dim + embed_dim) // 2
        self.text_proj = torch.nn.Sequential(
            torch.nn.Linear(text_dim, hidden, bias=False),
            torch.nn.GELU(),
            torch.nn.Linear(hidden, embed_dim, bias=False),
        )
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.img_proj(self.trunk(x)), dim=-1)

    def encode_text(self, t: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(t), dim=-1)

    def state_dict_open_clip(self) -> dict[str, torch.Tensor]:
        out = {f"visual.trunk.{k}": v for k, v in self.trunk.state_dict().items()}
        out["visual.head.proj.weight"] = self.img_proj.weight
        out["text.proj.0.weight"] = self.text_proj[0].weight
        out["text.proj.2.weight"] = self.text_proj[2].weight
        out["logit_scale"] = self.logit_scale.detach().reshape(())
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random scale (0.75-1.1), shift, horizontal flip and brightness/contrast jitter, on the GPU."""
    n = x.shape[0]
    dev = x.device
    scale = torch.empty(n, device=dev).uniform_(0.75, 1.1, generator=gen)
    shift = torch.empty(n, 2, device=dev).uniform_(-0.12, 0.12, generator=gen)
    flip = (torch.rand(n, device=dev, generator=gen) < 0.5).float() * 2 - 1
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = scale * flip
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    white = 1.0
    y = F.grid_sample(x - white, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + white
    b = torch.empty(n, 1, 1, 1, device=dev).uniform_(-0.08, 0.08, generator=gen)
    c = torch.empty(n, 1, 1, 1, device=dev).uniform_(0.85, 1.15, generator=gen)
    return ((y - 0.5) * c + 0.5 + b).clamp(0, 1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def recall(model: Heads, imgs: torch.Tensor, feats: torch.Tensor) -> dict[str, float]:
    if len(imgs) == 0:  # a pool too small to hold images out
        return {"t2i_r1": float("nan"), "t2i_r5": float("nan"), "t2i_r10": float("nan"), "n": 0}
    model.eval()
    with torch.autocast(imgs.device.type, dtype=torch.bfloat16, enabled=imgs.is_cuda):
        ie = torch.cat([model.encode_image(normalize(imgs[i : i + 512])) for i in range(0, len(imgs), 512)])
        te = model.encode_text(feats)
    sim = te.float() @ ie.float().T
    target = sim.diagonal().unsqueeze(1)
    rank = (sim > target).sum(1).float()  # optimistic ties: the same rule as ccclip_widgets.evaluate
    model.train()
    return {f"t2i_r{k}": float((rank < k).float().mean()) for k in (1, 5, 10)} | {"n": len(imgs)}


def train_one(
    imgs: torch.Tensor,
    feats: torch.Tensor,
    held_imgs: torch.Tensor,
    held_feats: torch.Tensor,
    epochs: int,
    lr: float,
    seed: int,
    batch: int,
    wd: float = 0.1,
) -> tuple[Heads, dict]:
    torch.manual_seed(seed)
    dev = imgs.device
    model = Heads().to(dev).to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    batch = min(batch, len(imgs))
    steps_per_epoch = len(imgs) // batch
    total = epochs * steps_per_epoch
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
        ),
    )
    gen = torch.Generator(device=dev).manual_seed(seed)
    t0 = time.perf_counter()
    history = []
    for ep in range(epochs):
        perm = torch.randperm(len(imgs), device=dev, generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * batch : (s + 1) * batch]
            x = normalize(augment(imgs[idx], gen)).contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                ie = model.encode_image(x)
                te = model.encode_text(feats[idx])
                logits = model.logit_scale.exp().clamp(max=100) * ie.float() @ te.float().T
                labels = torch.arange(len(idx), device=dev)
                loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (ep + 1) % max(1, epochs // 5) == 0 or ep == epochs - 1:
            m = recall(model, held_imgs, held_feats)
            history.append({"epoch": ep + 1, "loss": float(loss.detach()), **m})
            print(json.dumps({"epochs": epochs, "lr": lr, "seed": seed, "wd": wd, **history[-1]}), flush=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return model, {"seconds": round(time.perf_counter() - t0, 1), "history": history}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--grid", nargs="+", default=["240:2e-3:0"], help="epochs:lr:seed[:weight_decay] settings to try"
    )
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=96)
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (data / "rows.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    feats = np.load(data / "text_features.npy").astype(np.float32)
    assert len(rows) == len(feats), "rows.csv and text_features.npy must align"
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pix = np.stack([load_image(data / "images" / f"{r['image_id']}.webp", args.size) for r in rows])
    x = torch.from_numpy(pix).permute(0, 3, 1, 2).float().div(255).to(dev)
    t = torch.from_numpy(feats).to(dev)
    tr = torch.tensor([r["split"] == "train" for r in rows], device=dev)
    print(f"{int(tr.sum())} train, {int((~tr).sum())} held out, device {dev}", flush=True)
    best = None
    results = []
    for g in args.grid:
        e, lr, seed, *rest = g.split(":")
        wd = float(rest[0]) if rest else 0.1
        model, info = train_one(x[tr], t[tr], x[~tr], t[~tr], int(e), float(lr), int(seed), args.batch, wd)
        final = info["history"][-1]
        results.append({"epochs": int(e), "lr": float(lr), "seed": int(seed), "weight_decay": wd, **info})
        if best is None or final["t2i_r10"] > best[1]["t2i_r10"]:  # nan (nothing held out): the first
            best = (model, final, results[-1])
    from safetensors.torch import save_file

    model, final, setting = best
    # fp16 (the shipped precision), in shards under 12 MB so each file travels back from a GPU machine
    state = {
        k: v.half() if v.is_floating_point() and k != "logit_scale" else v
        for k, v in model.state_dict_open_clip().items()
    }
    shard: dict[str, torch.Tensor] = {}
    n_shard = 0
    for k in sorted(state):
        shard[k] = state[k]
        if sum(v.numel() * v.element_size() for v in shard.values()) > 12e6:
            save_file(shard, str(out / f"standin-{n_shard}.safetensors"))
            shard, n_shard = {}, n_shard + 1
    if shard:
        save_file(shard, str(out / f"standin-{n_shard}.safetensors"))
    meta = {
        "chosen": {k: setting[k] for k in ("epochs", "lr", "seed", "weight_decay", "seconds")},
        "heldout": final,
        "grid": results,
        "train_images": int(tr.sum()),
        "heldout_images": int((~tr).sum()),
        "batch": args.batch,
        "image_size": args.size,
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    (out / "standin.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta["chosen"] | meta["heldout"]))


if __name__ == "__main__":
    main()
