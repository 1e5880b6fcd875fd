"""``python -m kmuxd.tools.soak``: the same as ``./dev.sh soak`` (see the package docstring)."""

import sys

from kmuxd.tools.soak import main

sys.exit(main())
