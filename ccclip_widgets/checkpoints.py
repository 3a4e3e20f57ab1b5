"""Checkpoint folders: save a model so that this toolkit and plain open_clip can load it, load it back, verify it.

A folder holds ``open_clip_model.safetensors``, ``open_clip_config.json`` and ``ccclip.json`` (architecture,
preprocessing, provenance, checksums). Split out of :mod:`ccclip_widgets.models`, which re-exports every name here;
model building helpers are imported from there inside the functions (models imports this module at its top).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._io import atomic_dir, blake2b_hex, folder_checksum_problem, record_file_checksums
from .errors import CheckpointIntegrityError, ModelLoadError

if TYPE_CHECKING:
    from .models import ClipModel

__all__ = [
    "CHECKPOINT_META",
    "FORMAT_VERSION",
    "OPEN_CLIP_CONFIG",
    "WEIGHTS_FILE",
    "save_checkpoint",
    "verify_checkpoint_folder",
]

CHECKPOINT_META = "ccclip.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
FORMAT_VERSION = 1


def verify_checkpoint_folder(
    folder: str | os.PathLike[str], meta_name: str, required: tuple[str, ...]
) -> None:
    """Check a checkpoint folder's files against the checksums in its JSON (``ccclip.json`` and the like).

    Parameters
    ----------
    folder
        The checkpoint folder.
    meta_name
        Its JSON file.
    required
        Files that must be covered by the checksums.

    Raises
    ------
    CheckpointIntegrityError
        Naming the damaged or missing file.
    """
    problem = folder_checksum_problem(folder, meta_name, required)
    if problem is not None:
        raise CheckpointIntegrityError(
            f"Checkpoint {folder} cannot be used: {problem}. It was not loaded; use another checkpoint (or the "
            "original copy of this one)."
        )


def _load_toolkit_checkpoint(folder: Path, device: torch.device, precision: str, *, spec: str) -> ClipModel:
    import open_clip
    from safetensors.torch import load_file

    from .models import (
        _apply_fill_color,
        _finish,
        _preprocess_kwargs,
        _quiet_transformers,
        register_model_config,
    )

    meta_path = folder / CHECKPOINT_META
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointIntegrityError(f"Unreadable checkpoint metadata {meta_path}: {exc}") from exc
    verify_checkpoint_folder(folder, CHECKPOINT_META, (meta.get("weights", WEIGHTS_FILE),))
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ModelLoadError(
            f"{meta_path} was written by a newer ccclip_widgets (format {meta['format_version']}); upgrade."
        )
    weights = folder / meta.get("weights", WEIGHTS_FILE)
    if not weights.is_file():
        raise ModelLoadError(f"Checkpoint {folder} lacks its weights file {weights.name}")
    cfg_portable = meta["model_cfg"]
    name = meta.get("architecture", folder.name)
    reg_name = f"{name if name.startswith('ccclip-') else 'ccclip-' + name}-{blake2b_hex(json.dumps(cfg_portable, sort_keys=True), 6)}"
    register_model_config(reg_name, cfg_portable)
    partial = bool(meta.get("partial", False))
    pre_cfg = meta.get("preprocess_cfg") or None
    try:
        # a partial checkpoint takes its text tower from the package; the weights are loaded right below
        with _quiet_transformers(weights_follow=True):
            model, _, preprocess = open_clip.create_model_and_transforms(
                reg_name,
                pretrained=None,
                device="cpu",
                pretrained_text=partial,
                **_preprocess_kwargs(pre_cfg),
            )
    except (RuntimeError, OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not build architecture of {folder}: {exc}") from exc
    preprocess = _apply_fill_color(model, preprocess, pre_cfg)
    state = load_file(str(weights), device="cpu")
    base = meta.get("base_checkpoint")
    if base:  # weights shared with another checkpoint (e.g. one image tower for two text towers)
        base_dir = (folder / base["folder"]).resolve()
        base_meta = json.loads((base_dir / CHECKPOINT_META).read_text(encoding="utf-8"))
        verify_checkpoint_folder(base_dir, CHECKPOINT_META, (base_meta.get("weights", WEIGHTS_FILE),))
        prefixes = tuple(base["prefixes"])
        shared = load_file(str(base_dir / base_meta.get("weights", WEIGHTS_FILE)), device="cpu")
        state = {**{k: v for k, v in shared.items() if k.startswith(prefixes)}, **state}
    target = model.state_dict()
    state = {k: v.to(target[k].dtype) if k in target else v for k, v in state.items()}
    if (
        "logit_scale" in state
        and "logit_scale" in target
        and state["logit_scale"].ndim != target["logit_scale"].ndim
    ):
        state["logit_scale"] = state["logit_scale"].reshape(target["logit_scale"].shape)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ModelLoadError(
            f"Checkpoint {folder} has weights the architecture lacks: {result.unexpected_keys[:5]}"
        )
    if result.missing_keys:
        allowed = tuple(meta.get("partial_base_prefixes", ())) if partial else ()
        bad = [k for k in result.missing_keys if not (allowed and k.startswith(allowed))]
        bad = [k for k in bad if not k.endswith("position_ids")]
        if bad:
            raise ModelLoadError(f"Checkpoint {folder} lacks weights for {len(bad)} tensors, e.g. {bad[:5]}")
    tokenizer = open_clip.get_tokenizer(reg_name)
    pre = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    provenance = dict(meta.get("provenance", {}))
    provenance.setdefault("checkpoint", str(folder))
    clip = _finish(model, preprocess, tokenizer, spec, name, cfg_portable, pre, device, precision, provenance)
    return clip


def save_checkpoint(
    clip: ClipModel,
    out_dir: str | os.PathLike[str],
    *,
    provenance: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    include: Callable[[str], bool] | None = None,
    partial_base_prefixes: tuple[str, ...] = (),
    base_checkpoint: tuple[str, tuple[str, ...]] | None = None,
) -> Path:
    """Save a model as a folder that both this toolkit and plain open_clip can load.

    The folder holds ``open_clip_model.safetensors`` (the state dict), ``open_clip_config.json`` (``model_cfg``
    and ``preprocess_cfg``, so ``open_clip.create_model('local-dir:FOLDER')`` works) and ``ccclip.json``
    (architecture, preprocessing, provenance, fingerprint, anything in ``extra``, the BLAKE2b checksum of every
    other file, and its own checksum; :func:`load_model` verifies them). It is written atomically.

    Parameters
    ----------
    clip
        The model.
    out_dir
        Destination folder (replaced if it exists).
    provenance
        How the weights were made (data, steps, hardware...).
    extra
        More JSON-serialisable fields for ``ccclip.json`` (training config, metrics, data fingerprint).
    dtype
        Store floating tensors in this dtype (e.g. ``torch.float16`` for compact demo weights).
    include
        Predicate on state-dict keys; when given, only those tensors are saved (a *partial* checkpoint whose
        other weights come from the base named in the config, e.g. a packaged text tower).
    partial_base_prefixes
        For partial checkpoints: key prefixes that are allowed to be missing (filled from the base).
    base_checkpoint
        ``(folder, prefixes)``: weights under these prefixes are read from another toolkit checkpoint folder,
        given relative to this one (e.g. ``("../demo-clip", ("visual.",))`` shares an image tower).

    Returns
    -------
    Path
        The folder.
    """
    from safetensors.torch import save_file

    from .models import _portable_cfg

    out = Path(out_dir)
    state = {}
    for k, v in clip.model.state_dict().items():
        if include is not None and not include(k):
            continue
        t = v.detach().to("cpu").contiguous()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[k] = t.clone()
    portable = _portable_cfg(clip.model_cfg)
    meta = {
        "format_version": FORMAT_VERSION,
        "architecture": clip.name,
        "model_cfg": portable,
        "preprocess_cfg": clip.preprocess_cfg,
        "weights": WEIGHTS_FILE,
        "fingerprint": clip.fingerprint,
        "partial": include is not None,
        "partial_base_prefixes": list(partial_base_prefixes),
        "base_checkpoint": (
            {"folder": base_checkpoint[0], "prefixes": list(base_checkpoint[1])} if base_checkpoint else None
        ),
        "provenance": dict(provenance or clip.provenance),
        "torch_version": torch.__version__,
    }
    try:
        import open_clip

        meta["open_clip_version"] = open_clip.__version__
    except Exception:  # pragma: no cover - version lookup only
        pass
    meta.update(dict(extra or {}))
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / OPEN_CLIP_CONFIG).write_text(
            json.dumps(
                {"model_cfg": portable, "preprocess_cfg": clip.preprocess_cfg}, indent=2, sort_keys=True
            )
        )
        (tmp / CHECKPOINT_META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        record_file_checksums(tmp, CHECKPOINT_META)
    return out
