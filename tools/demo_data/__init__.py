"""Build the offline demo data set from Debian's openclipart packages (a build tool: not shipped in the wheel).

Run it as ``ccclip demo build-data`` (or ``python tools/build_demo_data.py``, the same flags) from a source
checkout; ``ccclip_widgets.demo.data`` loads this package there (as itself: its modules are then
``ccclip_widgets.demo.data.<module>``), and says what is missing in an installed package.

The demo needs image + text pairs that ship with the repository and need no network: public-domain clip art
from the Debian packages ``openclipart-png`` (rendered PNGs) and ``openclipart-svg`` (the same drawings as SVG,
whose embedded RDF/Dublin Core block holds the title, description and keywords).

:func:`build_demo_data` reads both, drops junk for a counted reason, writes one descriptive English caption per
image, and splits the good images into two disjoint pools:

* the **demo** set (``data/demo``): ``n_demo`` images stratified over the package's topic folders, with a fixed
  train/test split by near-duplicate group, one descriptive post per image plus the commentative posts that the
  committed caption files ``ccclip_widgets/demo/captions/commentative_*.csv`` provide;
* the **stand-in** pool (a cache folder): every other good image with its descriptive caption only, used to
  train the small stand-in CLIP.

Nothing is dropped silently: the returned summary counts every reason. The selection depends only on the
package contents, ``n_demo`` and ``seed`` (all orderings use SHA-256 of stable keys, never a random number
generator), so a rebuild gives the same image ids; the caption files depend on that. Once written, the
caption writers' worklist (``captions/worklist.csv``) pins the demo images and their splits, so that even a
library version that nudged the near-duplicate grouping cannot move them (``selection_drift`` reports it).

The modules, in pipeline order:

* :mod:`.openclipart`: find (or install) the packages, read each drawing's SVG metadata;
* :mod:`.text`: clean titles, descriptions and keywords, write the descriptive caption;
* :mod:`.images`: decode the PNGs safely into thumbnails and duplicate fingerprints;
* :mod:`.selection`: near-duplicate groups and the stratified demo draw with its train/test split;
* :mod:`.captions`: the commentative caption files, the worklist, and writing the pools;
* :mod:`.build`: :func:`build_demo_data`, the pipeline that runs them.
"""

from __future__ import annotations

from .build import build_demo_data
from .captions import (
    CAPTION_LANGS,
    LICENSE,
    POST_COLUMNS,
    CaptionError,
    default_standin_dir,
    read_commentative_captions,
)
from .openclipart import (
    DEFAULT_PNG_ROOT,
    DEFAULT_SVG_ROOT,
    ClipartRecord,
    ensure_openclipart,
    read_svg_metadata,
    scan_openclipart,
)
from .text import descriptive_caption

__all__ = [
    "CAPTION_LANGS",
    "DEFAULT_PNG_ROOT",
    "DEFAULT_SVG_ROOT",
    "LICENSE",
    "POST_COLUMNS",
    "CaptionError",
    "ClipartRecord",
    "build_demo_data",
    "default_standin_dir",
    "descriptive_caption",
    "ensure_openclipart",
    "read_commentative_captions",
    "read_svg_metadata",
    "scan_openclipart",
]
