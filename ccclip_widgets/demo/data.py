"""The demo-data build script, loaded from ``tools/build_demo_data.py`` of a source checkout.

Building the demo data runs ``apt-get`` and reads Debian's openclipart packages: a maintainer's tool, not part of
the installed package. In a source checkout this module is that script (run in this module's namespace, so its
names import from here as before: ``from ccclip_widgets.demo.data import build_demo_data``). In an installed
package it raises :class:`~ccclip_widgets.errors.MissingDependencyError` saying where to get the script; the
demo data itself ships with the package (see :func:`ccclip_widgets._io.repo_data_dir`).
"""

from __future__ import annotations

from .._io import source_checkout
from ..errors import MissingDependencyError

_checkout = source_checkout()
_script = _checkout / "tools" / "build_demo_data.py" if _checkout is not None else None
if _script is None or not _script.is_file():
    raise MissingDependencyError(
        "building the demo data needs a source checkout of ccclip_widgets (tools/build_demo_data.py is not "
        "installed with the package): git clone the repository, `pip install -e .` there, then run "
        "`ccclip demo build-data`. The built demo data already ships with the package."
    )
exec(compile(_script.read_text("utf-8"), str(_script), "exec"), globals())
