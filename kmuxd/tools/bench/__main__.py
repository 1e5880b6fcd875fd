"""``python -m kmuxd.tools.bench``: runs :func:`kmuxd.tools.bench.cli.main` (the options: ``--help``)."""

import sys

from .cli import main

sys.exit(main())
