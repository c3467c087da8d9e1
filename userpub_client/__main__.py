"""``python -m userpub_client``: the standalone client command."""

import sys

from userpub_client.cli import main

sys.exit(main())
