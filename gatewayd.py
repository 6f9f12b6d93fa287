#!/usr/bin/env python3
"""gatewayd: the hospital front-end gateway.  Same entry point as the installed ``gatewayd`` command."""

import sys

from gateway.cli import main

if __name__ == "__main__":
    sys.exit(main())
