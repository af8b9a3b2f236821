"""``python -m training`` is ``ddpg train``."""

import sys

from control_node.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
