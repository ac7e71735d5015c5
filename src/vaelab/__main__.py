"""``python -m vaelab``: the same as the ``vaelab`` command."""

import sys

from vaelab.cli import main

if __name__ == "__main__":
    sys.exit(main())
