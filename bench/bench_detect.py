"""How fast the header-only commands answer: ``detect``, ``report``, ``--help`` on the 2.2 GB
TinyLlama-shaped synthetic checkpoint, side by side with the interpreter's own start-up and with
``import torch`` (which these commands must not pay for).

    python bench/bench_detect.py                      # 22 layers, best of 5, warm page cache
    python bench/bench_detect.py --baseline-cmd "python -m lora_convert.cli" --baseline-root /path/to/old/checkout

The page cache is warm by default: these commands read a few KB of headers, so a cold cache would
measure the disk's seek time and Python's own files rather than the tool.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import synth
from common import BENCH_DIR, child_env, lora_convert_cmd, table
from measure import measure


def _best(argv: list[str], *, repeat: int, cache: str, inputs: list[Path], env: dict[str, str], cwd: str):
    runs = [measure(argv, cache=cache, inputs=inputs, env=env, cwd=cwd, sync_after=False) for _ in range(repeat)]
    ok = [m for m in runs if m.ok]
    return min(ok, key=lambda m: m.wall_s) if ok else runs[-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=5, help="runs per command; the best is shown")
    ap.add_argument("--cache", choices=("drop", "warm", "none"), default="warm")
    ap.add_argument("--tool-cmd", help="how to call lora-convert (default: python -m lora_convert.cli)")
    ap.add_argument("--baseline-cmd", help="also time this lora-convert (e.g. an older checkout's)")
    ap.add_argument("--baseline-root", type=Path, help="PYTHONPATH root for --baseline-cmd")
    args = ap.parse_args(argv)

    base = synth.make_base(args.layers, args.seed)
    adapter = synth.make_adapter(base, args.layers, args.seed, 16, 32)
    env = child_env()
    cwd = str(BENCH_DIR.parent)
    ours = lora_convert_cmd(args.tool_cmd)
    cmds = {
        "python -c pass (floor)": [sys.executable, "-c", "pass"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "lora-convert --help": [*ours, "--help"],
        "lora-convert detect BASE": [*ours, "detect", str(base)],
        "lora-convert detect ADAPTER": [*ours, "detect", str(adapter)],
        "lora-convert report ADAPTER --base BASE": [*ours, "report", str(adapter), "--base", str(base)],
    }
    rows = []
    for label, cmd in cmds.items():
        m = _best(cmd, repeat=args.repeat, cache=args.cache, inputs=[base, adapter], env=env, cwd=cwd)
        rows.append(
            [label, f"{m.wall_s:.3f}", f"{m.cpu_s:.3f}", f"{m.peak_rss_mb:.0f}", "ok" if m.ok else m.failure(80)]
        )
    if args.baseline_cmd:
        benv = dict(env, PYTHONPATH=str(args.baseline_root or BENCH_DIR.parent))
        for label, sub in (("detect BASE", ["detect", str(base)]), ("detect ADAPTER", ["detect", str(adapter)])):
            cmd = [*args.baseline_cmd.split(), *sub]
            broot = str(args.baseline_root or BENCH_DIR.parent)
            m = _best(cmd, repeat=args.repeat, cache=args.cache, inputs=[base, adapter], env=benv, cwd=broot)
            rows.append(
                [
                    f"baseline {label}",
                    f"{m.wall_s:.3f}",
                    f"{m.cpu_s:.3f}",
                    f"{m.peak_rss_mb:.0f}",
                    "ok" if m.ok else m.failure(80),
                ]
            )
    print(table(["command", "wall s", "CPU s", "peak RSS MB", "status"], rows, right={1, 2, 3}))
    size = sum(p.stat().st_size for p in Path(base).rglob("*.safetensors")) / 1e9
    print(f"checkpoint: {base} ({size:.2f} GB); best of {args.repeat}; page cache: {args.cache}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
