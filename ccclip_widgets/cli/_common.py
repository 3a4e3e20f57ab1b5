"""What every ``ccclip`` subcommand shares: its flags (each defined once), reading posts, torchrun set-up.

Imports nothing heavy at module level: ``ccclip SUB --help`` must stay fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError

#: Each shared flag, defined once. A subcommand picks the ones it takes with :func:`add_flags` and may adjust
#: a field (``required``, ``help`` for ``--out``) where its meaning differs.
FLAGS: dict[str, dict[str, Any]] = {
    "--model": {
        "metavar": "SPEC",
        "help": "model spec: demo, ARCH:TAG, ARCH:/weights.safetensors, local-dir:DIR, or a checkpoint DIR",
    },
    "--out": {"help": "output folder"},
    "--image-root": {
        "metavar": "DIR",
        "default": None,
        "help": "folder that relative image paths are read from, and that every image must lie under "
        "(default: the posts table's folder)",
    },
    "--device": {"default": None, "help": "cuda, cuda:1, mps or cpu (default: the best available)"},
    "--allow-random": {
        "action": "store_true",
        "help": "allow ARCH:random (untrained weights), e.g. for smoke tests",
    },
    "--no-progress": {"action": "store_true", "help": "no progress bars"},
}

#: Flags every subcommand takes (also accepted before the subcommand). SUPPRESS keeps a subcommand's parser
#: from overwriting a value given before it.
GLOBAL_FLAGS: dict[str, dict[str, Any]] = {
    "--debug": {
        "action": "store_true",
        "default": argparse.SUPPRESS,
        "help": "on an error, print the full traceback (default: one line)",
    },
    "--verbose": {"action": "store_true", "default": argparse.SUPPRESS, "help": "log more (INFO level)"},
}


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (``ccclip SUB: error: ...``), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_flags(parser: argparse.ArgumentParser, *names: str, **changes: dict[str, Any]) -> None:
    """Add shared flags to a subcommand's parser.

    Parameters
    ----------
    parser
        The subcommand's parser.
    *names
        Flags from :data:`FLAGS`, e.g. ``"--model"``.
    **changes
        Per-flag adjustments keyed by the flag's dest (``out={"required": True, "help": ...}``).
    """
    for name in names:
        spec = {**FLAGS[name], **changes.get(name.lstrip("-").replace("-", "_"), {})}
        parser.add_argument(name, **spec)


def add_global_flags(parser: argparse.ArgumentParser, *, top: bool = False) -> None:
    """``--debug`` and ``--verbose``: on the top parser (defaults False) and on every subcommand's parser."""
    for name, spec in GLOBAL_FLAGS.items():
        spec = {**spec, "default": False} if top else spec
        flags = [name, "-v"] if name == "--verbose" else [name]
        parser.add_argument(*flags, **spec)


def posts_path(value: str) -> str:
    """Check that a posts table exists before anything heavy is loaded."""
    if not os.path.exists(value):
        raise FileNotFoundError(f"posts table not found: {value}")
    return value


def read_posts_checked(
    path: str,
    *,
    image_root: str | None,
    rejects_to: Path | None,
    **kwargs: Any,
) -> Any:
    """Read a posts table, write its rejects (when any, to ``rejects_to``) and insist that a row is usable.

    Raises
    ------
    NoUsablePostsError
        When every row was rejected (after the rejects were written).
    """
    from ..posts import read_posts

    posts = read_posts(posts_path(path), image_root=image_root, **kwargs)
    if rejects_to is not None and posts.n_rejected:
        posts.write_rejects(rejects_to)
    posts.require_usable(rejects_file=rejects_to if posts.n_rejected else None)
    return posts


def setup_distributed(device: str | None) -> tuple[Any, str | None]:
    """Join the process group when launched by ``torchrun`` (see :func:`ccclip_widgets.distributed.setup_distributed`)."""
    from ..distributed import setup_distributed as setup

    return setup(device)


def finish_distributed(info: Any) -> None:
    """Wait for every process, then leave the process group (no-op for one process)."""
    from ..distributed import finish_distributed as finish

    finish(info)


def out_suffix(value: str, allowed: dict[str, str], flag: str = "--out") -> str:
    """The kind of file ``value`` names by its suffix (e.g. ``"csv"``), or a :class:`UsageError`."""
    kind = allowed.get(Path(value).suffix.lower())
    if kind is None:
        raise UsageError(f"{flag} must end in {' or '.join(sorted(allowed))}, got {value!r}")
    return kind


def stdout_line(text: str) -> None:
    """Print to stdout (results); stderr is kept for progress, warnings and the one-line error."""
    print(text, file=sys.stdout, flush=True)
