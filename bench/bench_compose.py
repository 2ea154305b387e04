"""Benchmark the composition commands side by side: two adapters merged in one pass, verify, unmerge
and combine, against ``cp -r`` (the floor), a one-adapter merge, and PEFT's recipes for the same jobs.

On the synthetic TinyLlama-shaped base (bench/synth.py) and two r=16 adapters (seeds 0 and 1), each
command runs as a child process with the page cache dropped before it (measure.py):

  cp          cp -r BASE OUT
  merge1      lora-convert merge A --base BASE
  merge2      lora-convert merge BASE --adapter A --adapter B:0.5
  peft-merge2 PEFT: both adapters loaded, active, set_scale(B, 0.5), merge_and_unload, save_pretrained
  verify      lora-convert verify MERGED2 --base BASE --adapter A --adapter B:0.5   (reads 3 checkpoints)
  unmerge     lora-convert convert MERGED2 --to base --adapter A --adapter B:0.5
  combine     lora-convert combine A B:0.5 --method cat   (and svd with --svd)
  peft-comb   PEFT: both adapters loaded, add_weighted_adapter(cat), save_pretrained (svd with
              --peft-svd: PEFT's full-matrices SVD of the embedding and the head allocates vocab²
              floats, 4 GB at a 32k vocabulary, and takes far longer than the rest; lora-convert
              switches those two to the reduced SVD)

and prints wall s, CPU s, peak RSS MB and the ratios: merge2 / merge1 (a second adapter should cost
little), verify / merge1 and verify / cp (three reads against one read + one write), PEFT / ours.

    python bench/bench_compose.py                       # 22 layers, everything but the svd combine
    python bench/bench_compose.py --layers 1 --cache none --svd   # a small run that checks the script
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import synth  # noqa: E402
from common import OUT_ROOT, child_env, fmt, folder_bytes, lora_convert_cmd, measure_tool, ratio, rm, table  # noqa: E402
from measure import Measurement, can_drop_caches  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent

PEFT_RECIPE = """
import sys, torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM
job, base, a, b, out = sys.argv[1:6]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, a, adapter_name="first")
model.load_adapter(b, adapter_name="second")
if job == "merge":
    model.base_model.set_adapter(["first", "second"])
    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.set_scale("second", 0.5)
    model.merge_and_unload().save_pretrained(out)
else:
    model.add_weighted_adapter(["first", "second"], [1.0, 0.5], "new", combination_type=job)
    model.save_pretrained(out, selected_adapters=["new"])
