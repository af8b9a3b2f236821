"""``python -m models RUN_DIR`` is ``ddpg export RUN_DIR``."""

import sys

from control_node.cli import main

sys.exit(main(["export", *sys.argv[1:]]))
