"""Benchmark merging into an fp8 block-scaled base: ``lora-convert merge`` against the usual recipe.

The synthetic TinyLlama-1.1B-shaped base (bench/synth.py) is stored as DeepSeek-V3 / Qwen3-FP8 store
theirs — every projection ``F8_E4M3`` with an F32 ``weight_scale_inv`` per 128x128 block (transformers'
``Fp8Quantize`` rounding), embeddings, norms and ``lm_head`` bf16, ``quant_method: fp8`` in config.json —
and the r=16 adapter is merged into it, each tool as a child process with the page cache dropped first
(measure.py):

  cp        cp -r FP8_BASE OUT                                              (the floor)
  ours      python -m lora_convert.cli merge ADAPTER --base FP8_BASE -o OUT (dequantize, merge, bf16)
  ours-rq   ... --requantize                                                (written back as fp8)
  peft      python bench/peft_merge.py FP8_BASE ADAPTER OUT                 (transformers dequantizes on
            load on a CPU, PeftModel, merge_and_unload, save_pretrained: the usual recipe)

It prints wall s, CPU s, peak RSS MB, the ratios to ours, and how far the merged tensors lie from the
exact merge round(fp32(q·s) + ΔW).

    python bench/bench_quant.py                  # 22 layers (2.2 GB bf16, 1.3 GB fp8)
    python bench/bench_quant.py --layers 1 --keep   # quick check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's lora_convert (fp8 codec)

import synth  # noqa: E402
from common import OUT_ROOT, TensorFolder, fmt, folder_bytes, lora_convert_cmd, measure_tool, ratio, rm, table  # noqa: E402
from measure import Measurement, can_drop_caches  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def make_fp8_base(bf16_base: Path, layers: int, seed: int, force: bool = False) -> Path:
    """The synthetic base with every projection fp8 block-scaled, written a tensor at a time."""
    from lora_convert.io.reader import open_checkpoint
    from lora_convert.io.writer import PlannedTensor, SafetensorsWriter
    from lora_convert.quant import fp8

    params = {"kind": "fp8-base", "version": synth.SYNTH_VERSION, "layers": layers, "seed": seed, "quant": QUANT}

    def build(tmp: Path) -> None:
        src = open_checkpoint(bf16_base)
        plan, jobs = [], []
        for name, info in src.tensors.items():
            shape = tuple(info.shape)
            if name.endswith("proj.weight"):
                grid = (-(-shape[0] // 128), -(-shape[1] // 128))
                plan += [PlannedTensor(name, torch.float8_e4m3fn, shape)]
                plan += [PlannedTensor(name + "_scale_inv", torch.float32, grid)]
                jobs.append(name)
            else:
                plan.append(PlannedTensor(name, torch.bfloat16, shape))
        writer = SafetensorsWriter(tmp, plan, max_shard_size=2 * 10**9)
        for name in src.tensors:
            w = src.read(name)
            if name in jobs:
                q, s = fp8.quantize_fp8_block(w.float(), (128, 128))
                writer.write(name, q)
                writer.write(name + "_scale_inv", s)
            else:
                writer.write(name, w)
        writer.close()
        src.close()
        cfg = json.loads((bf16_base / "config.json").read_text())
        (tmp / "config.json").write_text(json.dumps({**cfg, "quantization_config": QUANT}, indent=2) + "\n")

    return synth._cached(Path(synth.DEFAULT_ROOT) / f"fp8-base-L{layers}-s{seed}", params, build, force, False)


def compare(fp8_base: Path, adapter: Path, outs: dict[str, Path], layers: int) -> list[str]:
    """Max abs difference of a few merged tensors from round_bf16(fp32 dequantized + s·B·A)."""
    from lora_convert.quant import fp8

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    fb, fa = TensorFolder(fp8_base), TensorFolder(adapter)
    folders = {k: TensorFolder(p) for k, p in outs.items() if k in ("ours", "peft") and p.exists()}
    names = ["model.layers.0.self_attn.q_proj.weight", f"model.layers.{layers - 1}.mlp.down_proj.weight"]
    lines = []
    for name in names:
        w = fp8.dequantize_rows(fb.get(name), fb.get(name + "_scale_inv"), 0, (128, 128))
        pa = f"base_model.model.{name.removesuffix('.weight')}"
        ref = (w + scale * fa.get(f"{pa}.lora_B.weight").float() @ fa.get(f"{pa}.lora_A.weight").float()).bfloat16()
        parts = [f"{name:<44}"]
        for tool, f in folders.items():
            parts.append(f"{tool}-exact {(f.get(name).float() - ref.float()).abs().max().item():9.2e}")
        lines.append("  ".join(parts))
    return lines


def run(args: argparse.Namespace) -> tuple[dict[str, Measurement], list[str], int]:
    t0 = time.perf_counter()
    base = synth.make_base(args.layers, args.seed)
    adapter = synth.make_adapter(base, args.layers, args.seed)
    fp8_base = make_fp8_base(base, args.layers, args.seed)
    print(
        f"[bench] inputs ready in {time.perf_counter() - t0:.1f} s; fp8 base {folder_bytes(fp8_base) / 1e9:.2f} GB",
        file=sys.stderr,
    )
    root = OUT_ROOT / f"quant-L{args.layers}"
    root.mkdir(parents=True, exist_ok=True)
    outs = {t: root / t for t in ("cp", "ours", "ours-rq", "peft")}
    merge = lora_convert_cmd(args.tool_cmd) + ["merge", str(adapter), "--base", str(fp8_base), "--force", "-o"]
    cmds = {
        "cp": ["cp", "-r", str(fp8_base), str(outs["cp"])],
        "ours": merge + [str(outs["ours"])],
        "ours-rq": merge + [str(outs["ours-rq"]), "--requantize"],
        "peft": [sys.executable, str(BENCH_DIR / "peft_merge.py"), str(fp8_base), str(adapter), str(outs["peft"])],
    }
    tools = ["cp", "ours", "ours-rq"] + ([] if args.skip_peft else ["peft"])
    results = {}
    for tool in tools:
        results[tool] = measure_tool(
            tool, cmds[tool], outs[tool], cache=args.cache, inputs=[fp8_base, adapter], timeout=args.timeout
        )
    diff = compare(fp8_base, adapter, outs, args.layers)
    if not args.keep:
        for p in outs.values():
            rm(p)
    return results, diff, folder_bytes(fp8_base)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--keep", action="store_true", help=f"keep the outputs under {OUT_ROOT}")
    ap.add_argument("--cache", choices=("drop", "warm", "none"), default="drop")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--tool-cmd", help="how to call lora-convert (default: python -m lora_convert.cli)")
    args = ap.parse_args(argv)
    if args.cache == "drop" and not can_drop_caches():
        print("[bench] cannot drop the page cache (not root?): warming inputs instead", file=sys.stderr)
    results, diff, base_bytes = run(args)
    label = {
        "cp": "cp -r (floor)",
        "ours": "lora-convert merge",
        "ours-rq": "lora-convert merge --requantize",
        "peft": "transformers dequantize + PEFT merge",
    }
    rows = [
        [
            label[t],
            fmt(m.wall_s, 2),
            fmt(m.cpu_s, 2),
            fmt(m.peak_rss_mb, 0),
            fmt(m.extra["out_bytes"] / 1e6, 0),
            "ok" if m.ok else m.failure(100),
        ]
        for t, m in results.items()
    ]
    print(f"fp8 base: {args.layers} layers, {base_bytes / 1e9:.2f} GB on disk")
    print(table(["tool", "wall s", "CPU s", "peak RSS MB", "out MB", "status"], rows, right={1, 2, 3, 4}))
    ours, peft = results.get("ours"), results.get("peft")
    if ours is not None and peft is not None and ours.ok and peft.ok:
        print(
            f"usual recipe / ours: wall {ratio(peft.wall_s, ours.wall_s)}, peak RSS {ratio(peft.peak_rss_mb, ours.peak_rss_mb)}"
        )
    print("merged tensors, max abs diff from round_bf16(fp32 q·s + s·B·A):")
    print("\n".join("  " + ln for ln in diff))
    return 0


if __name__ == "__main__":
    sys.exit(main())
