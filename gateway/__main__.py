"""``python -m gateway`` is the ``gatewayd`` command."""

import sys

from gateway.cli import main

sys.exit(main())
