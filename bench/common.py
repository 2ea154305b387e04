"""Helpers shared by the benchmark scripts: how to call lora-convert, reading tensors
from a (sharded) safetensors folder, folder sizes, and plain-text tables."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from measure import Measurement, measure
from safetensors import safe_open

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
OUT_ROOT = BENCH_DIR / "out"  # git-ignored


def lora_convert_cmd(override: str | None = None) -> list[str]:
    """argv prefix for our CLI: ``--tool-cmd`` if given, else ``python -m lora_convert.cli``
    run with the repo root on PYTHONPATH (works without installing the package)."""
    if override:
        return shlex.split(override)
    return [sys.executable, "-m", "lora_convert.cli"]


def child_env() -> dict[str, str]:
    """Environment for the measured children: the repo root importable, no tokenizer
    thread pools fighting over the 2 cores, progress bars off where a library honours it."""
    env = {}
    pp = os.environ.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pp if pp else "")
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    return env


def rm(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def folder_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class TensorFolder:
    """Read tensors by name from a folder of safetensors files (any file names, sharded
    or not): an index of name -> file is built from the files' headers."""

    def __init__(self, folder: Path, pattern: str = "*.safetensors") -> None:
        self.folder = Path(folder)
        self.where: dict[str, Path] = {}
        for f in sorted(self.folder.glob(pattern)):
            with safe_open(f, "pt") as sf:
                for k in sf.keys():
                    self.where[k] = f
        self._open: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, name: str):
        f = self.where[name]
        if f not in self._open:
            self._open[f] = safe_open(f, "pt")
        return self._open[f].get_tensor(name)


def measure_tool(
    tool: str,
    cmd: Sequence[str],
    out: Path | None,
    *,
    cache: str,
    inputs: Sequence[Path],
    timeout: float | None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    label: str = "",
) -> Measurement:
    """One measured run of ``tool``: its output ``out`` removed first, the command said on stderr, the output's
    size recorded (``extra["out_bytes"]``), a failure said on stderr.  ``label`` prefixes those lines."""
    if out is not None:
        rm(out)
    print(f"[bench] {label}{tool}: {' '.join(cmd)}", file=sys.stderr)
    m = measure(
        cmd,
        cache=cache,
        inputs=inputs,
        env=env if env is not None else child_env(),
        cwd=cwd or str(REPO_ROOT),
        timeout=timeout,
    )
    m.extra["out_bytes"] = folder_bytes(out) if out is not None else 0
    if not m.ok:
        print(f"[bench] {label}{tool} failed: {m.failure()}", file=sys.stderr)
    return m


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def fmt(v, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: set[int] | None = None) -> str:
    """A plain-text table; columns listed in ``right`` are right-aligned."""
    right = right if right is not None else set(range(1, len(headers)))
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False))
        ).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"
