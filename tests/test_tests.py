"""The tests' own structure (issue 24): test files share helpers through support modules, never through each
other, and each shared harness is defined once."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# Defined once, in helpers.py or tiny.py (the model builders): a second copy drifts from the first.
SHARED = {"cli", "one_error", "assert_error", "front_door", "peft_load", "read_gguf", "peft_as_mlx", "json_any"}
SHARED |= {"diffusers_load", "slow_cli", "wait_for_temp", "temps", "PEFT_CASES", "decoder_config", "peft_unet"}


def _trees() -> dict[str, ast.Module]:
    return {p.name: ast.parse(p.read_text(), str(p)) for p in sorted(TESTS.glob("*.py"))}


def _imported_modules(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):  # imports inside functions count too
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_no_test_file_imports_another_test_file():
    trees = _trees()
    assert "test_tests.py" in trees and len(trees) > 40  # the walk sees the suite
    test_modules = {name.removesuffix(".py") for name in trees if name.startswith("test_")}
    bad = {name: sorted(_imported_modules(tree) & test_modules) for name, tree in trees.items()}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_each_shared_helper_is_defined_once():
    where: dict[str, list[str]] = {}
    for name, tree in _trees().items():
        for node in tree.body:
            targets: list[str] = []
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                targets = [node.name]
            elif isinstance(node, ast.Assign):
                targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
            for t in targets:
                if t in SHARED:
                    where.setdefault(t, []).append(name)
    assert {k: v for k, v in where.items() if len(v) > 1} == {}, where
    assert set(where) <= SHARED and {"cli", "one_error", "peft_load", "front_door"} <= set(where)
