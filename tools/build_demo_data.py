"""Build the offline demo data set: ``python tools/build_demo_data.py [flags]`` runs ``ccclip demo build-data``.

The builder itself is the package ``tools/demo_data`` (see its docstring), which ``ccclip_widgets.demo.data``
loads from a source checkout.
"""

from __future__ import annotations

if __name__ == "__main__":
    import sys

    from ccclip_widgets.cli import main

    sys.exit(main(["demo", "build-data", *sys.argv[1:]]))
