"""``python -m ccclip_widgets.cli`` (and ``torchrun ... -m ccclip_widgets.cli``) runs ``ccclip``."""

import sys

from . import main

sys.exit(main())
