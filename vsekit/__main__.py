"""``python -m vsekit ...`` is the ``vsekit`` command."""

import sys

from vsekit.cli import main

sys.exit(main())
