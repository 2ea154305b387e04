"""The two planner tables (issue 24): ROUTES for conversions, COMMANDS for combine and verify; every entry
imports, and the API reaches combine and verify through the table, not by importing their modules."""

from __future__ import annotations

import inspect

import pytest

import lora_convert as lc
from lora_convert import routes


def test_every_entry_of_both_tables_is_a_planner():
    for form, to in routes.ROUTES:
        assert callable(routes.planner(form, to))
    assert set(routes.COMMANDS) == {"combine", "verify"}
    assert [p.__name__ for p in map(routes.command_planner, sorted(routes.COMMANDS))] == ["plan_combine", "plan_verify"]
    assert list(inspect.signature(routes.command_planner("verify")).parameters)[:2] == ["req", "merged"]


class _Called(Exception):
    pass


@pytest.mark.parametrize("name", ["combine", "verify"])
def test_the_api_looks_them_up_in_the_table(monkeypatch, tmp_path, name):
    def stub(*args, **kwargs):
        raise _Called(name)

    monkeypatch.setattr(routes, "_load", lambda found: stub)
    with pytest.raises(_Called, match=name):
        if name == "combine":
            lc.combine(["fixtures/tiny-llama-lora"], output=tmp_path / "c", method="cat")
        else:
            lc.verify("fixtures/tiny-llama-merged", base="fixtures/tiny-llama-base", adapter="fixtures/tiny-llama-lora")
