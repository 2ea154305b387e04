"""A route's report travels through the generic layers untouched: a report class the plan, the assembly and
the renderer have never heard of lands in the ``--json`` document and the text output where the protocol
(``routes/report.py``) says."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lora_convert import render
from lora_convert.assemble import ConvertResult
from lora_convert.routes.report import RouteReport, TextTable


@dataclass
class ToyReport:
    """A new route's report, known to nothing but this test."""

    moved: int

    def to_dict(self) -> dict[str, Any]:
        return {"toy_moved": self.moved}

    def tables(self) -> list[TextTable]:
        return [TextTable("toy table", ["tensor", "moved"], [["w", str(self.moved)]])]

    def summary_lines(self, total_bytes: int) -> list[str]:
        return [f"toy summary of {total_bytes} bytes"]

    def notes(self) -> list[str]:
        return ["toy note"]


def _result(report: RouteReport | None) -> ConvertResult:
    return ConvertResult("/o", "adapter->toy", "adapter", "toy", ["t.safetensors"], 1, 123, {"toy": 1}, report=report)


def test_report_keys_sit_between_the_common_keys_and_pushed():
    d = _result(ToyReport(7)).to_dict()
    assert list(d) == [
        "output", "route", "source_form", "target_form", "files", "tensors", "total_bytes", "ops",
        "config_changes", "warnings", "seconds", "dropped", "toy_moved", "pushed",
    ]  # fmt: skip
    assert d["toy_moved"] == 7 and "report" not in d
    assert "toy_moved" not in _result(None).to_dict()


def test_report_text_above_and_under_the_wrote_line(capsys, monkeypatch):
    from rich.console import Console

    monkeypatch.setattr(render, "out", Console(width=100, emoji=False))
    render.conversion(_result(ToyReport(7)))
    lines = capsys.readouterr().out.splitlines()
    wrote = next(i for i, ln in enumerate(lines) if ln.startswith("wrote /o"))
    assert lines[0].strip() == "toy table" and any("│ w" in ln and "7" in ln for ln in lines[:wrote])
    assert lines[wrote - 1] == "toy summary of 123 bytes"
    assert lines[wrote + 1 :] == ["  toy: 1", "  toy note"]
    json.dumps(_result(ToyReport(7)).to_dict())  # the document stays JSON-able
