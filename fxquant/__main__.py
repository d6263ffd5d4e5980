"""``python -m fxquant``: the ``fxquant`` command (see :mod:`fxquant.cli`)."""

import sys

from fxquant.cli import main

if __name__ == "__main__":
    sys.exit(main())
