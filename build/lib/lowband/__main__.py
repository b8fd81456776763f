"""``python -m lowband``: the ``lowband`` command (:mod:`lowband.cli`)."""

import sys

from lowband.cli import main

if __name__ == "__main__":
    sys.exit(main())
