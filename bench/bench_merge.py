"""Benchmark ``lora-convert merge`` against ``cp -r`` (the floor), PEFT's recipe and mergekit.

For each model (default: 11 and 22 layers of TinyLlama-1.1B shapes; ``--size 8b``: Llama-3-8B shapes,
32 layers, 16 GB in 5 GB shards; ``--models 1b:22 8b:32`` for both in one run): generate (or reuse)
the synthetic base and r=16 adapter (bench/synth.py), then time side by side, each as a child process
with the page cache dropped before it (see measure.py):

  cp        cp -r BASE OUT
  ours      python -m lora_convert.cli merge ADAPTER --base BASE -o OUT --force
  peft      python bench/peft_merge.py BASE ADAPTER OUT   (from_pretrained -> PeftModel ->
            merge_and_unload -> save_pretrained; the whole model in memory: at 8B it may not fit,
            and the table then says so with its peak before it failed)
  mergekit  mergekit-yaml (passthrough of BASE+ADAPTER) from its own venv (bench/setup_mergekit.sh),
            when that venv exists: mergekit applies a LoRA by loading the model with PEFT too

and print wall s, CPU s (user+sys), peak RSS MB, the ratios merge/cp wall, PEFT/merge
wall, PEFT/merge RSS, and how far the merged tensors of ours and PEFT's lie apart.

    python bench/bench_merge.py                    # 11 and 22 layers (1.1B shapes), every tool
    python bench/bench_merge.py --layers 22 --skip-peft
    python bench/bench_merge.py --models 1b:22 8b:32 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
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
MERGEKIT_VENV = BENCH_DIR / ".cache" / "mergekit-venv"
MERGEKIT_CONFIG = """merge_method: passthrough
dtype: bfloat16
models:
  - model: {base}+{adapter}
