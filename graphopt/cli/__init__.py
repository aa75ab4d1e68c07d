"""The ``graphopt`` command line: ``optimize``, ``partition``, ``bench``, ``demo``."""
