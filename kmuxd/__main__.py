"""``python -m kmuxd``: the same as the ``kmuxd`` command."""

import sys

from kmuxd.main import main

sys.exit(main())
