"""``python -m monta.testbed [options] -- COMMAND ...`` (see :mod:`monta.testbed.launcher`)."""

import sys

from monta.testbed.launcher import main

if __name__ == "__main__":
    sys.exit(main())
