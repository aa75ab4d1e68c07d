"""``torchrun ... -m graphopt.pipeline DIR``: run saved pipeline stages (``graphopt.workflows.distributed``)."""

import sys

from graphopt.workflows.distributed import main

if __name__ == "__main__":
    sys.exit(main())
