"""Run the ``graphopt`` command with ``python -m graphopt``."""

import sys

from graphopt.cli.main import main

sys.exit(main())
