"""What a route reports besides the tensors it wrote: one object on ``Plan.report`` and ``ConvertResult.report``.

The generic layers never name a route's report: the assembly hands ``Plan.report`` to the result, the result
merges ``report.to_dict()`` into its ``--json`` document, and the renderer prints ``tables()``,
``summary_lines()`` and ``notes()`` where a conversion's text output has room for them.  So a new route is
its planner plus its report class (the extraction's :class:`~.extract.Extraction`, the unmerge's
:class:`~.unmerge.Unmerge`, ``--requantize``'s :class:`~.requantize.Requantization`), with no edit to the plan,
the assembly, the CLI or the renderer.  The model card is the planner's (``Plan.card_lines``,
``Plan.card_tables``), which reads the report as it likes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class TextTable:
    """A table for the terminal: its title, column heads and rows of cells (the renderer draws it)."""

    title: str
    head: list[str]
    rows: list[list[str]]


class RouteReport(Protocol):
    """A route's account of what it did (None on routes that have nothing to add)."""

    def to_dict(self) -> dict[str, Any]:
        """Keys merged into the ``conversion/1`` document, beside the common ones (``docs/json.md``)."""
        ...

    def tables(self) -> list[TextTable]:
        """Tables printed above the ``wrote`` line."""
        ...

    def summary_lines(self, total_bytes: int) -> list[str]:
        """Lines printed under those tables, above the ``wrote`` line (``total_bytes``: the output's size)."""
        ...

    def notes(self) -> list[str]:
        """Lines printed under the ``wrote`` line, indented like the ops and config edits."""
        ...
