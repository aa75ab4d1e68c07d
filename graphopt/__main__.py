"""Run the ``graphopt`` command with ``python -m graphopt``."""

import sys

from graphopt.cli import main

sys.exit(main())
