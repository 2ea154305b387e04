"""The commands beside a merge, against that merge, in one run: ``verify``, the dequantizing merge (fp8
block-scaled and bitsandbytes NF4 bases) and ``detect --base`` — for this checkout and, with
``--baseline-root``, an older one, each figure with its CPU user and system seconds and the machine's load beside
it (issue 26, items 2–4).  On a shared machine compare CPU seconds: wall time follows the other work.

    python bench/bench_speed.py                                  # 22 layers (2.2 GB bf16), warm cache, best of 1
    python bench/bench_speed.py --baseline-root /path/to/old/checkout --repeat 2
    python bench/bench_speed.py --layers 2 --only verify          # quick check of the script

Rows, per checkout (``ours``, ``base`` for the baseline), each a child process measured as in measure.py:

  cp            cp -r BASE OUT (the floor; once)
  merge         lora-convert merge ADAPTER --base BASE -o M
  verify        lora-convert verify M --base BASE --adapter ADAPTER --json      (reads three checkpoints)
  merge-fp8     lora-convert merge ADAPTER --base FP8_BASE -o ...   (bench_quant.py's fp8 block-scaled base)
  merge-nf4     lora-convert merge ADAPTER --base NF4_BASE -o ...   (the base quantized by transformers +
                bitsandbytes, nf4, blocksize 64, as ``save_pretrained`` writes it)
  detect        lora-convert detect M --base BASE --json           (effective rank of every changed module)

The ratios asked for: verify / merge, merge-fp8 / merge, merge-nf4 / merge, detect / merge (wall and CPU).
Runs alternate ours/base ``--repeat`` times and keep each row's best wall.  Outputs (merged files, the JSON of
verify and detect) of the two checkouts are compared by sha256: they must be byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import synth  # noqa: E402
from bench_quant import make_fp8_base  # noqa: E402
from common import OUT_ROOT, REPO_ROOT, child_env, lora_convert_cmd, measure_tool, ratio, rm, table  # noqa: E402
from measure import Measurement  # noqa: E402

ROWS = ("merge", "verify", "merge-fp8", "merge-nf4", "detect")


def make_nf4_base(bf16_base: Path, layers: int, seed: int) -> Path:
    """The synthetic base loaded by transformers with ``BitsAndBytesConfig(load_in_4bit, nf4)`` and saved."""
    params = {"kind": "nf4-base", "version": synth.SYNTH_VERSION, "layers": layers, "seed": seed}

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = AutoModelForCausalLM.from_pretrained(
            str(bf16_base),
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
            device_map="cpu",
            dtype=torch.bfloat16,
        )
        q.save_pretrained(tmp)

    return synth._cached(Path(synth.DEFAULT_ROOT) / f"nf4-base-L{layers}-s{seed}", params, build, False, False)


def digest(path: Path) -> str:
    """sha256 over a folder's safetensors files (names and bytes) or one file."""
    h = hashlib.sha256()
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="+", choices=ROWS, help="just these rows (merge always runs)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per row and checkout; the best wall is shown")
    ap.add_argument("--cache", choices=("drop", "warm", "none"), default="warm")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--baseline-root", type=Path, help="an older checkout, run beside this one (PYTHONPATH)")
    args = ap.parse_args(argv)

    base = synth.make_base(args.layers, args.seed)
    adapter = synth.make_adapter(base, args.layers, args.seed)
    rows = ["merge", *[r for r in ROWS[1:] if not args.only or r in args.only]]
    fp8 = make_fp8_base(base, args.layers, args.seed) if "merge-fp8" in rows else None
    nf4 = make_nf4_base(base, args.layers, args.seed) if "merge-nf4" in rows else None
    root = OUT_ROOT / f"speed-L{args.layers}"
    root.mkdir(parents=True, exist_ok=True)
    checkouts = {"ours": REPO_ROOT} | ({"base": args.baseline_root.resolve()} if args.baseline_root else {})
    cli = lora_convert_cmd()
    inputs = [p for p in (base, adapter, fp8, nf4) if p is not None]

    def cmds(who: str) -> dict[str, tuple[list[str], Path | None, Path | None]]:
        """row -> (argv, output folder, stdout file)."""
        o = root / who
        m = root / "merge"  # one path for both checkouts: verify's and detect's JSON name it
        return {
            "merge": (cli + ["merge", str(adapter), "--base", str(base), "-o", str(m), "--force"], m, None),
            "verify": (
                ["sh", "-c", f'exec "$@" > {o}/verify.json', "-"]
                + cli
                + ["verify", str(m), "--base", str(base), "--adapter", str(adapter), "--json"],
                None,
                o / "verify.json",
            ),
            "merge-fp8": (
                cli + ["merge", str(adapter), "--base", str(fp8), "-o", str(o / "fp8"), "--force"],
                o / "fp8",
                None,
            ),
            "merge-nf4": (
                cli + ["merge", str(adapter), "--base", str(nf4), "-o", str(o / "nf4"), "--force"],
                o / "nf4",
                None,
            ),
            "detect": (
                ["sh", "-c", f'exec "$@" > {o}/detect.json', "-"]
                + cli
                + ["detect", str(m), "--base", str(base), "--json"],
                None,
                o / "detect.json",
            ),
        }

    best: dict[tuple[str, str], Measurement] = {}
    digests: dict[tuple[str, str], str] = {}
    cp_out = root / "cp"
    best[("cp", "-")] = measure_tool(
        "cp",
        ["cp", "-r", str(base.resolve()), str(cp_out)],
        cp_out,
        cache=args.cache,
        inputs=inputs,
        timeout=args.timeout,
    )
    rm(cp_out)
    for rep in range(args.repeat):
        for row in rows:
            for who, code in checkouts.items():
                (root / who).mkdir(parents=True, exist_ok=True)
                argv_, out, stdout = cmds(who)[row]
                env = dict(child_env(), PYTHONPATH=str(code))
                m = measure_tool(
                    f"{row} ({who})",
                    argv_,
                    out if row != "merge" else None,
                    cache=args.cache,
                    inputs=inputs,
                    timeout=args.timeout,
                    env=env,
                    cwd=str(code),
                )
                key = (row, who)
                if m.ok and (key not in best or m.wall_s < best[key].wall_s or not best[key].ok):
                    best[key] = m
                elif key not in best:
                    best[key] = m
                target = out if out is not None else stdout
                if rep == 0 and m.ok and target is not None and target.exists():
                    digests[key] = digest(target)
                if out is not None and row != "merge":
                    rm(out)
    for who in checkouts:
        rm(root / who)
    rm(root / "merge")

    lines = [
        f"base: {args.layers} layers (TinyLlama shapes), adapter r=16; page cache: "
        f"{', '.join(sorted({m.cache for m in best.values()}))}; best wall of {args.repeat}; {os.cpu_count()} CPUs",
    ]
    body = []
    for (row, who), m in best.items():
        body.append(
            [
                row,
                who,
                f"{m.wall_s:.2f}",
                f"{m.user_s:.2f}",
                f"{m.sys_s:.2f}",
                f"{m.cpu_s:.2f}",
                f"{m.peak_rss_mb:.0f}",
                f"{m.load_before:.1f}/{m.load_after:.1f}",
                digests.get((row, who), "-"),
                "ok" if m.ok else m.failure(80),
            ]
        )
    lines.append(
        table(
            ["row", "code", "wall s", "user s", "sys s", "CPU s", "peak RSS MB", "load b/a", "sha256", "status"],
            body,
            right={2, 3, 4, 5, 6},
        )
    )
    lines.append("")

    def g(row: str, who: str, attr: str = "wall_s") -> float | None:
        m = best.get((row, who))
        return getattr(m, attr) if m is not None and m.ok else None

    ratios = []
    for who in checkouts:
        for row in rows[1:]:
            ratios.append(
                [
                    f"{row} / merge ({who})",
                    ratio(g(row, who), g("merge", who)),
                    ratio(g(row, who, "cpu_s"), g("merge", who, "cpu_s")),
                ]
            )
    lines.append(table(["ratio", "wall", "CPU"], ratios, right={1, 2}))
    if len(checkouts) == 2:
        same = [
            row
            for row in rows
            if digests.get((row, "ours")) and digests.get((row, "ours")) == digests.get((row, "base"))
        ]
        diff = [row for row in rows if row not in same]
        lines.append(
            f"outputs byte-identical to the baseline: {', '.join(same) or 'none'}"
            + (f"; DIFFERENT or unchecked: {', '.join(diff)}" if diff else "")
        )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
