"""LoRA adapters for open_clip models, through peft.

Targets are chosen per architecture inside the towers' blocks (see :mod:`.freeze`): every ``nn.Linear`` (MLP
``c_fc``/``c_proj``, timm ``qkv``/``proj``/``fc1``/``fc2``, HF ``query``/``key``/``value``/``dense``, custom
attention ``out_proj``) and, for ``torch.nn.MultiheadAttention`` (open_clip's default block), its fused q/k/v
weight ``in_proj_weight`` as a peft *parameter* target. The ``out_proj`` of ``nn.MultiheadAttention`` is left out
on purpose: that module reads ``out_proj.weight`` directly, so a wrapped ``out_proj`` would never see its adapter,
and peft's whole-module wrapper merges and unmerges the base weights on every forward pass, which drifts them by
rounding. With parameter targets the base weights stay bit-identical.

An adapter folder holds ``adapter_model.safetensors`` (the adapter tensors, plus ``logit_scale`` when it
trained) and ``ccclip_adapter.json`` (LoRA settings, resolved targets, the base model's spec and fingerprint).
:func:`merge_lora` turns base model + adapter folder into a plain model that ``save_checkpoint`` can write.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import record_file_checksums
from .config import LoraSettings
from .freeze import tower_layouts

__all__ = [
    "ADAPTER_META",
    "ADAPTER_WEIGHTS",
    "LoraHandle",
    "adapter_state",
    "inject_lora",
    "load_adapter",
    "lora_targets",
    "merge_lora",
    "save_adapter",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "ccclip_adapter.json"
_ADAPTER_NAME = "default"


def _block_prefixes(blocks: list[list[str]]) -> list[str]:
    out = []
    for names in blocks:
        if not names:
            continue
        common = os.path.commonprefix(names)
        out.append(common[: common.rfind(".") + 1] if "." in common else common)
    return out


def lora_targets(model: nn.Module, settings: LoraSettings) -> tuple[list[str], list[str]]:
    """Module and parameter names to adapt.

    Parameters
    ----------
    model
        The open_clip model (without adapters).
    settings
        ``towers`` and ``target_modules`` (name suffixes; ``None`` for the per-architecture default).

    Returns
    -------
    (modules, parameters)
        Full module names for peft ``target_modules`` and full parameter names (``...attn.in_proj_weight``)
        for peft ``target_parameters``.

    Raises
    ------
    ValueError
        When nothing matches (the message lists candidate names).
    """
    layouts = tower_layouts(model)
    towers = ("image", "text") if settings.towers == "both" else (settings.towers,)
    prefixes = tuple(p for t in towers for p in _block_prefixes(layouts[t].blocks))
    modules: list[str] = []
    params: list[str] = []
    inside_mha: set[str] = set()
    named = dict(model.named_modules())
    for name, mod in named.items():
        if isinstance(mod, nn.MultiheadAttention):
            inside_mha.update(n for n in named if n.startswith(name + "."))
    candidates: list[str] = []
    for name, mod in named.items():
        if not name.startswith(prefixes):
            continue
        if isinstance(mod, nn.MultiheadAttention):
            if getattr(mod, "_qkv_same_embed_dim", False) and mod.in_proj_weight is not None:
                candidates.append(name)
                if _wanted(name, settings, default=True):
                    params.append(f"{name}.in_proj_weight")
            continue
        if isinstance(mod, nn.Linear) and name not in inside_mha:
            candidates.append(name)
            if _wanted(name, settings, default=True):
                modules.append(name)
        elif isinstance(mod, nn.Conv2d | nn.Embedding) and settings.target_modules is not None:
            candidates.append(name)
            if _wanted(name, settings, default=False):
                modules.append(name)
    if not modules and not params:
        sample = sorted({c.rsplit(".", 1)[-1] for c in candidates})
        raise ValueError(
            f"LoRA found no layers to adapt in the {'/'.join(towers)} tower(s) with target_modules="
            f"{settings.target_modules!r}. Layer names available in the blocks: {sample[:30]}"
        )
    return modules, params


def _wanted(name: str, settings: LoraSettings, default: bool) -> bool:
    if settings.target_modules is None:
        return default
    return any(name == s or name.endswith("." + s) for s in settings.target_modules)


@dataclasses.dataclass
class LoraHandle:
    """Adapters injected into a model: the peft tuner plus what was targeted.

    Attributes
    ----------
    tuner
        The ``peft.tuners.lora.LoraModel`` wrapping the open_clip model (which it modifies in place).
    settings
        The LoRA settings.
    modules, parameters
        The resolved targets.
    """

    tuner: Any
    settings: LoraSettings
    modules: list[str]
    parameters: list[str]

    def adapter_names(self) -> list[str]:
        """State-dict keys of the adapter tensors that train (in a stable order)."""
        owners = tuple(self.modules) + tuple(p.rsplit(".", 1)[0] for p in self.parameters)
        out = []
        for key in self.tuner.model.state_dict():
            if ".lora_" not in key:
                continue
            owner = key.split(".lora_", 1)[0]
            owner = owner.replace(".base_layer", "")
            if owner in owners:
                out.append(key)
        return out

    def merge(self) -> nn.Module:
        """Merge the adapters into the base weights (in place) and remove peft's wrappers.

        Returns
        -------
        torch.nn.Module
            The plain open_clip model (the same object that was adapted).
        """
        return self.tuner.merge_and_unload(progressbar=False)

    def unload(self) -> nn.Module:
        """Remove the adapters without merging them (the base weights were never changed).

        Returns
        -------
        torch.nn.Module
            The plain open_clip model (the same object that was adapted).
        """
        return self.tuner.unload()


def inject_lora(model: nn.Module, settings: LoraSettings) -> LoraHandle:
    """Add LoRA adapters to ``model`` in place and freeze everything else.

    The adapters' initial values come from the global torch RNG (seed it first for a reproducible run).

    Parameters
    ----------
    model
        The open_clip model.
    settings
        LoRA settings.

    Returns
    -------
    LoraHandle
    """
    import re

    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    modules, params = lora_targets(model, settings)
    if params and settings.dropout > 0:
        raise ValueError(
            f"LoRA dropout={settings.dropout} cannot be used on the fused q/k/v weights of "
            "torch.nn.MultiheadAttention (peft adapts them as parameters, without dropout). Use dropout=0, or adapt "
            "only Linear layers, e.g. LoraSettings(target_modules=('c_fc', 'c_proj'), dropout=...)."
        )
    cfg = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=("^(" + "|".join(re.escape(m) for m in modules) + ")$") if modules else [],
        target_parameters=params or None,
        bias="none",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that parameter targeting is new; tested here
        tuner = LoraModel(model, cfg, _ADAPTER_NAME)
    handle = LoraHandle(tuner, settings, modules, params)
    keep = set(handle.adapter_names())
    for name, p in model.named_parameters():
        # peft matches parameter targets by suffix, so a text-only run on a CLIP whose text blocks are named
        # "transformer.resblocks.N" also wraps "visual.transformer.resblocks.N"; those extra adapters start at
        # zero (lora_B = 0) and stay frozen, so they never change anything.
        p.requires_grad_(name in keep)
    return handle


def adapter_state(
    model: nn.Module, handle: LoraHandle, with_logit_scale: bool = True
) -> dict[str, torch.Tensor]:
    """CPU copies of the adapter tensors (and ``logit_scale``), keyed as in the adapted model's state dict."""
    state = model.state_dict()
    keys = handle.adapter_names()
    if with_logit_scale and "logit_scale" in state:
        keys.append("logit_scale")
    return {k: state[k].detach().to("cpu").contiguous().clone() for k in keys}


