"""The printable result of a side-by-side benchmark: rows, how they were measured, and their formats."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, ClassVar

from tabulate import tabulate

__all__ = ["TableResult"]


class TableResult:
    """Mixin for dataclass results with ``rows`` (dataclasses) and ``meta`` (command, timing, machine).

    Subclasses set ``_HEADERS`` and implement ``_table()`` (one list of cells per row);
    ``str()`` is the table, ``to_markdown()`` / ``to_dict()`` are for files.
    """

    rows: list[Any]
    meta: dict[str, Any]
    _HEADERS: ClassVar[tuple[str, ...]] = ()

    def _table(self) -> list[list[Any]]:
        raise NotImplementedError

    def __str__(self) -> str:
        return tabulate(self._table(), headers=self._HEADERS, disable_numparse=True)

    def to_markdown(self) -> str:
        """The table in Markdown, with the reproducing command and machine facts."""
        lines = [tabulate(self._table(), headers=self._HEADERS, tablefmt="github", disable_numparse=True), ""]
        lines.append(f"Command: `{self.meta.get('command', '')}`; {self.meta.get('timing', '')}.")
        machine = self.meta.get("machine", {})
        if machine:
            lines.append("Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()) + ".")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON rows and metadata."""
        return {"rows": [asdict(r) for r in self.rows], "meta": self.meta}