"""


def compare_merged(base: Path, adapter: Path, ours: Path, peft: Path | None, layers: int) -> list[str]:
    """Max abs differences on a few tensors: ours vs PEFT, and each vs an fp32 reference
    (W + alpha/r * B@A, rounded once to bf16)."""
    cfg = read_json(adapter / "adapter_config.json")
    scale = cfg["lora_alpha"] / cfg["r"]
    fb, fa = TensorFolder(base), TensorFolder(adapter)
    fo = TensorFolder(ours) if ours.exists() else None
    fp = TensorFolder(peft) if peft is not None and peft.exists() else None
    mid = layers // 2
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        f"model.layers.{mid}.self_attn.k_proj.weight",
        f"model.layers.{mid}.mlp.down_proj.weight",
        f"model.layers.{layers - 1}.mlp.gate_proj.weight",
        f"model.layers.{layers - 1}.self_attn.o_proj.weight",
        "lm_head.weight",
        "model.norm.weight",
    ]
    lines = []
    worst = {"ours-peft": 0.0, "ours-ref": 0.0, "peft-ref": 0.0}
    for name in names:
        w = fb.get(name).float()
        mod = name.removesuffix(".weight")
        pa = f"base_model.model.{mod}"
        if f"{pa}.lora_A.weight" in fa:
            delta = fa.get(f"{pa}.lora_B.weight").float() @ fa.get(f"{pa}.lora_A.weight").float()
        elif f"{pa}.lora_embedding_A" in fa:
            delta = (fa.get(f"{pa}.lora_embedding_B").float() @ fa.get(f"{pa}.lora_embedding_A").float()).T
        else:
            delta = torch.zeros_like(w)
        ref = (w + scale * delta).to(torch.bfloat16).float()
        parts = [f"{name:<44}"]
        o = fo.get(name).float() if fo is not None and name in fo else None
        p = fp.get(name).float() if fp is not None and name in fp else None
        for label, x, y in (("ours-peft", o, p), ("ours-ref", o, ref), ("peft-ref", p, ref)):
            if x is None or y is None:
                parts.append(f"{label} {'-':>9}")
                continue
            d = (x - y).abs().max().item()
            worst[label] = max(worst[label], d)
            parts.append(f"{label} {d:9.2e}")
        lines.append("  ".join(parts))
    summary = "  ".join(f"{k} {v:.2e}" for k, v in worst.items())
    lines.append(f"{'max over these tensors':<44}  {summary}")
    return lines


def run_size(size: str, layers: int, args: argparse.Namespace, env: dict[str, str]) -> dict:
    t0 = time.perf_counter()
    base = synth.make_base(layers, args.seed, size=size)
    adapter = synth.make_adapter(base, layers, args.seed, size=size)
    name = f"{size} L={layers}"
    print(
        f"[bench] {name}: inputs ready in {time.perf_counter() - t0:.1f} s"
        f" (base {folder_bytes(base) / 1e9:.2f} GB, adapter {folder_bytes(adapter) / 1e6:.1f} MB)",
        file=sys.stderr,
    )
    out_root = OUT_ROOT / f"merge-{size}-L{layers}"
    out_root.mkdir(parents=True, exist_ok=True)
    outs = {t: out_root / t for t in ("cp", "ours", "peft", "mergekit")}
    cmds = {
        "cp": ["cp", "-r", str(base), str(outs["cp"])],
        "ours": lora_convert_cmd(args.tool_cmd)
        + ["merge", str(adapter), "--base", str(base), "-o", str(outs["ours"]), "--force"],
        "peft": [sys.executable, str(BENCH_DIR / "peft_merge.py"), str(base), str(adapter), str(outs["peft"])],
        "torch": [sys.executable, "-c", "import torch"],
    }
    tools = ["cp", "torch", "ours"] + ([] if args.skip_peft else ["peft"])
    cwds = {t: str(BENCH_DIR.parent) for t in ("cp", "torch", "ours", "peft", "mergekit")}
    envs = {t: env for t in cwds}
    if args.baseline_cmd:  # an older lora-convert, timed in the same run (what a change is measured against)
        outs["baseline"] = out_root / "baseline"
        cmds["baseline"] = [*shlex.split(args.baseline_cmd), "merge", str(adapter), "--base", str(base)]
        cmds["baseline"] += ["-o", str(outs["baseline"]), "--force"]
        root = str(args.baseline_root or BENCH_DIR.parent)
        cwds["baseline"], envs["baseline"] = root, dict(env, PYTHONPATH=root)
        tools.insert(tools.index("ours") + 1, "baseline")
    mergekit = args.mergekit_venv / "bin" / "mergekit-yaml"
    if not args.skip_mergekit and mergekit.exists():
        config = out_root / "mergekit.yml"
        config.write_text(MERGEKIT_CONFIG.format(base=base, adapter=adapter))
        cache = out_root / "mergekit-lora-cache"
        outs["mergekit-cache"] = cache
        cmds["mergekit"] = [str(mergekit), str(config), str(outs["mergekit"]), "--lora-merge-cache", str(cache)]
        cmds["mergekit"] += ["--no-copy-tokenizer", "--lazy-unpickle"]
        tools.append("mergekit")
    elif not args.skip_mergekit:
        print(f"[bench] no mergekit venv at {args.mergekit_venv}: bash bench/setup_mergekit.sh", file=sys.stderr)
    results: dict[str, Measurement] = {}
    pairs: dict[str, list[Measurement]] = {}
    diff_lines: list[str] = []
    busy = start_busy() if args.busy else None
    try:
        if args.pairs:  # cold pairs: cp, ours (and the baseline) alternated, so drifting load hits all alike
            pair_tools = [t for t in ("cp", "ours", "baseline") if t in cmds]
            for i in range(args.pairs):
                for tool in pair_tools:
                    m = measure_tool(
                        tool,
                        cmds[tool],
                        outs.get(tool),
                        cache=args.cache,
                        inputs=[base, adapter],
                        timeout=args.timeout,
                        env=envs[tool],
                        cwd=cwds[tool],
                        label=f"{name} pair {i + 1}/{args.pairs}: ",
                    )
                    pairs.setdefault(tool, []).append(m)
                    if not args.keep and (tool != "ours" or i < args.pairs - 1):  # at 8B: 16 GB each
                        rm(outs[tool])
            for tool, ms in pairs.items():
                results[tool] = sorted(ms, key=lambda m: m.wall_s)[len(ms) // 2]  # the median run
            tools = [t for t in tools if t not in pairs]
        diff_lines = _run_tools(tools, outs, cmds, envs, cwds, results, base, adapter, args, name, layers)
    finally:
        if busy is not None:
            stop_busy(busy)
    if not diff_lines:
        diff_lines = _compare(base, adapter, outs, results, layers)
    if not args.keep:
        for p in outs.values():
            rm(p)
    return {
        "size": size,
        "layers": layers,
        "base_bytes": folder_bytes(base),
        "results": results,
        "pairs": pairs,
        "diff": diff_lines,
        "busy": bool(args.busy),
    }


BUSY = "while True: pass"


def start_busy() -> subprocess.Popen:
    """One other CPU-bound process (a Python spin loop: one core, no I/O) for the whole of the runs."""
    print("[bench] starting one CPU-bound process beside the runs (--busy)", file=sys.stderr)
    return subprocess.Popen([sys.executable, "-c", BUSY])


def stop_busy(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _run_tools(tools, outs, cmds, envs, cwds, results, base, adapter, args, name, layers) -> list[str]:  # noqa: ANN001
    """Each tool ``--repeat`` times (best kept); the merged tensors compared before mergekit (outputs then go)."""
    diff_lines: list[str] = []
    # Outputs are deleted as soon as nothing needs them: at 8B each is 16 GB (mergekit's LoRA cache another
    # 16), and they do not all fit beside the base.  ours and peft stay until they have been compared.
    for tool in tools:
        if tool == "mergekit" and not args.keep:
            diff_lines = _compare(base, adapter, outs, results, layers)
            rm(outs["ours"]), rm(outs["peft"])
        for _ in range(args.repeat):
            if f"{tool}-cache" in outs:
                rm(outs[f"{tool}-cache"])
            m = measure_tool(
                tool,
                cmds[tool],
                outs.get(tool),
                cache=args.cache,
                inputs=[base, adapter],
                timeout=args.timeout,
                env=envs[tool],
                cwd=cwds[tool],
                label=f"{name}: ",
            )
            if tool not in results or (m.ok and m.wall_s < results[tool].wall_s):
                results[tool] = m
            if not m.ok:
                break
        if tool in ("cp", "mergekit", "baseline") and not args.keep:
            rm(outs[tool]), rm(outs.get(f"{tool}-cache", outs[tool]))
    return diff_lines


def _compare(base: Path, adapter: Path, outs: dict[str, Path], results: dict, layers: int) -> list[str]:
    ours, peft = results.get("ours"), results.get("peft")
    if not (ours is not None and ours.ok or peft is not None and peft.ok):
        return []
    try:
        return compare_merged(base, adapter, outs["ours"], outs["peft"] if peft is not None else None, layers)
    except Exception as e:  # a malformed output must not lose the timings
        return [f"comparison failed: {type(e).__name__}: {e}"]


def marginal(sizes: list[dict]) -> str:
    """Seconds per extra GB between the smallest and the largest model: what a tool costs per byte once
    its fixed start-up (interpreter, imports) is paid.  `python -c 'import torch'` measures the part
    of that start-up every torch-based tool pays; cp pays none."""
    small, big = min(sizes, key=lambda s: s["base_bytes"]), max(sizes, key=lambda s: s["base_bytes"])
    gb = (big["base_bytes"] - small["base_bytes"]) / 1e9
    slope: dict[str, float | None] = {}
    for tool in ("cp", "ours", "peft"):
        a, b = small["results"].get(tool), big["results"].get(tool)  # mergekit's cost is PEFT's plus a copy
        slope[tool] = (
            (b.wall_s - a.wall_s) / gb if a is not None and b is not None and a.ok and b.ok and gb > 0 else None
        )
    rows = [
        [
            f"{_model(small)} -> {_model(big)}",
            fmt(slope["cp"], 2),
            fmt(slope["ours"], 2),
            fmt(slope["peft"], 2),
            ratio(slope["ours"], slope["cp"]),
            ratio(slope["peft"], slope["ours"]),
        ]
    ]
    return (
        table(
            ["sizes", "cp s/GB", "merge s/GB", "PEFT s/GB", "merge / cp", "PEFT / merge"], rows, right={1, 2, 3, 4, 5}
        )
        + "\n(marginal wall time per GB of checkpoint: the fixed start-up cancels out)"
    )


def _model(s: dict) -> str:
    return f"{s['size']}/L{s['layers']}"


def pair_table(s: dict) -> str:
    """Each cold pair (cp, ours, [baseline]) as one row, then the medians: walls, CPU (user/sys) and the
    ratios ours/cp of wall, of wall against cp's wall plus its sync, and of CPU."""
    ps = s["pairs"]
    n = min(len(v) for v in ps.values())
    rows, wall_r, durable_r, cpu_r = [], [], [], []
    for i in range(n):
        cp, ours = ps["cp"][i], ps["ours"][i]
        w, d, c = ours.wall_s / cp.wall_s, ours.wall_s / (cp.wall_s + cp.sync_s), ours.cpu_s / cp.cpu_s
        wall_r.append(w), durable_r.append(d), cpu_r.append(c)
        cells = [str(i + 1)]
        for tool in ps:
            m = ps[tool][i]
            cells.append(f"{m.wall_s:.2f} ({m.user_s:.2f}+{m.sys_s:.2f})")
        cells += [f"{cp.sync_s:.2f}", f"{w:.2f}x", f"{d:.2f}x", f"{c:.2f}x", f"{ps['ours'][i].load_before:.1f}"]
        rows.append(cells)
    med = statistics.median
    cells = ["median"]
    for tool in ps:
        ms = ps[tool][:n]
        wall, user, sys_ = med(m.wall_s for m in ms), med(m.user_s for m in ms), med(m.sys_s for m in ms)
        cells.append(f"{wall:.2f} ({user:.2f}+{sys_:.2f})")
    cells += [
        f"{med(m.sync_s for m in ps['cp'][:n]):.2f}",
        f"{med(wall_r):.2f}x",
        f"{med(durable_r):.2f}x",
        f"{med(cpu_r):.2f}x",
        f"{med(m.load_before for m in ps['ours'][:n]):.1f}",
    ]
    rows.append(cells)
    head = ["pair"] + [f"{t} wall (user+sys) s" for t in ps]
    head += ["cp sync s", "ours/cp wall", "ours/(cp+sync) wall", "ours/cp CPU", "load before ours"]
    return f"cold pairs, {_model(s)}:\n" + table(head, rows)


