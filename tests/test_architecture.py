"""The package's shape holds: layers, no cycles, no private names read across modules, the generated docs current."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "graphopt"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _private_imports() -> list[str]:
    """``from graphopt.x import _name`` in graphopt where ``graphopt.x`` is another module."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("graphopt")):
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__") and node.module != importer:
                    found.append(f"{importer}:{node.lineno} imports {node.module}.{alias.name}")
    return found


def test_no_module_imports_another_modules_private_names() -> None:
    assert _private_imports() == []


def test_import_contracts_hold() -> None:
    """``lint-imports``: layers import downward only, no cycles, private modules stay private."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (pip install import-linter)")
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-4000:]


def test_architecture_doc_diagram_is_generated_from_the_current_code() -> None:
    pytest.importorskip("grimp")
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "layers.py"), "--check"], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
