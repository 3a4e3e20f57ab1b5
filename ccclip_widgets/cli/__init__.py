"""``ccclip``: the toolkit's command line, over the same functions the notebook widgets use.

::

    ccclip embed POSTS --model SPEC --out DIR        # per-post embeddings.parquet, store, rejects, summary
    ccclip finetune POSTS --model SPEC --out DIR     # contrastive fine-tuning with checkpoints and resume
    ccclip eval POSTS --model A [--model B] --out gap.csv
    ccclip demo [build-data | build-model]           # the offline demo, and the builders of its data and model

One parser: the shared flags are defined once (:mod:`._common`), each subcommand lives in its own module and
is imported only when it runs (``ccclip --help`` imports no torch), and every toolkit error ends in a documented
exit code with one line on stderr (:data:`ccclip_widgets.errors.EXIT_CODES`; ``--debug`` adds the traceback).
The same entry point runs under ``torchrun``: ``torchrun --nproc_per_node 4 -m ccclip_widgets.cli embed ...``.
See ``docs/cli.md`` for the full reference.
"""

from __future__ import annotations

import importlib
import logging
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from ..errors import CommandImportError, exit_code_for
from ._common import Parser, add_global_flags

__all__ = ["COMMANDS", "build_parser", "main"]

#: Subcommand -> (module, one-line help). The module is imported only when its subcommand runs or is asked for
#: help; it defines ``add_arguments(parser)`` and ``run(args) -> int`` (and may define ``INTERRUPTED``).
COMMANDS: dict[str, tuple[str, str]] = {
    "embed": ("embed", "embed a posts table: per-post embeddings.parquet, a resumable store, rejects"),
    "finetune": ("finetune", "contrastive fine-tuning (C-CLIP) with checkpoints and resume"),
    "eval": ("eval", "retrieval metrics (R@k, ranks) per caption kind and language for one or more models"),
    "demo": (
        "demo",
        "the offline demo (gap, fine-tuning, JupyterLab) and the builders of its data and model",
    ),
}

_DESCRIPTION = "Explore and fine-tune CLIP on social-media posts (C-CLIP), headless. See docs/cli.md."


def load_command(name: str) -> Any:
    """Import a subcommand's module.

    Raises
    ------
    CommandImportError
        Naming the subcommand, when its module (or something it imports at load time) cannot be imported.
    """
    module = COMMANDS[name][0]
    try:
        return importlib.import_module(f"{__name__}.{module}")
    except Exception as exc:
        raise CommandImportError(
            f"the '{name}' command cannot be loaded ({type(exc).__name__}: {exc}); the installation is broken "
            "or incomplete: reinstall ccclip_widgets"
        ) from exc


def build_parser(load: Sequence[str] | None = None) -> Parser:
    """The ``ccclip`` parser.

    Parameters
    ----------
    load
        Subcommands whose arguments are added (their modules are imported); default every subcommand. The
        others are listed with their help line only.

    Returns
    -------
    Parser
    """
    load = list(COMMANDS) if load is None else list(load)
    parser = Parser(prog="ccclip", description=_DESCRIPTION)
    add_global_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name, (_, help_line) in COMMANDS.items():
        if name not in load:
            sub.add_parser(name, help=help_line, add_help=False)
            continue
        mod = load_command(name)
        p = sub.add_parser(name, help=help_line, description=getattr(mod, "DESCRIPTION", help_line))
        mod.add_arguments(p)
        add_global_flags(p)
        p.set_defaults(_module=mod)
    return parser


def _chosen(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is one), without parsing anything."""
    for word in argv:
        if word in COMMANDS:
            return word
        if not word.startswith("-"):
            return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ccclip`` command.

    Parameters
    ----------
    argv
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status: 0 on success, else the code of :data:`ccclip_widgets.errors.EXIT_CODES` (2 for bad
        arguments, 130 when interrupted).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _chosen(argv)
    debug = "--debug" in argv
    prog = f"ccclip {command}" if command else "ccclip"
    mod = None
    try:
        parser = build_parser(load=[command] if command else [])
        args = parser.parse_args(argv)
        debug = bool(getattr(args, "debug", False))
        logging.basicConfig(
            level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
        )
        mod = args._module
        return int(mod.run(args) or 0)
    except KeyboardInterrupt:
        hint = getattr(mod, "INTERRUPTED", "")
        print(f"\n{prog}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130
    except Exception as exc:
        code = exit_code_for(exc)
        if debug:
            traceback.print_exc()
        text = " ".join(str(exc).split()) or type(exc).__name__
        if code == 1:
            text = f"unexpected {type(exc).__name__}: {text}" + (
                "" if debug else " (rerun with --debug for the traceback)"
            )
        print(f"{prog}: error: {text}", file=sys.stderr)
        return code
