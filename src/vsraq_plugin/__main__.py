"""``python -m vsraq_plugin ...`` (and ``torchrun ... -m vsraq_plugin ...``): the ``vsraq`` command line."""

import sys

from .cli import main

sys.exit(main())
