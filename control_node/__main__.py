"""``python -m control_node`` is the ``ddpg`` command."""

import sys

from control_node.cli import main

sys.exit(main())
