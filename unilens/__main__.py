"""``python -m unilens`` (and ``torchrun ... -m unilens``): the ``unilens`` command."""

import sys

from .ui.cli import main

if __name__ == "__main__":
    sys.exit(main())
