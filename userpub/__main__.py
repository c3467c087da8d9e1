"""``python -m userpub``: the same as the ``userpub`` command."""

import sys

from userpub.cli import main

sys.exit(main())
