"""ccclip_widgets: explore social-media posts (image + commentative text) with CLIP embeddings.

The public API is re-exported here and imported lazily, so ``import ccclip_widgets`` stays cheap and the
CLI starts fast; torch, open_clip and friends load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "models",
    "save_checkpoint": "models",
    "register_model_config": "models",
    "default_cache_dir": "_io",
    "register_model_spec": "model_registry",
    "ClipModel": "models",
    "e5_model_dir": "e5",
    "encode_e5": "e5",
    "E5UnavailableError": "errors",
    "read_posts": "posts",
    "posts_from_records": "posts",
    "Posts": "posts",
    "load_image": "images",
    "fetch_images": "fetch",
    "Fetcher": "fetch",
    "DownloadCache": "fetch",
    "embed_posts": "embed",
    "encode_images": "embed",
    "encode_texts": "embed",
    "Embeddings": "embed",
    "EmbeddingStore": "store",
    "NeighborIndex": "neighbors",
    "fit_umap": "projection",
    "project_posts": "projection",
    "evaluate_retrieval": "evaluate",
    "commentativeness": "evaluate",
    "fine_tune": "train",
    "FineTuneConfig": "train",
    "FineTuneResult": "train",
    # every error and warning the toolkit raises (see ccclip_widgets.errors)
    "CCClipError": "errors",
    "CCClipWarning": "errors",
    "CacheCorruptionWarning": "errors",
    "CheckpointCorruptionWarning": "errors",
    "CheckpointIntegrityError": "errors",
    "CommandImportError": "errors",
    "DemoFallbackWarning": "errors",
    "DiskFullError": "errors",
    "DuplicatePostIdError": "errors",
    "ImageDecodeError": "errors",
    "IndexIntegrityError": "errors",
    "InputDataError": "errors",
    "LockTimeout": "errors",
    "LowRecallWarning": "errors",
    "MissingDependencyError": "errors",
    "ModelLoadError": "errors",
    "ModelUnavailableError": "errors",
    "NoUsablePostsError": "errors",
    "NonFiniteLossWarning": "errors",
    "PostsSchemaError": "errors",
    "RandomWeightsWarning": "errors",
    "RunInUseError": "errors",
    "StoreCorruptionWarning": "errors",
    "TrainingDivergedError": "errors",
    "TrainingInterruptedError": "errors",
    "TrainingOutOfMemoryError": "errors",
    "TrainingWarning": "errors",
    "UsageError": "errors",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ccclip_widgets' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