"""


def commands(args: argparse.Namespace, base: Path, a: Path, b: Path, out: dict[str, Path]) -> dict[str, list[str]]:
    ours = lora_convert_cmd(args.tool_cmd)
    stack = ["--adapter", str(a), "--adapter", f"{b}:0.5"]
    peft = [sys.executable, "-c", PEFT_RECIPE]
    cmds = {
        "cp": ["cp", "-r", str(base), str(out["cp"])],
        "merge1": ours + ["merge", str(a), "--base", str(base), "-o", str(out["merge1"]), "--force"],
        "merge2": ours + ["merge", str(base), *stack, "-o", str(out["merge2"]), "--force"],
        "verify": ours + ["verify", str(out["merge2"]), "--base", str(base), *stack],
        "unmerge": ours + ["convert", str(out["merge2"]), "--to", "base", *stack, "-o", str(out["unmerge"]), "--force"],
        "combine-cat": ours
        + ["combine", str(a), f"{b}:0.5", "--method", "cat", "-o", str(out["combine-cat"]), "--force"],
        "combine-svd": ours
        + ["combine", str(a), f"{b}:0.5", "--method", "svd", "-o", str(out["combine-svd"]), "--force"],
        "peft-merge2": peft + ["merge", str(base), str(a), str(b), str(out["peft-merge2"])],
        "peft-cat": peft + ["cat", str(base), str(a), str(b), str(out["peft-cat"])],
        "peft-svd": peft + ["svd", str(base), str(a), str(b), str(out["peft-svd"])],
    }
    order = ["cp", "merge1", "merge2", "verify", "unmerge", "combine-cat"]
    order += ["combine-svd"] if args.svd else []
    order += [] if args.skip_peft else ["peft-merge2", "peft-cat"] + (["peft-svd"] if args.peft_svd else [])
    return {k: cmds[k] for k in order}


def run(args: argparse.Namespace) -> tuple[dict[str, Measurement], Path]:
    base = synth.make_base(args.layers, args.seed, size=args.size)
    a = synth.make_adapter(base, args.layers, args.seed, size=args.size)
    b = synth.make_adapter(base, args.layers, args.seed + 1, size=args.size)
    root = OUT_ROOT / f"compose-{args.size}-L{args.layers}"
    root.mkdir(parents=True, exist_ok=True)
    names = ["cp", "merge1", "merge2", "unmerge", "combine-cat", "combine-svd", "peft-merge2", "peft-cat", "peft-svd"]
    out = {k: root / k for k in names}
    results: dict[str, Measurement] = {}
    env = child_env()
    for tool, cmd in commands(args, base, a, b, out).items():
        results[tool] = measure_tool(
            tool, cmd, out.get(tool), cache=args.cache, inputs=[base, a, b], timeout=args.timeout, env=env
        )
    if not args.keep:
        for p in out.values():
            rm(p)
    return results, base


def report(results: dict[str, Measurement], base: Path, args: argparse.Namespace) -> str:
    rows = [
        [
            tool,
            fmt(m.wall_s, 2),
            fmt(m.cpu_s, 2),
            fmt(m.peak_rss_mb, 0),
            fmt(m.extra["out_bytes"] / 1e6, 0),
            f"{m.load_before:.1f}/{m.load_after:.1f}",
            "ok" if m.ok else m.failure(100),
        ]
        for tool, m in results.items()
    ]
    out = [
        f"base: {args.layers} layers, {folder_bytes(base) / 1e9:.2f} GB bf16; adapters r=16 on 7 linears x "
        f"{args.layers} layers + embed_tokens + lm_head",
        table(["tool", "wall s", "CPU s", "peak RSS MB", "out MB", "load b/a", "status"], rows, right={1, 2, 3, 4}),
        f"page cache before each run: {', '.join(sorted({m.cache for m in results.values()}))} ({os.cpu_count()} CPUs)",
        "",
    ]

    def g(tool: str, attr: str = "wall_s") -> float | None:
        m = results.get(tool)
        return getattr(m, attr) if m is not None and m.ok else None

    pairs = [
        ("merge2 / merge1 wall", g("merge2"), g("merge1")),
        ("merge2 / cp wall", g("merge2"), g("cp")),
        ("verify / merge1 wall", g("verify"), g("merge1")),
        ("verify / cp wall", g("verify"), g("cp")),
        ("unmerge / merge2 wall", g("unmerge"), g("merge2")),
        ("PEFT merge2 / merge2 wall", g("peft-merge2"), g("merge2")),
        ("PEFT merge2 / merge2 RSS", g("peft-merge2", "peak_rss_mb"), g("merge2", "peak_rss_mb")),
        ("verify RSS / merge1 RSS", g("verify", "peak_rss_mb"), g("merge1", "peak_rss_mb")),
        ("PEFT cat / combine cat wall", g("peft-cat"), g("combine-cat")),
        ("PEFT svd / combine svd wall", g("peft-svd"), g("combine-svd")),
    ]
    out.append(table(["ratio", "value"], [[name, ratio(x, y)] for name, x, y in pairs], right={1}))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--size", choices=sorted(synth.SHARD_BYTES), default="1b", help="shapes: TinyLlama-1.1B or Llama-3-8B"
    )
    ap.add_argument("--layers", type=int, default=22, help="decoder layers (default: 22)")
    ap.add_argument("--svd", action="store_true", help="also time combine --method svd (slow: one SVD per module)")
    ap.add_argument("--peft-svd", action="store_true", help="also time PEFT's svd combination (needs vocab² floats)")
    ap.add_argument("--skip-peft", action="store_true", help="do not run PEFT's recipes")
    ap.add_argument("--keep", action="store_true", help=f"keep the outputs under {OUT_ROOT}")
    ap.add_argument("--cache", choices=("drop", "warm", "none"), default="drop", help="page cache before each run")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per command")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tool-cmd", help="how to call lora-convert (default: python -m lora_convert.cli)")
    args = ap.parse_args(argv)
    if args.cache == "drop" and not can_drop_caches():
        print("[bench] cannot drop the page cache (not root?): warming inputs before each run instead", file=sys.stderr)
    results, base = run(args)
    print(report(results, base, args))
    return 0 if all(m.ok for m in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
