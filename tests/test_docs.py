"""The documentation's code runs and its claims hold.

Every ```python block of docs/tutorial_custom_pass.md is executed, in order, in one namespace
(the tutorial's sections build on each other); the tutorial's own ``assert`` statements are the
checks. Tracebacks point at the line of the Markdown file.
"""

from __future__ import annotations

import inspect
import re
import sys
import types
from pathlib import Path

import pytest

import graphopt
from graphopt import errors
from graphopt.passes import base as pass_infra
from graphopt.targets.base import available_targets

DOCS = Path(__file__).resolve().parent.parent / "docs"
TUTORIAL = DOCS / "tutorial_custom_pass.md"
ARCHITECTURE = DOCS / "architecture.md"

_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """The ```python blocks of ``path`` as (line number of the block's first code line, code)."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep passes the tutorial registers out of the global registry seen by other tests."""
    monkeypatch.setattr(pass_infra, "_REGISTERED", dict(pass_infra._REGISTERED))


def test_tutorial_has_code_for_every_section() -> None:
    blocks = python_blocks(TUTORIAL)
    assert len(blocks) >= 10
    code = "\n".join(source for _, source in blocks)
    for needed in (
        "@register_pass",
        "Rule(",
        "RewriteRules(",
        'on_error="rollback"',
        "class NodeCounter(Instrument)",
        "IRDumpInstrument(",
        "tolerance_scale=",
    ):
        assert needed in code, f"the tutorial no longer shows {needed}"


def test_tutorial_code_runs(
    clean_registry: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A real module, as a reader's script would be: dataclasses look classes' modules up in sys.modules.
    module = types.ModuleType("tutorial_custom_pass")
    module.__file__ = str(TUTORIAL)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for line, source in python_blocks(TUTORIAL):
        # Pad with blank lines so that tracebacks and assertion errors name the Markdown line;
        # dont_inherit: this file's `from __future__ import annotations` must not leak into the tutorial.
        code = compile("\n" * (line - 1) + source, str(TUTORIAL), "exec", dont_inherit=True)
        exec(code, module.__dict__)
    assert "approximate-gelu" in graphopt.available_passes()
    printed = capsys.readouterr().out
    assert "near-misses:\n  matmul_add: 1× not applied (weight is computed at run time)" in printed
    assert "rolled back: gelu-to-relu" in printed


def test_tutorial_registration_does_not_leak() -> None:
    assert "approximate-gelu" not in graphopt.available_passes()


def test_architecture_names_every_pass_error_and_target() -> None:
    text = ARCHITECTURE.read_text()
    for name in sorted(pass_infra._BUILTIN):
        assert f"`{name}`" in text, f"docs/architecture.md does not list the built-in pass {name!r}"
    for name, cls in inspect.getmembers(errors, inspect.isclass):
        if issubclass(cls, errors.GraphoptError):
            assert f"`{name}`" in text, f"docs/architecture.md does not explain {name}"
    for name in available_targets():
        assert f"`{name}`" in text, f"docs/architecture.md does not describe the {name!r} target"
    for name in graphopt.DEFAULT_PIPELINE:
        assert name in text
