"""What trains: the image and text towers' layout (stem, blocks, head, projection) and the requires_grad plan.

open_clip models come in several shapes; each tower is described the same way here so that "lock the image
tower but train its last two blocks" means the same thing for all of them:

=============================  ==========================================  ==================================
tower                          blocks                                      head (trains with unlocked blocks)
=============================  ==========================================  ==================================
VisionTransformer              ``visual.transformer.resblocks``            ``ln_post``, ``proj``, attention pool
ModifiedResNet (RN50...)       every Bottleneck of ``layer1``..``layer4``  ``attnpool`` (its ``c_proj`` projects)
timm trunk (``TimmModel``)     ``trunk.blocks`` / ``stages`` / ``layers``  trunk norm/head + ``visual.head``
TextTransformer / CLIP's own   ``transformer.resblocks``                   ``ln_final``, ``text_projection``
HF text (``HFTextEncoder``)    ``text.transformer.encoder.layer``          pooler, ``text.proj``
=============================  ==========================================  ==================================

The *stem* (patch/token embeddings, positional embeddings, the ResNet stem) only trains when the whole tower
does.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from ..errors import TrainingWarning
from .config import FineTuneConfig

__all__ = ["TowerLayout", "apply_trainable", "freeze_locked_batchnorm", "tower_layouts"]


@dataclass
class TowerLayout:
    """Parameter names (relative to the open_clip model) of one tower, grouped.

    Attributes
    ----------
    name
        ``"image"`` or ``"text"``.
    kind
        The tower's class name (``VisionTransformer``, ``ModifiedResNet``, ``TimmModel``, ``TextTransformer``,
        ``HFTextEncoder``, ``CLIP-text``).
    stem
        Embeddings and everything before the first block.
    blocks
        One list of names per block, input to output.
    head
        Everything after the last block (final norm, pooling, projection).
    projection
        The output projection (a subset of ``head``); empty when the tower has none.
    block_path
        Where the blocks live, for messages (e.g. ``"visual.transformer.resblocks"``).
    """

    name: str
    kind: str
    stem: list[str] = field(default_factory=list)
    blocks: list[list[str]] = field(default_factory=list)
    head: list[str] = field(default_factory=list)
    projection: list[str] = field(default_factory=list)
    block_path: str = ""

    @property
    def all(self) -> list[str]:
        """Every parameter name of the tower."""
        return [*self.stem, *(n for b in self.blocks for n in b), *self.head]

    def unlocked(self, last_blocks: int) -> list[str]:
        """Names that train when the tower is locked except its last ``last_blocks`` blocks (and its head)."""
        if last_blocks <= 0:
            return []
        if last_blocks > len(self.blocks):
            raise ValueError(
                f"Cannot unlock the last {last_blocks} blocks of the {self.name} tower ({self.kind}): it has "
                f"{len(self.blocks)} blocks ({self.block_path}). Use at most {len(self.blocks)}, or unlock the "
                "whole tower."
            )
        return [n for b in self.blocks[-last_blocks:] for n in b] + list(self.head)


def _names(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}{n}" for n, _ in module.named_parameters()]


def _blocks_of(container: Iterable[nn.Module], prefix: str) -> list[list[str]]:
    return [_names(block, f"{prefix}{i}.") for i, block in enumerate(container)]


def _split_by_blocks(all_names: list[str], blocks: list[list[str]]) -> tuple[list[str], list[str]]:
    """Stem = names registered before the first block's, head = the rest outside the blocks."""
    in_blocks = {n for b in blocks for n in b}
    first = blocks[0][0] if blocks and blocks[0] else None
    stem: list[str] = []
    head: list[str] = []
    seen_blocks = False
    for n in all_names:
        if n == first:
            seen_blocks = True
        if n in in_blocks:
            continue
        (head if seen_blocks else stem).append(n)
    return stem, head


