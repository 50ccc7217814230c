"""``python -m cli``: the ``posflow`` command."""

import sys

from cli.main import main

sys.exit(main())
