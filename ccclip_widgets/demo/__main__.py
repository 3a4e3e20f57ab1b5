"""``python -m ccclip_widgets.demo build-data|build-model``: the same as ``ccclip demo build-data|build-model``.

Kept so the commands printed in data/README.md and by the demo loaders keep working; the one parser is
``ccclip``'s (:mod:`ccclip_widgets.cli`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ccclip demo ARGS``.

    Parameters
    ----------
    argv
        Arguments without the program name (e.g. ``["build-data", "--no-install"]``); default ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status of ``ccclip demo`` (see ``docs/cli.md``).
    """
    from ..cli import main as ccclip_main

    return ccclip_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
