"""``python -m kmuxd.tools.backend``: the counting backend (:mod:`.counting`)."""

import sys

from .counting import main

sys.exit(main())