def save_adapter(
    folder: str | os.PathLike[str],
    state: dict[str, torch.Tensor],
    handle: LoraHandle,
    *,
    base: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write adapter tensors and their description into ``folder`` (which must exist).

    Parameters
    ----------
    folder
        Destination folder (typically a temporary folder that is renamed into place afterwards).
    state
        From :func:`adapter_state`.
    handle
        From :func:`inject_lora`.
    base
        Identity of the base model: ``spec``, ``name``, ``fingerprint``.
    extra
        More JSON fields (training config, metrics).

    Returns
    -------
    Path
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    meta = {
        "format_version": 1,
        "kind": "lora",
        "lora": handle.settings.to_dict(),
        "target_modules": handle.modules,
        "target_parameters": handle.parameters,
        "base_model": base,
        "weights": ADAPTER_WEIGHTS,
        **(extra or {}),
    }
    (folder / ADAPTER_META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    record_file_checksums(folder, ADAPTER_META)
    return folder


def load_adapter(folder: str | os.PathLike[str], model: nn.Module, handle: LoraHandle) -> None:
    """Load adapter tensors from ``folder`` into a model that already has the same adapters injected.

    Raises
    ------
    ValueError
        When the folder's adapters do not match the injected ones.
    ccclip_widgets.models.CheckpointIntegrityError
        When a file does not match the checksums in ``ccclip_adapter.json``.
    """
    from safetensors.torch import load_file

    from ..models import verify_checkpoint_folder

    verify_checkpoint_folder(folder, ADAPTER_META, (ADAPTER_WEIGHTS,))
    state = load_file(str(Path(folder) / ADAPTER_WEIGHTS), device="cpu")
    expected = set(handle.adapter_names())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected - {"logit_scale"})
    if missing or unexpected:
        raise ValueError(
            f"The adapters in {folder} do not match this model's: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}. Was it trained with other LoRA settings or another base architecture?"
        )
    target = model.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            target[k].copy_(v.to(target[k].dtype))


def merge_lora(clip: Any, adapter_dir: str | os.PathLike[str], *, strict: bool = True) -> Any:
    """Apply a LoRA adapter folder to a base model and merge it into plain weights.

    Parameters
    ----------
    clip
        The base :class:`~ccclip_widgets.models.ClipModel` the adapters were trained on (it is not modified).
    adapter_dir
        A folder with ``adapter_model.safetensors`` and ``ccclip_adapter.json`` (a LoRA ``checkpoint-N``,
        ``best/`` or ``final/adapter``).
    strict
        Refuse a base whose fingerprint differs from the one the adapters were trained on.

    Returns
    -------
    ClipModel
        A new model with merged weights; save it with :func:`~ccclip_widgets.models.save_checkpoint` and it loads
        with ``load_model`` and plain open_clip.
    """
    folder = Path(adapter_dir)
    meta_path = folder / ADAPTER_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} is not a LoRA adapter folder (no {ADAPTER_META})")
    meta = json.loads(meta_path.read_text())
    base_fp = meta.get("base_model", {}).get("fingerprint")
    if strict and base_fp and base_fp != clip.fingerprint:
        raise ValueError(
            f"The adapters in {folder} were trained on a base model with fingerprint {base_fp}, but the model "
            f"given has {clip.fingerprint} ({clip.spec}). Load the same base model, or pass strict=False."
        )
    settings = LoraSettings.from_dict(meta["lora"])
    model = copy.deepcopy(clip.model)
    with torch.random.fork_rng(devices=[]):  # adapter init draws random numbers; they are overwritten anyway
        handle = inject_lora(model, settings)
    if handle.modules != meta["target_modules"] or handle.parameters != meta["target_parameters"]:
        raise ValueError(f"The adapters in {folder} target other layers than this architecture offers")
    load_adapter(folder, model, handle)
    merged = handle.merge()
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(True)
    out = dataclasses.replace(clip, model=merged, _fingerprint=None)
    out.provenance = {**clip.provenance, "lora_merged_from": str(folder)}
    return out
