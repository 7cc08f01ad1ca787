"""``python -m unilens`` (and ``torchrun ... -m unilens``): the ``unilens`` command.

`unilens.ui.cli.main` returns the exit status: 0 (1: a check found a fault), 2 with ``error: ...`` for a user's
mistake, 130 with ``interrupted`` on Ctrl-C. Python imports the ``unilens`` package (torch, transformers) before this
file runs, so a Ctrl-C during that import is still Python's own ``KeyboardInterrupt``.
"""

import sys

from .ui.cli import main

if __name__ == "__main__":
    sys.exit(main())
