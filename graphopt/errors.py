"""Exception classes: every error graphopt raises says what went wrong and what to do."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


class GraphoptError(Exception):
    """Base class of every error graphopt raises on purpose."""


class SaveFileError(GraphoptError, ValueError):
    """A saved graphopt model is missing, truncated, corrupt or not a graphopt save (names the file)."""


class InputError(GraphoptError, ValueError):
    """The model or its example inputs are not something graphopt can work with."""


class CaptureError(GraphoptError):
    """The model could not be captured into a graph (names the offending source line)."""

    def __init__(self, message: str, source_line: str | None = None) -> None:
        super().__init__(message)
        self.source_line = source_line


class PassError(GraphoptError):
    """A pass raised, or produced a graph that fails verification."""

    def __init__(self, message: str, pass_name: str, node: str | None = None) -> None:
        super().__init__(message)
        self.pass_name = pass_name
        self.node = node
        self.report: Any = None  # the partial optimization report, attached by the pass manager
        self.recoverable = True  # False when the failure cannot be undone by rolling the pass back


class VerificationError(PassError):
    """A pass changed what the graph computes (outputs differ beyond tolerance) or broke it."""


class FidelityError(PassError):
    """A lossy pass (quantization, pruning) cannot meet the fidelity budget, even with fallbacks."""

    def __init__(self, message: str, pass_name: str) -> None:
        super().__init__(message, pass_name)
        self.best: Any = None  # the best Measurement reached


class StateError(GraphoptError):
    """Running a graph wrote into a tensor it must treat as constant (a weight, a folded constant)."""


class RollbackWarning(UserWarning):
    """A pass failed verification and was undone; the pipeline went on without it."""


def warn_caller(message: str, category: type[Warning]) -> None:
    """Warn, pointing at the first frame outside graphopt: the user's line that called it, however deep."""
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


class UnknownPassError(GraphoptError, KeyError):
    """No pass is registered under the requested name."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


class UnknownTargetError(GraphoptError, ValueError):
    """``target=`` names no known backend."""


class LoweringError(GraphoptError):
    """A target could not lower the optimized graph."""


class UnsupportedOpError(LoweringError):
    """The graph holds an op that the target cannot lower (names the op and the node)."""

    def __init__(self, message: str, op: str, nodes: list[str]) -> None:
        super().__init__(message)
        self.op = op
        self.nodes = nodes


class DeviceUnavailableError(LoweringError):
    """The target needs a device this machine does not have (e.g. CUDA for target='gpu')."""
