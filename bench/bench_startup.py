"""A merge's start-up: how long the fixture merge of the README's quickstart spends importing our own modules, and
its wall time, for this checkout and (``--baseline-root``) an older one, runs alternated (issue 26, item 5).

    python bench/bench_startup.py                                      # 10 runs of each
    python bench/bench_startup.py --baseline-root /path/to/old/checkout

Each run is a child process on a copy of the checkout's ``lora_convert`` package (made once, in a temporary folder,
so that the checkouts' own ``__pycache__`` folders are neither read nor written), warm page cache:

  importtime  python -X importtime -m lora_convert.cli merge fixtures/tiny-llama-lora --base fixtures/tiny-llama-base -o OUT
  wall        the same command without -X importtime, timed from outside

in two ways: ``pyc`` as an installed package runs (bytecode written by a first, unmeasured run and read after), and
``source`` with ``PYTHONDONTWRITEBYTECODE=1`` and no ``__pycache__`` (every one of our modules compiled at each
start, as in a checkout run with that variable set, the way this project's sessions run).

"ours ms" sums the *self* time of every ``lora_convert`` module in -X importtime's report: the time spent finding,
loading and running our own modules, not the libraries they import (torch, rich, the standard library), which a
cumulative figure would include wherever torch is first imported from one of our modules.  Minimum and median of
the runs are shown: the minimum is the least disturbed by other work on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, child_env, rm, table  # noqa: E402

LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")
FIXTURES = REPO_ROOT / "fixtures"


def parse_importtime(stderr: str) -> tuple[float, list[str]]:
    """(ms of self time in lora_convert modules, their names) from -X importtime's report."""
    self_us = 0
    names = []
    for line in stderr.splitlines():
        m = LINE.match(line)
        if m and (m.group(4) == "lora_convert" or m.group(4).startswith("lora_convert.")):
            self_us += int(m.group(1))
            names.append(m.group(4))
    return self_us / 1000, names


def run_once(root: Path, out: Path, *, importtime: bool, bytecode: bool) -> tuple[float, str]:
    rm(out)
    env = {**os.environ, **child_env(), "PYTHONPATH": str(root)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if not bytecode:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    argv = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "lora_convert.cli", "merge"]
    argv += [str(FIXTURES / "tiny-llama-lora"), "--base", str(FIXTURES / "tiny-llama-base"), "-o", str(out)]
    t0 = time.perf_counter()
    p = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"merge failed in {root} (exit {p.returncode}):\n{p.stderr[-2000:]}")
    return wall, p.stderr


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=10, help="runs of each command per checkout and way")
    ap.add_argument("--baseline-root", type=Path, help="an older checkout, run alternately with this one")
    ap.add_argument("--ways", nargs="+", choices=("pyc", "source"), default=["pyc", "source"])
    ap.add_argument("--list", action="store_true", help="also print the lora_convert modules a merge imports")
    args = ap.parse_args(argv)

    checkouts = {"ours": REPO_ROOT}
    if args.baseline_root:
        checkouts["base"] = args.baseline_root.resolve()
    rows, listed = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        out = Path(tmp) / "merged"
        copies = {}
        for way in args.ways:
            for who, root in checkouts.items():
                copy = Path(tmp) / f"{who}-{way}"
                shutil.copytree(
                    root / "lora_convert", copy / "lora_convert", ignore=shutil.ignore_patterns("__pycache__")
                )
                copies[who, way] = copy
                if way == "pyc":  # write the bytecode outside the measured runs
                    run_once(copy, out, importtime=False, bytecode=True)
        ms: dict[tuple[str, str], list[float]] = {k: [] for k in copies}
        walls: dict[tuple[str, str], list[float]] = {k: [] for k in copies}
        load_before = os.getloadavg()[0]
        for _ in range(args.repeat):
            for (who, way), copy in copies.items():
                t, names = parse_importtime(run_once(copy, out, importtime=True, bytecode=way == "pyc")[1])
                ms[who, way].append(t)
                listed[who] = names
                walls[who, way].append(run_once(copy, out, importtime=False, bytecode=way == "pyc")[0])
        load_after = os.getloadavg()[0]
    for who, way in copies:
        rows.append(
            [
                who,
                way,
                len(set(listed[who])),
                f"{min(ms[who, way]):.1f}",
                f"{statistics.median(ms[who, way]):.1f}",
                f"{min(walls[who, way]):.3f}",
                f"{statistics.median(walls[who, way]):.3f}",
            ]
        )
    print(
        f"fixture merge (README quickstart), warm cache, {args.repeat} runs of each, alternated; "
        f"load {load_before:.2f} before, {load_after:.2f} after (1-min average); {os.cpu_count()} CPUs"
    )
    head = ["code", "bytecode", "our modules", "ours ms min", "ours ms median", "wall s min", "wall s median"]
    print(table(head, rows))
    if args.list:
        for who, names in listed.items():
            print(f"\n{who}: {' '.join(sorted(set(names)))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