def report(sizes: list[dict], args: argparse.Namespace) -> str:
    label = {
        "cp": "cp -r (floor)",
        "torch": "python -c 'import torch'",
        "ours": "lora-convert merge",
        "peft": "PEFT merge_and_unload",
        "mergekit": "mergekit-yaml (LoRA)",
        "baseline": "baseline merge",
    }
    rows = []
    for s in sizes:
        for tool, m in s["results"].items():
            status = "ok" if m.ok else m.failure(120)
            rows.append(
                [
                    label[tool],
                    _model(s),
                    fmt(m.wall_s, 2),
                    fmt(m.cpu_s, 2),
                    fmt(m.user_s, 2),
                    fmt(m.sys_s, 2),
                    fmt(m.peak_rss_mb, 0),
                    fmt(m.sync_s, 2),
                    fmt(m.extra["out_bytes"] / 1e6, 0),
                    f"{m.load_before:.1f}/{m.load_after:.1f}",
                    status,
                ]
            )
    out = [
        table(
            ["tool", "model", "wall s", "CPU s", "user s", "sys s", "peak RSS MB", "sync s", "out MB", "load b/a"]
            + ["status"],
            rows,
            right={1, 2, 3, 4, 5, 6, 7, 8, 9},
        )
    ]
    cache = {m.cache for s in sizes for m in s["results"].values()}
    runs = f"median of {args.pairs} pairs for {', '.join(sizes[0]['pairs'])}, " if args.pairs else ""
    out.append(
        f"page cache before each run: {', '.join(sorted(cache))}; {runs}best of {args.repeat} run(s) per other tool;"
        f" load b/a = 1-min load average before/after the run ({os.cpu_count()} CPUs)"
        + ("; one other CPU-bound process ran throughout (--busy)" if args.busy else "")
    )
    out.append(
        "CPU = user + sys of the process tree; sync s = a `sync` right after the run (cp leaves its output"
        " dirty in the page cache; our merge fsyncs before its rename, inside its wall)"
    )
    for s in sizes:
        if s["pairs"]:
            out.append("")
            out.append(pair_table(s))
    out.append("")
    ratio_rows = []
    for s in sizes:
        r = s["results"]

        def g(tool: str, attr: str, r: dict = r) -> float | None:
            m = r.get(tool)
            return getattr(m, attr) if m is not None and m.ok else None

        ratio_rows.append(
            [
                _model(s),
                ratio(g("ours", "wall_s"), g("cp", "wall_s")),
                ratio(g("peft", "wall_s"), g("ours", "wall_s")),
                ratio(g("peft", "peak_rss_mb"), g("ours", "peak_rss_mb")),
                ratio(g("mergekit", "wall_s"), g("ours", "wall_s")),
                ratio(g("mergekit", "peak_rss_mb"), g("ours", "peak_rss_mb")),
                ratio(g("baseline", "wall_s"), g("ours", "wall_s")),
            ]
        )
    head = ["model", "merge wall / cp wall", "PEFT wall / merge wall", "PEFT RSS / merge RSS"]
    out.append(table(head + ["mergekit wall / merge wall", "mergekit RSS / merge RSS", "baseline / merge"], ratio_rows))
    if len(sizes) > 1:
        out.append("")
        out.append(marginal(sizes))
    ours_rss = [(_model(s), s["results"]["ours"].peak_rss_mb) for s in sizes if s["results"]["ours"].ok]
    if len(ours_rss) > 1:
        out.append(
            "lora-convert merge peak RSS by size: "
            + ", ".join(f"{n}: {v:.0f} MB" for n, v in ours_rss)
            + f" (largest/smallest {max(v for _, v in ours_rss) / min(v for _, v in ours_rss):.2f}x)"
        )
    for s in sizes:
        if s["diff"]:
            out.append("")
            out.append(f"merged tensors, max abs diff, {_model(s)} (ref = fp32 W + s*B@A rounded once to bf16):")
            out.extend("  " + ln for ln in s["diff"])
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", help="decoder layers of each model (default: 11 22; 8b: 32)")
    ap.add_argument("--size", choices=sorted(synth.SIZES), default="1b", help="shapes for --layers: 1b or 8b")
    ap.add_argument("--models", nargs="+", metavar="SIZE:LAYERS", help="e.g. 1b:22 8b:32 (overrides --size/--layers)")
    ap.add_argument("--skip-peft", action="store_true", help="do not run the PEFT recipe")
    ap.add_argument("--skip-mergekit", action="store_true", help="do not run mergekit")
    ap.add_argument("--mergekit-venv", type=Path, default=MERGEKIT_VENV)
    ap.add_argument("--baseline-cmd", help="also time this lora-convert merge (e.g. an older checkout's)")
    ap.add_argument("--baseline-root", type=Path, help="working directory (and PYTHONPATH) for --baseline-cmd")
    ap.add_argument("--keep", action="store_true", help=f"keep the outputs under {OUT_ROOT}")
    ap.add_argument(
        "--cache",
        choices=("drop", "warm", "none"),
        default="drop",
        help="page cache before each run: drop (cold; falls back to warm without root), warm, none",
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool, best kept")
    ap.add_argument(
        "--pairs", type=int, default=0, help="cp and ours (and --baseline-cmd) alternated N times; medians reported"
    )
    ap.add_argument("--busy", action="store_true", help="one other CPU-bound process runs during all the runs")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per command")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tool-cmd", help="how to call lora-convert (default: python -m lora_convert.cli)")
    ap.add_argument("--json", type=Path, help="also write the raw measurements here")
    args = ap.parse_args(argv)
    if args.cache == "drop" and not can_drop_caches():
        print("[bench] cannot drop the page cache (not root?): warming inputs before each run instead", file=sys.stderr)

    env = child_env()
    if args.models:
        models = [(m.split(":")[0], int(m.split(":")[1])) for m in args.models]
    else:
        default = [11, 22] if args.size == "1b" else [synth.SIZES[args.size].layers]
        models = [(args.size, n) for n in args.layers or default]
    sizes = [run_size(size, n, args, env) for size, n in models]
    print(report(sizes, args))
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {
                        **s,
                        "results": {k: {**asdict(m), "cpu_s": m.cpu_s} for k, m in s["results"].items()},
                        "pairs": {k: [{**asdict(m), "cpu_s": m.cpu_s} for m in v] for k, v in s["pairs"].items()},
                    }
                    for s in sizes
                ],
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
