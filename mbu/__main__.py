"""``python -m mbu``: the ``mbu`` command."""

import sys

from mbu.cli import main

sys.exit(main())
