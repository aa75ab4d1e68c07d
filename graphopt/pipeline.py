"""The ``torchrun ... -m graphopt.pipeline DIR`` command: runs saved pipeline stages (see ``graphopt.workflows.distributed``)."""

import sys

from graphopt.workflows.distributed import main

if __name__ == "__main__":
    sys.exit(main())
