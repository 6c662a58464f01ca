"""``python -m cnnserve``: the same as the ``cnnserve`` command."""

import sys

from cnnserve.cli import main

sys.exit(main())
