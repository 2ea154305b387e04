"""Benchmark ``lora-convert extract`` against mergekit's ``mergekit-extract-lora``.

Inputs (bench/synth.py, cached): the synthetic TinyLlama-shaped base and a "tuned"
checkpoint = base + a random rank-16 delta on the seven linears of every layer (+ tiny
full-rank noise; the bf16 rounding of the tuned weights is the real full-rank residual).
Each tool runs as a child process with the page cache dropped before it (measure.py):

  ours      python -m lora_convert.cli extract TUNED --base BASE -o OUT --rank 16 --force --json
  mergekit  bench/.cache/mergekit-venv/bin/mergekit-extract-lora --model TUNED
            --base-model BASE --out-path OUT --max-rank 16 --device cpu

mergekit lives in its own virtual environment (bench/setup_mergekit.sh makes it; it is
not a dependency of lora-convert).  Then, for a sample of the extracted modules (all with
``--sample 0``), the relative Frobenius error ||dW - s*B@A|| / ||dW|| of each tool's
adapter is computed here in fp64, with dW = TUNED - BASE and s = alpha/r from the
adapter's own config (rank_pattern/alpha_pattern/rslora honoured).

    python bench/bench_extract.py                 # 22 layers
    python bench/bench_extract.py --layers 2      # quick check of both invocations
    python bench/bench_extract.py --size 8b --layers 4 --floor   # a 4-layer slice of Llama-3-8B shapes
    python bench/bench_extract.py --baseline-cmd "python -m lora_convert.cli" --baseline-root OLD_CHECKOUT

mergekit's time is linear in the layers, so a slice of the 8B shapes (both tools on the same slice)
gives the ratio at 8B width without hours of mergekit.  ``--baseline-*`` adds an older lora-convert
to the same table (the figure an optimisation is measured against).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import synth  # noqa: E402
from common import (  # noqa: E402
    OUT_ROOT,
    TensorFolder,
    child_env,
    fmt,
    folder_bytes,
    lora_convert_cmd,
    measure_tool,
    ratio,
    read_json,
    rm,
    table,
)
from measure import Measurement, can_drop_caches  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_VENV = BENCH_DIR / ".cache" / "mergekit-venv"


def ensure_mergekit(venv: Path) -> Path:
    exe = venv / "bin" / "mergekit-extract-lora"
    if not exe.exists():
        print(f"[bench] creating the mergekit venv at {venv} (bench/setup_mergekit.sh)", file=sys.stderr)
        subprocess.run(["bash", str(BENCH_DIR / "setup_mergekit.sh"), str(venv)], check=True)
    return exe


def _pattern_value(patterns: dict, module: str):
    """PEFT's rank_pattern/alpha_pattern lookup: exact name, else a key matching the
    end of the module name at a dot boundary."""
    if module in patterns:
        return patterns[module]
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return None


def adapter_errors(adapter: Path, base: TensorFolder, tuned: TensorFolder, modules: list[str]) -> dict:
    """Relative Frobenius error per module of the adapter in folder ``adapter``.

    Computed in fp64: an fp32 norm over an 11.5M-element matrix accumulates ~1e-3 of
    relative error, enough to score an adapter "below" the Eckart-Young optimum."""
    cfg = read_json(adapter / "adapter_config.json")
    fa = TensorFolder(adapter)
    errors: dict[str, float] = {}
    notes: list[str] = []
    for mod in modules:
        w = f"{mod}.weight"
        delta = tuned.get(w).double() - base.get(w).double()
        ka, kb = f"base_model.model.{mod}.lora_A.weight", f"base_model.model.{mod}.lora_B.weight"
        if ka not in fa or kb not in fa:
            errors[mod] = 1.0
            notes.append(f"{mod}: no LoRA tensors (error 1.0)")
            continue
        a, b = fa.get(ka).double(), fa.get(kb).double()
        r = _pattern_value(cfg.get("rank_pattern") or {}, mod) or cfg["r"]
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, mod) or cfg["lora_alpha"]
        if r != a.shape[0]:
            notes.append(f"{mod}: config rank {r} but lora_A has {a.shape[0]} rows")
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        errors[mod] = ((delta - scale * (b @ a)).norm() / delta.norm()).item()
    return {"errors": errors, "notes": notes}


def optimal_errors(base: TensorFolder, tuned: TensorFolder, modules: list[str], rank: int) -> dict[str, float]:
    """Best possible rank-``rank`` error (Eckart-Young) from the singular values of dW (fp64)."""
    out = {}
    for mod in modules:
        w = f"{mod}.weight"
        s = torch.linalg.svdvals(tuned.get(w).double() - base.get(w).double())
        out[mod] = (s[rank:].square().sum().sqrt() / s.square().sum().sqrt()).item()
    return out


def sample_modules(layers: int, n: int) -> list[str]:
    full = [synth.ModelShape.module_path(i, m) for m in synth.LINEARS for i in range(layers)]
    if n <= 0 or n >= len(full):
        return full
    idx = sorted({round(k * (len(full) - 1) / (n - 1)) for k in range(n)}) if n > 1 else [0]
    return [full[i] for i in idx]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(synth.SIZES), default="1b", help="model shapes: 1b or 8b")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample", type=int, default=21, help="modules to compute the error on (0 = all)")
    ap.add_argument("--floor", action="store_true", help="also print the optimal rank-r error (SVD of each sampled dW)")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--mergekit-venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--mergekit-args", default="", help="extra arguments for mergekit-extract-lora (one string)")
    ap.add_argument("--keep", action="store_true", help=f"keep the outputs under {OUT_ROOT}")
    ap.add_argument("--cache", choices=("drop", "warm", "none"), default="drop")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per command")
    ap.add_argument("--tool-cmd", help="how to call lora-convert (default: python -m lora_convert.cli)")
    ap.add_argument("--json", type=Path, help="also write the raw measurements here")
    ap.add_argument("--baseline-cmd", help="also time this lora-convert (e.g. an older checkout's)")
    ap.add_argument("--baseline-root", type=Path, help="working directory (and PYTHONPATH) for --baseline-cmd")
    args = ap.parse_args(argv)
    if args.cache == "drop" and not can_drop_caches():
        print("[bench] cannot drop the page cache (not root?): warming inputs before each run instead", file=sys.stderr)

    t0 = time.perf_counter()
    base = synth.make_base(args.layers, args.seed, size=args.size)
    tuned = synth.make_tuned(args.layers, args.seed, args.rank, size=args.size)
    print(
        f"[bench] inputs ready in {time.perf_counter() - t0:.1f} s ({folder_bytes(base) / 1e9:.2f} GB each)",
        file=sys.stderr,
    )

    out_root = OUT_ROOT / f"extract-{args.size}-L{args.layers}"
    out_root.mkdir(parents=True, exist_ok=True)
    outs = {"ours": out_root / "ours", "mergekit": out_root / "mergekit", "baseline": out_root / "baseline"}
    cmds = {
        "ours": lora_convert_cmd(args.tool_cmd)
        + [
            "extract",
            str(tuned),
            "--base",
            str(base),
            "-o",
            str(outs["ours"]),
            "--rank",
            str(args.rank),
            "--force",
            "--json",
        ]
    }
    if not args.skip_mergekit:
        exe = ensure_mergekit(args.mergekit_venv)
        cmds["mergekit"] = [
            str(exe),
            "--model",
            str(tuned),
            "--base-model",
            str(base),
            "--out-path",
            str(outs["mergekit"]),
            "--max-rank",
            str(args.rank),
            "--device",
            "cpu",
            *shlex.split(args.mergekit_args),
        ]

    env = child_env()
    cwds = {tool: str(BENCH_DIR.parent) for tool in cmds}
    envs = {tool: env for tool in cmds}
    if args.baseline_cmd:
        root = str(args.baseline_root or BENCH_DIR.parent)
        cmds["baseline"] = [*shlex.split(args.baseline_cmd), *cmds["ours"][len(lora_convert_cmd(args.tool_cmd)) :]]
        cmds["baseline"][cmds["baseline"].index(str(outs["ours"]))] = str(outs["baseline"])
        cwds["baseline"], envs["baseline"] = root, dict(env, PYTHONPATH=root)
    results: dict[str, Measurement] = {}
    for tool, cmd in cmds.items():
        m = measure_tool(
            tool,
            cmd,
            outs[tool],
            cache=args.cache,
            inputs=[base, tuned],
            timeout=args.timeout,
            env=envs[tool],
            cwd=cwds[tool],
        )
        results[tool] = m
        if m.ok:
            print(f"[bench] {tool}: ok in {m.wall_s:.1f} s", file=sys.stderr)

    modules = sample_modules(args.layers, args.sample)
    fb, ft = TensorFolder(base), TensorFolder(tuned)
    errs: dict[str, dict] = {}
    for tool, m in results.items():
        if not m.ok:
            continue
        try:
            errs[tool] = adapter_errors(outs[tool], fb, ft, modules)
        except Exception as e:  # a malformed output must not lose the timings
            errs[tool] = {"errors": {}, "notes": [f"cannot read the adapter: {type(e).__name__}: {e}"]}
    floor = optimal_errors(fb, ft, modules, args.rank) if args.floor else None

    label = {"ours": "lora-convert extract", "mergekit": "mergekit-extract-lora", "baseline": "baseline extract"}
    rows = []
    for tool, m in results.items():
        e = list(errs.get(tool, {}).get("errors", {}).values())
        rows.append(
            [
                label[tool],
                f"{args.size}/L{args.layers}",
                fmt(m.wall_s, 2),
                fmt(m.cpu_s, 2),
                fmt(m.peak_rss_mb, 0),
                fmt(m.extra["out_bytes"] / 1e6, 1),
                f"{max(e):.4e}" if e else "-",
                f"{sum(e) / len(e):.4e}" if e else "-",
                f"{m.load_before:.1f}/{m.load_after:.1f}",
                "ok" if m.ok else m.failure(120),
            ]
        )
    print(
        table(
            [
                "tool",
                "model",
                "wall s",
                "CPU s",
                "peak RSS MB",
                "out MB",
                "worst rel err",
                "mean rel err",
                "load b/a",
                "status",
            ],
            rows,
            right={1, 2, 3, 4, 5, 6, 7, 8},
        )
    )
    cache = {m.cache for m in results.values()}
    print(
        f"page cache before each run: {', '.join(sorted(cache))}; load b/a = 1-min load average before/after the run"
        f" ({os.cpu_count()} CPUs); rel err = ||dW - s*B@A||_F / ||dW||_F in fp64"
        f" over {len(modules)} of {7 * args.layers} modules"
    )
    if floor:
        print(
            f"optimal rank-{args.rank} error over the same modules: worst {max(floor.values()):.4e},"
            f" mean {sum(floor.values()) / len(floor):.4e}"
        )

    def g(tool: str, attr: str) -> float | None:
        m = results.get(tool)
        return getattr(m, attr) if m is not None and m.ok else None

    print()
    print(
        table(
            ["model", "mergekit wall / ours wall", "ours RSS / mergekit RSS", "baseline wall / ours wall"],
            [
                [
                    f"{args.size}/L{args.layers}",
                    ratio(g("mergekit", "wall_s"), g("ours", "wall_s")),
                    ratio(g("ours", "peak_rss_mb"), g("mergekit", "peak_rss_mb")),
                    ratio(g("baseline", "wall_s"), g("ours", "wall_s")),
                ]
            ],
        )
    )
    for tool, e in errs.items():
        for note in e["notes"][:10]:
            print(f"{label[tool]}: {note}")
    if errs and len(modules) <= 30:
        print()
        heads = ["module"] + [label[t] for t in errs] + (["optimal"] if floor else [])
        print(
            table(
                heads,
                [
                    [mod]
                    + [f"{errs[t]['errors'].get(mod, float('nan')):.5e}" for t in errs]
                    + ([f"{floor[mod]:.5e}"] if floor else [])
                    for mod in modules
                ],
            )
        )

    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "layers": args.layers,
                    "rank": args.rank,
                    "results": {k: {**asdict(m), "cpu_s": m.cpu_s} for k, m in results.items()},
                    "errors": errs,
                    "optimal": floor,
                },
                indent=2,
            )
            + "\n"
        )
    if not args.keep:
        for p in outs.values():
            rm(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
