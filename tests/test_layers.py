"""The layers of docs/architecture.md, enforced: every import inside lora_convert (at module level or inside a
function, absolute or relative) must go from a module to one of the layers its own layer may use.

The table below is the one docs/architecture.md draws; a module missing from it fails the test, so a new
module has to be given its place (and the doc its line)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "lora_convert"

# layer: the modules in it (dotted, without "lora_convert."; a trailing ".*" takes a whole sub-package)
LAYERS: dict[str, list[str]] = {
    "util": ["errors", "text", "fmt", "progress", "third_party", "bounds"],
    "io": ["io", "io.*", "folder"],
    "math": [
        "lora_math",
        "svd",
        "closeness",
        "combine_math",
        "difference",
        "tuner_math",
        "oft_math",
        "additive_math",
        "quant",
        "quant.*",
    ],
    "facts": ["arch", "moe_layouts", "diffusion_names", "module_order"],
    "meaning": [
        "dialects",
        "dialects.*",
        "dialects.peft_common",
        "inventory",
        "config",
        "module_match",
        "inputs",
        "stack",
    ],
    "jobs": ["pipeline"],
    "plans": ["routes", "routes.*"],
    "requests": ["options", "requests"],
    "assembly": ["assemble", "card", "dry_run"],
    "surface": ["", "api", "detection", "costs", "compare", "logits_check", "spectrum", "fleet", "cluster"],
    "cli": ["cli", "cli_args", "cli_output", "render"],
}

# layer: the layers it may import from (its own included)
MAY_IMPORT: dict[str, set[str]] = {
    "util": {"util"},
    "math": {"util", "math"},
    "io": {"util", "io", "math"},  # quantized readers dequantize with quant/'s math; nothing knows LoRA
    "facts": {"util", "facts"},
    "meaning": {"util", "io", "math", "facts", "meaning"},
    "jobs": {"util", "io", "math", "jobs"},
    "plans": {"util", "io", "math", "facts", "meaning", "jobs", "plans"},
    "requests": {"util", "io", "math", "facts", "meaning", "plans", "requests"},
    "assembly": {"util", "io", "math", "facts", "meaning", "jobs", "plans", "requests", "assembly"},
    "surface": {"util", "io", "math", "facts", "meaning", "jobs", "plans", "requests", "assembly", "surface"},
}
# The CLI parses and prints: it reaches everything through the API, never a route, reader or I/O module (nor the
# surface's other modules: results are printed by render.py from their attributes).
CLI_MAY_IMPORT = {"api", "cli_output", "errors", "text", "fmt", "bounds"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    for layer, members in LAYERS.items():
        for m in members:
            if module == m or (m.endswith(".*") and module.startswith(m[:-1])):
                return layer
    return None


def imports_of(path: Path, here: str | None = None) -> set[str]:
    """The lora_convert modules ``path`` (the module ``here``) imports, each resolved to a module that exists."""
    here = module_name(path) if here is None else here
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    known = {module_name(p) for p in PKG.rglob("*.py")}
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "lora_convert" or node.module.startswith("lora_convert.")):
                target = node.module.removeprefix("lora_convert").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import arch` imports the module arch
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lora_convert"):
                    found.add(alias.name.removeprefix("lora_convert").lstrip("."))
    return {m for m in found if m != here}


def test_every_module_has_a_layer():
    missing = sorted(m for p in PKG.rglob("*.py") if layer_of(m := module_name(p)) is None)
    assert not missing, f"give these modules a layer (here and in docs/architecture.md): {missing}"


def test_imports_follow_the_layers():
    broken = []
    for path in sorted(PKG.rglob("*.py")):
        here = module_name(path)
        layer = layer_of(here)
        for target in sorted(imports_of(path)):
            if layer == "cli":
                ok = target in CLI_MAY_IMPORT or layer_of(target) == "cli"
            else:
                ok = layer_of(target) in MAY_IMPORT[layer or ""]
            if not ok:
                broken.append(f"{here or 'lora_convert'} ({layer}) imports {target} ({layer_of(target)})")
    assert not broken, "imports that break docs/architecture.md's layers:\n" + "\n".join(broken)


def test_the_checker_sees_a_broken_import(tmp_path):
    """Relative imports are resolved, in functions too: a math module reaching up into I/O is caught."""
    probe = tmp_path / "probe.py"
    probe.write_text("from .io.reader import Checkpoint\n\n\ndef f():\n    from . import arch\n")
    assert imports_of(probe, "svd_probe") == {"io.reader", "arch"}
    assert layer_of("io.reader") not in MAY_IMPORT[layer_of("svd")]
    assert layer_of("arch") not in MAY_IMPORT[layer_of("svd")]
