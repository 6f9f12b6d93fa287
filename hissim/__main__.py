"""``python -m hissim --config PATH``: the HIS simulator (same as ``gatewayd his-sim``)."""

import sys

from hissim.cli import main

sys.exit(main(sys.argv[1:]))