def _image_layout(visual: nn.Module) -> TowerLayout:
    p = "visual."
    all_names = _names(visual, p)
    kind = type(visual).__name__
    resblocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if resblocks is not None and hasattr(visual, "conv1"):  # open_clip VisionTransformer
        blocks = _blocks_of(resblocks, f"{p}transformer.resblocks.")
        stem_roots = ("conv1.", "class_embedding", "positional_embedding", "ln_pre.", "patch_dropout.")
        stem = [n for n in all_names if n[len(p) :].startswith(stem_roots)]
        in_blocks = {n for b in blocks for n in b}
        head = [n for n in all_names if n not in in_blocks and n not in stem]
        proj = [f"{p}proj"] if getattr(visual, "proj", None) is not None else []
        return TowerLayout("image", kind, stem, blocks, head, proj, f"{p}transformer.resblocks")
    if all(hasattr(visual, f"layer{i}") for i in range(1, 5)) and hasattr(
        visual, "attnpool"
    ):  # ModifiedResNet
        blocks = []
        for i in range(1, 5):
            blocks += _blocks_of(getattr(visual, f"layer{i}"), f"{p}layer{i}.")
        head = [n for n in all_names if n.startswith(f"{p}attnpool.")]
        in_blocks = {n for b in blocks for n in b}
        stem = [n for n in all_names if n not in in_blocks and n not in head]
        proj = [n for n in head if n.startswith(f"{p}attnpool.c_proj.")]
        return TowerLayout("image", kind, stem, blocks, head, proj, f"{p}layer1..layer4 (bottleneck blocks)")
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:  # timm
        blocks, path = _timm_blocks(trunk, f"{p}trunk.")
        if not blocks:
            raise ValueError(f"Cannot find the blocks of the timm trunk {type(trunk).__name__}")
        stem, head = _split_by_blocks(all_names, blocks)
        head_mod = getattr(visual, "head", None)
        proj = _names(head_mod, f"{p}head.") if head_mod is not None else []
        if not proj:
            proj = [n for n in head if n.startswith(f"{p}trunk.head.")]
        return TowerLayout("image", kind, stem, blocks, head, proj, path)
    return _generic_layout("image", visual, p)


def _timm_blocks(trunk: nn.Module, prefix: str) -> tuple[list[list[str]], str]:
    for attr in ("blocks", "stages", "layers"):
        container = getattr(trunk, attr, None)
        if isinstance(container, nn.ModuleList | nn.Sequential) and len(container):
            return _blocks_of(container, f"{prefix}{attr}."), f"{prefix}{attr}"
    if all(hasattr(trunk, f"layer{i}") for i in range(1, 5)):  # timm ResNets
        blocks: list[list[str]] = []
        for i in range(1, 5):
            blocks += _blocks_of(getattr(trunk, f"layer{i}"), f"{prefix}layer{i}.")
        return blocks, f"{prefix}layer1..layer4"
    return [], ""


def _generic_layout(name: str, tower: nn.Module, prefix: str) -> TowerLayout:
    """Fallback: the longest ModuleList in the tower holds the blocks; registration order splits the rest."""
    best: tuple[str, nn.ModuleList] | None = None
    for mod_name, mod in tower.named_modules():
        if isinstance(mod, nn.ModuleList) and (best is None or len(mod) > len(best[1])):
            best = (mod_name, mod)
    all_names = _names(tower, prefix)
    if best is None:
        return TowerLayout(name, type(tower).__name__, stem=all_names)
    blocks = _blocks_of(best[1], f"{prefix}{best[0]}.")
    stem, head = _split_by_blocks(all_names, blocks)
    return TowerLayout(name, type(tower).__name__, stem, blocks, head, [], f"{prefix}{best[0]}")


