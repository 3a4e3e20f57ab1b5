"""The demo-data builder, loaded from the package ``tools/demo_data`` of a source checkout.

Building the demo data runs ``apt-get`` and reads Debian's openclipart packages: a maintainer's tool, not part
of the installed package. In a source checkout this module *is* that package: it loads ``tools/demo_data`` under
this module's name, so its names import from here as before (``from ccclip_widgets.demo.data import
build_demo_data``) and its modules are ``ccclip_widgets.demo.data.<module>`` (importable by name again in the
worker processes that decode the PNGs). In an installed package it raises
:class:`~ccclip_widgets.errors.MissingDependencyError` saying where to get the builder; the demo data itself
ships with the package (see :func:`ccclip_widgets._io.repo_data_dir`).
"""

from __future__ import annotations

import importlib.util
import sys

from .._io import source_checkout
from ..errors import MissingDependencyError

_checkout = source_checkout()
_package = _checkout / "tools" / "demo_data" if _checkout is not None else None
if _package is None or not (_package / "__init__.py").is_file():
    raise MissingDependencyError(
        "building the demo data needs a source checkout of ccclip_widgets (tools/demo_data is not installed "
        "with the package): git clone the repository, `pip install -e .` there, then run "
        "`ccclip demo build-data`. The built demo data already ships with the package."
    )
_spec = importlib.util.spec_from_file_location(
    __name__, _package / "__init__.py", submodule_search_locations=[str(_package)]
)
assert _spec is not None and _spec.loader is not None
_module = importlib.util.module_from_spec(_spec)
# The import system hands out whatever sys.modules holds under this name once this module has run.
sys.modules[__name__] = _module
_spec.loader.exec_module(_module)
