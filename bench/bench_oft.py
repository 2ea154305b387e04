"""Benchmark merging a PEFT OFT adapter: ``lora-convert merge`` against ``cp -r`` (the floor) and PEFT's recipe.

The base is bench/synth.py's TinyLlama-1.1B-shaped model (22 layers, bf16; ``python bench/synth.py --what base``);
the adapter an OFT adapter as PEFT 0.22 saves it (``oft_R.weight`` (in/b, b(b−1)/2) fp32 on q/k/v/o/gate/up/down,
``oft_block_size`` 32, Cayley-Neumann with 5 terms: PEFT's defaults), written here with random parameters.
Each tool runs as a child process with the page cache dropped (or warmed) before it (measure.py):

  cp    cp -r BASE OUT
  ours  python -m lora_convert.cli merge ADAPTER --base BASE -o OUT --force
  peft  python bench/peft_merge.py BASE ADAPTER OUT   (the whole model in memory, merge_and_unload)

and print wall s, CPU s, peak RSS MB, and how far ours and PEFT's merged tensors lie apart (bf16 ulps).

    python bench/bench_oft.py [--base bench/.cache/synth/base-L22-s0] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT_ROOT, TensorFolder, fmt, lora_convert_cmd, measure_tool, ratio, rm, table  # noqa: E402
from measure import can_drop_caches  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(base: Path, out: Path, block: int = 32, seed: int = 0) -> Path:
    """An OFT adapter for ``base`` as PEFT saves it (random skew parameters, std 0.05)."""
    from peft import OFTConfig

    cfg = json.loads((base / "config.json").read_text())
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    g = torch.Generator().manual_seed(seed)
    n = block * (block - 1) // 2
    tensors = {}
    for i in range(layers):
        for t in TARGETS:
            part = "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            width = inter if t == "down_proj" else hidden
            key = f"base_model.model.model.layers.{i}.{part}.{t}.oft_R.weight"
            tensors[key] = torch.randn(width // block, n, generator=g) * 0.05
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    d = OFTConfig(oft_block_size=block, target_modules=list(TARGETS)).to_dict()
    d.update(peft_type="OFT", target_modules=sorted(TARGETS), peft_version="0.22.0", task_type="CAUSAL_LM")
    (out / "adapter_config.json").write_text(json.dumps(d, indent=2))
    return out


def compare(base: Path, ours: Path, peft: Path, layers: int) -> list[str]:
    """Max |ours − PEFT| on a few tensors, in bf16 ulps of the larger magnitude (PEFT rounds R to the model's
    bf16 before multiplying; ours stays fp32 and rounds once)."""
    fo, fp = TensorFolder(ours), TensorFolder(peft)
    lines = []
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        f"model.layers.{layers // 2}.mlp.down_proj.weight",
        f"model.layers.{layers - 1}.mlp.gate_proj.weight",
    ):
        a, b = fo.get(name).float(), fp.get(name).float()
        ulp = torch.maximum(a.abs(), b.abs()).clamp_min(1e-30) * 2.0**-8
        lines.append(
            f"{name}: max |ours − PEFT| {(a - b).abs().max().item():.3g} ({((a - b).abs() / ulp).max():.2f} ulp)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=BENCH_DIR / ".cache" / "synth" / "base-L22-s0")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args(argv)
    base = args.base.resolve()
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    adapter = make_adapter(base, OUT_ROOT / "oft-adapter")
    outs = {t: OUT_ROOT / f"oft-{t}" for t in ("cp", "ours", "peft")}
    cmds = {
        "cp": ["cp", "-r", str(base), str(outs["cp"])],
        "ours": [*lora_convert_cmd(), "merge", str(adapter), "--base", str(base), "-o", str(outs["ours"]), "--force"],
        "peft": [sys.executable, str(BENCH_DIR / "peft_merge.py"), str(base), str(adapter), str(outs["peft"])],
    }
    tools = ["cp", "ours"] + ([] if args.skip_peft else ["peft"])
    cache = "drop" if can_drop_caches() else "warm"
    runs: dict[str, list] = {t: [] for t in tools}
    for _ in range(args.repeat):
        for t in tools:
            m = measure_tool(t, cmds[t], outs[t], cache=cache, inputs=[base, adapter], timeout=args.timeout)
            runs[t].append(m)
            if m.returncode != 0:
                print(f"[bench] {t} failed: {m.returncode}", file=sys.stderr)
    med = {
        t: {k: statistics.median(getattr(m, k) for m in ms) for k in ("wall_s", "cpu_s", "peak_rss_mb")}
        for t, ms in runs.items()
    }
    rows = [
        [
            t,
            fmt(med[t]["wall_s"]),
            fmt(med[t]["cpu_s"]),
            fmt(med[t]["peak_rss_mb"], 0),
            ratio(med[t]["wall_s"], med["cp"]["wall_s"]),
        ]
        for t in tools
    ]
    print(table(["tool", "wall s", "CPU s", "peak RSS MB", "wall / cp"], rows, right={1, 2, 3, 4}))
    loads = [(m.load_before, m.load_after) for ms in runs.values() for m in ms]
    print(f"cache: {cache}; 1-min load before/after each run: {loads}")
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    if "peft" in tools and all(m.returncode == 0 for m in runs["peft"] + runs["ours"]):
        print("\n".join(compare(base, outs["ours"], outs["peft"], layers)))
    for t in tools:
        rm(outs[t])
    return 0


if __name__ == "__main__":
    sys.exit(main())