def _text_layout(model: nn.Module) -> TowerLayout:
    text = getattr(model, "text", None)
    if text is None:  # open_clip CLIP keeps the text tower's parts on the model itself
        blocks = _blocks_of(model.transformer.resblocks, "transformer.resblocks.")
        stem = [
            n
            for n, _ in model.named_parameters()
            if n.startswith(("token_embedding.", "positional_embedding"))
        ]
        head = [n for n, _ in model.named_parameters() if n.startswith(("ln_final.", "text_projection"))]
        proj = [n for n in head if n.startswith("text_projection")]
        return TowerLayout("text", "CLIP-text", stem, blocks, head, proj, "transformer.resblocks")
    p = "text."
    all_names = _names(text, p)
    kind = type(text).__name__
    hf = getattr(text, "transformer", None)
    encoder = getattr(hf, "encoder", None)
    if hasattr(text, "config") and hf is not None:  # HFTextEncoder
        layers = None
        for attr in ("layer", "layers", "block"):
            layers = getattr(encoder if encoder is not None else hf, attr, None)
            if isinstance(layers, nn.ModuleList):
                path = f"{p}transformer.{'encoder.' if encoder is not None else ''}{attr}"
                break
        else:
            return _generic_layout("text", text, p)
        blocks = _blocks_of(layers, f"{path}.")
        stem, head = _split_by_blocks(all_names, blocks)
        proj = [n for n in head if n.startswith(f"{p}proj.")]
        return TowerLayout("text", kind, stem, blocks, head, proj, path)
    resblocks = getattr(hf, "resblocks", None)
    if resblocks is not None:  # TextTransformer in a CustomTextCLIP
        blocks = _blocks_of(resblocks, f"{p}transformer.resblocks.")
        stem_roots = ("token_embedding.", "positional_embedding", "cls_emb")
        stem = [n for n in all_names if n[len(p) :].startswith(stem_roots)]
        in_blocks = {n for b in blocks for n in b}
        head = [n for n in all_names if n not in in_blocks and n not in stem]
        proj = [n for n in head if n[len(p) :].startswith("text_projection")]
        return TowerLayout("text", kind, stem, blocks, head, proj, f"{p}transformer.resblocks")
    return _generic_layout("text", text, p)


def tower_layouts(model: nn.Module) -> dict[str, TowerLayout]:
    """Describe the image and text towers of an open_clip model.

    Parameters
    ----------
    model
        An open_clip ``CLIP`` or ``CustomTextCLIP`` (ViT, ModifiedResNet or timm image tower; open_clip or
        Hugging Face text tower).

    Returns
    -------
    dict[str, TowerLayout]
        ``{"image": ..., "text": ...}``.
    """
    return {"image": _image_layout(model.visual), "text": _text_layout(model)}


def apply_trainable(model: nn.Module, config: FineTuneConfig) -> dict[str, int]:
    """Set ``requires_grad`` on every parameter according to the config (LoRA is handled by :mod:`.lora`).

    Parameters
    ----------
    model
        The open_clip model.
    config
        Uses ``lock_image``, ``lock_text``, ``unlock_last_*_blocks``, ``train_projections_only``,
        ``train_logit_scale`` and ``lora`` (with LoRA, only the temperature is enabled here).

    Returns
    -------
    dict[str, int]
        Trainable parameter counts: ``image``, ``text``, ``other`` and ``total``.
    """
    layouts = tower_layouts(model)
    params = dict(model.named_parameters())
    train: set[str] = set()
    if config.lora is None:
        if config.train_projections_only:
            for layout in layouts.values():
                if not layout.projection:
                    warnings.warn(
                        f"The {layout.name} tower ({layout.kind}) has no output projection; with "
                        "train_projections_only nothing in it trains.",
                        TrainingWarning,
                        stacklevel=3,
                    )
                train.update(layout.projection)
        else:
            for layout, locked, last in (
                (layouts["image"], config.lock_image, config.unlock_last_image_blocks),
                (layouts["text"], config.lock_text, config.unlock_last_text_blocks),
            ):
                train.update(layout.unlocked(last) if locked else layout.all)
    if config.train_logit_scale and "logit_scale" in params:
        train.add("logit_scale")
    for name, param in params.items():
        param.requires_grad_(name in train)
    counts = {"image": 0, "text": 0, "other": 0}
    tower_of = {n: t for t, layout in layouts.items() for n in layout.all}
    for name in train:
        counts[tower_of.get(name, "other")] += params[name].numel()
    counts["total"] = sum(counts.values())
    return counts


def freeze_locked_batchnorm(model: nn.Module) -> None:
    """Put BatchNorm layers whose parameters are all frozen in eval mode (their running statistics then stay).

    Call after ``model.train()``; locked ResNet towers stay bit-identical this way.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            own = list(module.parameters(recurse=False))
            if not any(p.requires_grad for p in own):
                module.eval()
