"""One error family: every toolkit error/warning derives from CCClipError/CCClipWarning, is exported at the top
level, keeps its old import path and builtin base, and has a documented ``ccclip`` exit code."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys

import pytest

import ccclip_widgets
from ccclip_widgets import errors


def _all_toolkit_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(ccclip_widgets.__path__, "ccclip_widgets."):
        if info.name.startswith(("ccclip_widgets.widgets", "ccclip_widgets.cli")) or info.name.endswith(
            "__main__"
        ):
            continue
        names.append(info.name)
    return names


def _defined_exception_classes() -> list[type]:
    found = []
    for name in _all_toolkit_modules():
        mod = importlib.import_module(name)
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if (
                issubclass(obj, (Exception, Warning))
                and obj.__module__.startswith("ccclip_widgets")
                and not obj.__name__.startswith("_")
            ):
                found.append(obj)
    return sorted(set(found), key=lambda c: c.__name__)


def test_every_public_error_and_warning_is_in_the_family_and_exported():
    classes = _defined_exception_classes()
    # CaptionError lives in demo/data.py (the demo builder), which this module does not own
    classes = [c for c in classes if c.__name__ != "CaptionError"]
    assert len(classes) >= 20
    for cls in classes:
        assert issubclass(cls, (errors.CCClipError, errors.CCClipWarning)), cls
        assert getattr(ccclip_widgets, cls.__name__) is cls, cls
        assert cls.__name__ in ccclip_widgets.__all__
        if issubclass(cls, errors.CCClipError):
            assert errors.exit_code_for(cls.__new__(cls)) != 1 or cls is errors.CCClipError, cls


def test_old_import_paths_and_builtin_bases_still_work():
    from ccclip_widgets._io import CacheCorruptionWarning, DiskFullError
    from ccclip_widgets._lock import LockTimeout
    from ccclip_widgets.images import ImageDecodeError
    from ccclip_widgets.models import CheckpointIntegrityError, ModelLoadError, ModelUnavailableError
    from ccclip_widgets.neighbors import IndexIntegrityError
    from ccclip_widgets.posts import DuplicatePostIdError, PostsSchemaError
    from ccclip_widgets.store import StoreCorruptionWarning
    from ccclip_widgets.train import TrainingDivergedError, TrainingOutOfMemoryError
    from ccclip_widgets.train.checkpoint import CheckpointCorruptionWarning, RunInUseError

    assert issubclass(DiskFullError, OSError) and issubclass(LockTimeout, TimeoutError)
    assert issubclass(RunInUseError, RuntimeError) and issubclass(RunInUseError, LockTimeout)
    for cls in (ImageDecodeError, IndexIntegrityError, PostsSchemaError, DuplicatePostIdError):
        assert issubclass(cls, ValueError)
    for cls in (ModelLoadError, TrainingDivergedError):
        assert issubclass(cls, RuntimeError)
    assert issubclass(ModelUnavailableError, ModelLoadError) and issubclass(
        CheckpointIntegrityError, ModelLoadError
    )
    assert issubclass(StoreCorruptionWarning, CacheCorruptionWarning)
    assert issubclass(CheckpointCorruptionWarning, UserWarning)
    import torch

    assert issubclass(TrainingOutOfMemoryError, torch.cuda.OutOfMemoryError)
    assert errors.TrainingOutOfMemoryError is TrainingOutOfMemoryError
    assert errors.exit_code_for(TrainingOutOfMemoryError("oom")) == 4


def test_errors_module_is_light():
    code = "import sys, ccclip_widgets.errors, ccclip_widgets; ccclip_widgets.LockTimeout; print(sorted(m for m in ('torch', 'polars', 'PIL', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.UsageError("x"), 2),
        (errors.NoUsablePostsError("x"), 5),
        (FileNotFoundError("x"), 5),
        (errors.ModelUnavailableError("x"), 7),
        (errors.CheckpointIntegrityError("x"), 6),
        (errors.RunInUseError("x"), 8),
        (errors.DiskFullError(28, "full"), 10),
        (errors.MissingDependencyError("x"), 11),
        (ValueError("x"), 1),
    ],
)
def test_exit_codes_follow_the_mro(exc, code):
    assert errors.exit_code_for(exc) == code


def test_no_public_docstring_names_a_private_module():
    bad = re.compile(r"ccclip_widgets\._[a-z]")
    for name in _all_toolkit_modules():
        mod = importlib.import_module(name)
        if name.rsplit(".", 1)[-1].startswith("_"):
            continue
        for attr in getattr(mod, "__all__", []):
            obj = getattr(mod, attr, None)
            doc = inspect.getdoc(obj) or ""
            assert not bad.search(doc), (name, attr)
            for _, member in inspect.getmembers(
                obj, lambda m: inspect.isfunction(m) or isinstance(m, property)
            ):
                assert not bad.search(inspect.getdoc(member) or ""), (name, attr, member)
