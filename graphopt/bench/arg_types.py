"""argparse value types shared by the option groups of ``graphopt bench`` (zoo, ``--quantize``, ``--generation``)."""

from __future__ import annotations

import argparse

__all__ = ["positive_int"]


def positive_int(text: str) -> int:
    """A whole number of at least 1, or ``argparse.ArgumentTypeError`` saying what was given."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
