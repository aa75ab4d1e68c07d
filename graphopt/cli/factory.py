"""Load the model (or data) factory a command line names as ``FILE.py:FACTORY``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from graphopt.errors import InputError

__all__ = ["load_factory"]


def load_factory(spec: str) -> Any:
    """Import ``FILE.py:FACTORY`` and return the object it names."""
    path_text, sep, attribute = spec.rpartition(":")
    if not sep or not path_text or not attribute:
        raise InputError(f"expected FILE.py:FACTORY, got {spec!r} (e.g. models.py:build_model)")
    path = Path(path_text)
    if not path.is_file():
        raise InputError(f"model file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    if not hasattr(module, attribute):
        names = sorted(n for n in vars(module) if not n.startswith("_") and callable(vars(module)[n]))
        raise InputError(f"{path} has no {attribute!r}; callables there: {', '.join(names) or 'none'}")
    return getattr(module, attribute)
