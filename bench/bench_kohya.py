"""Benchmark merging a kohya LoRA into a diffusers UNet: ``lora-convert merge`` against ``cp -r`` (the
floor) and diffusers' own recipe (``load_lora_adapter`` + ``fuse_lora`` + ``save_pretrained``).

Inputs, cached under ``bench/.cache/kohya/`` (git-ignored) and reused when their parameters match:

* a UNet2DConditionModel folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) with
  SDXL's config — ``--size sdxl``: 2.6 B parameters, 5.1 GB fp16; ``small``: the same blocks with one
  transformer layer each (1.3 GB); ``tiny``: a few MB, to check the script — random fp16 weights
  written tensor by tensor (std 0.02, norms 1);
* a kohya file as sd-scripts writes one for SDXL with conv LoRA: rank 32 / alpha 16 on every
  attention, feed-forward and proj_in/out Linear, rank 8 / alpha 4 on every ResNet's 3×3 conv1/conv2,
  fp16, diffusers' module names (``lora_unet_down_blocks_1_attentions_0_...``; sd-scripts itself uses
  SGM names for SDXL, which both tools renumber from the UNet's config).

Each tool runs as a child process with the page cache dropped before it (see measure.py):

  cp         cp -r BASE OUT
  ours       python -m lora_convert.cli merge LORA --base BASE -o OUT --force
  diffusers  python bench/diffusers_fuse.py BASE LORA OUT

and the table gives wall s, CPU s, peak RSS MB, the ratios, and how far the merged tensors of each lie
from an fp32 reference (W + alpha/r · up·down, rounded once to fp16).

``--algo loha`` / ``--algo lokr``: the same modules as a LyCORIS file instead (LoHa rank 32 Linear / 8 conv;
LoKr with LyCORIS's default factorisation, w1 whole and w2 = w2_a·w2_b of rank 8 (Linear) or whole (conv);
alpha = rank, so
lycoris-lora's ``merge_to``, which applies alpha/rank twice, merges the same ΔW), and the third tool is
lycoris-lora's own merge (``python bench/lycoris_merge.py BASE LORA OUT``) instead of diffusers, which does not
load these files.

    python bench/bench_kohya.py                  # SDXL size
    python bench/bench_kohya.py --size tiny      # seconds: checks the script end to end
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import synth  # noqa: E402
from common import OUT_ROOT, TensorFolder, fmt, folder_bytes, lora_convert_cmd, measure_tool, ratio, rm, table  # noqa: E402
from measure import Measurement, can_drop_caches  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
CACHE = BENCH_DIR / ".cache" / "kohya"
SDXL = {  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SIZES = {
    "sdxl": SDXL,
    "small": {**SDXL, "transformer_layers_per_block": [1, 1, 1]},
    "tiny": {
        **SDXL,
        "attention_head_dim": [2, 2, 4],
        "block_out_channels": [32, 64, 128],
        "cross_attention_dim": 64,
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 64 + 6 * 8,
        "norm_num_groups": 8,
        "transformer_layers_per_block": [1, 1, 2],
    },
}
LINEAR = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
CONV = ("conv1", "conv2")


def _shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter of the UNet, from a model built on the meta device (no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    return [(n, tuple(p.shape)) for n, p in model.state_dict().items()]


def make_base(size: str, seed: int) -> Path:
    config = SIZES[size]

    def build(folder: Path) -> None:
        def produce(name: str) -> torch.Tensor:
            shape = dict(entries)[name]
            t = torch.randn(shape, generator=synth._gen(seed, "unet", name)).mul_(0.02)
            return (t.add_(1.0) if len(shape) == 1 and "norm" in name else t).to(torch.float16)

        entries = _shapes(config)
        synth.write_safetensors(folder / "diffusion_pytorch_model.safetensors", entries, produce, torch.float16)
        (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **config}, indent=2))

    return synth._cached(CACHE / f"unet-{size}-s{seed}", {"size": size, "seed": seed}, build, False, False)


def lora_modules(base: Path) -> dict[str, tuple[tuple[int, ...], int, float]]:
    """module -> (its weight's shape, rank, alpha) for the LoRA this benchmark merges."""
    shapes = {k.removesuffix(".weight"): v for k, v in _shapes(json.loads((base / "config.json").read_text()))}
    out = {}
    for mod, shape in shapes.items():
        if "transformer_blocks" in mod or mod.endswith(("proj_in", "proj_out")):
            if mod.endswith(LINEAR) and len(shape) == 2:
                out[mod] = (shape, 32, 16.0)
        elif ".resnets." in mod and mod.endswith(CONV):
            out[mod] = (shape, 8, 4.0)
    return out


def make_lora(base: Path, seed: int) -> Path:
    modules = lora_modules(base)

    def factors(mod: str) -> tuple[torch.Tensor, torch.Tensor]:
        shape, r, _ = modules[mod]
        g = synth._gen(seed, "kohya", mod)
        down = torch.randn((r, *shape[1:]), generator=g).mul_(0.02).to(torch.float16)
        up = torch.randn((shape[0], r, *([1] * (len(shape) - 2))), generator=g).mul_(0.01).to(torch.float16)
        return down, up

    def build(folder: Path) -> None:
        entries = []
        for mod, (shape, r, _) in modules.items():
            name = "lora_unet_" + mod.replace(".", "_")
            entries.append((f"{name}.lora_down.weight", (r, *shape[1:])))
            entries.append((f"{name}.lora_up.weight", (shape[0], r, *([1] * (len(shape) - 2)))))
            entries.append((f"{name}.alpha", ()))
        by_name = {"lora_unet_" + m.replace(".", "_"): m for m in modules}

        def produce(key: str) -> torch.Tensor:
            name, _, role = key.partition(".")
            mod = by_name[name]
            if role == "alpha":
                return torch.tensor(modules[mod][2], dtype=torch.float16)
            return factors(mod)[0 if role.startswith("lora_down") else 1]

        synth.write_safetensors(folder / "lora.safetensors", entries, produce, torch.float16)

    return synth._cached(CACHE / f"{base.name}-lora", {"base": base.name, "seed": seed}, build, False, False)


RANKS = {"loha": (32, 8), "lokr": (8, 4)}  # (Linear, conv) rank of the LyCORIS files


def lycoris_entries(base: Path, algo: str) -> dict[str, tuple[int, ...]]:
    """key -> shape of the LyCORIS file of ``algo`` on the benchmark's modules (alpha = rank: scale 1)."""
    from lycoris.functional.general import factorization

    out: dict[str, tuple[int, ...]] = {}
    for mod, (shape, lr, _) in lora_modules(base).items():
        name = "lora_unet_" + mod.replace(".", "_")
        r = RANKS[algo][0 if lr == 32 else 1]
        cols = int(torch.tensor(shape[1:]).prod())
        if algo == "loha":
            for i in ("1", "2"):
                out[f"{name}.hada_w{i}_a"], out[f"{name}.hada_w{i}_b"] = (shape[0], r), (r, cols)
        else:
            (a, b), (c, d) = factorization(shape[0], -1), factorization(shape[1], -1)
            out[f"{name}.lokr_w1"] = (a, c)
            if len(shape) > 2:  # conv: w2 whole (b, d, k, k), as LyCORIS keeps it at a large conv_dim; with
                # w2_a/w2_b lycoris-lora 4.1.3 cannot load its own file where in ≠ out (up_blocks.1.resnets.0.conv1:
                # make_module_from_state_dict guesses the factor from w2_b's d·k·k columns)
                out[f"{name}.lokr_w2"] = (b, d, *shape[2:])
            else:
                r = min(r, (max(b, d) - 1) // 2)  # below half of w2's larger side, or LyCORIS builds w2 whole
                out[f"{name}.lokr_w2_a"], out[f"{name}.lokr_w2_b"] = (b, r), (r, d)
        out[f"{name}.alpha"] = ()
    return out


def make_lycoris(base: Path, seed: int, algo: str) -> Path:
    entries = lycoris_entries(base, algo)

    def build(folder: Path) -> None:
        def produce(key: str) -> torch.Tensor:
            shape = entries[key]
            if not shape:  # alpha = rank (scale 1; both LoKr sides whole: LyCORIS's scale is 1 anyway)
                rank = entries.get(key.replace(".alpha", ".hada_w1_b" if algo == "loha" else ".lokr_w2_b"), (1,))[0]
                return torch.tensor(float(rank), dtype=torch.float16)
            std = 0.1 if key.endswith(("_a", "lokr_w1")) else 0.05
            return torch.randn(shape, generator=synth._gen(seed, algo, key)).mul_(std).to(torch.float16)

        synth.write_safetensors(folder / "lora.safetensors", list(entries.items()), produce, torch.float16)

    return synth._cached(CACHE / f"{base.name}-{algo}", {"base": base.name, "seed": seed}, build, False, False)


def lycoris_delta(fl: TensorFolder, name: str, algo: str, shape: tuple[int, ...]) -> torch.Tensor:
    """fp32 ΔW of one module of a LyCORIS file, by the formula (scale 1: alpha = rank)."""
    if algo == "loha":
        w1 = fl.get(f"{name}.hada_w1_a").float() @ fl.get(f"{name}.hada_w1_b").float()
        return (w1 * (fl.get(f"{name}.hada_w2_a").float() @ fl.get(f"{name}.hada_w2_b").float())).reshape(shape)
    w1 = fl.get(f"{name}.lokr_w1").float()
    if len(shape) > 2:  # w2 whole (b, d, k, k): kron with w1 as a 1×1 kernel
        return torch.kron(w1[:, :, None, None], fl.get(f"{name}.lokr_w2").float())
    return torch.kron(w1, fl.get(f"{name}.lokr_w2_a").float() @ fl.get(f"{name}.lokr_w2_b").float())


def compare(base: Path, lora: Path, outs: dict[str, Path], algo: str = "lora") -> list[str]:
    """Max abs difference to the fp32 reference on a few merged tensors (Linear and conv)."""
    fb, fl = TensorFolder(base), TensorFolder(lora.parent)
    mods = lora_modules(base)
    picks = [m for m in mods if m.endswith("attn2.to_k")][:1] + [m for m in mods if m.endswith("ff.net.2")][-1:]
    picks += [m for m in mods if m.endswith("conv1")][:1] + [m for m in mods if m.endswith("proj_in")][-1:]
    folders = {k: TensorFolder(v) for k, v in outs.items() if v.exists()}
    lines = []
    for mod in picks:
        name = "lora_unet_" + mod.replace(".", "_")
        w = fb.get(f"{mod}.weight").float()
        if algo != "lora":
            delta = lycoris_delta(fl, name, algo, tuple(w.shape))
        else:
            down, up = fl.get(f"{name}.lora_down.weight").float(), fl.get(f"{name}.lora_up.weight").float()
            alpha, r = fl.get(f"{name}.alpha").float().item(), down.shape[0]
            delta = (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(w.shape) * (alpha / r)
        ref = (w + delta).to(torch.float16).float()
        parts = [f"{mod:<70}"]
        for tool, f in folders.items():
            parts.append(f"{tool} {(f.get(f'{mod}.weight').float() - ref).abs().max().item():9.2e}")
        lines.append("  ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="sdxl")
    ap.add_argument("--algo", choices=("lora", "loha", "lokr"), default="lora", help="the file's algorithm")
    ap.add_argument("--skip-diffusers", action="store_true", help="(and, with --algo loha/lokr, lycoris-lora)")
    ap.add_argument("--keep", action="store_true", help=f"keep the outputs under {OUT_ROOT}")
    ap.add_argument("--cache", choices=("drop", "warm", "none"), default="drop")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tool-cmd", help="how to call lora-convert (default: python -m lora_convert.cli)")
    args = ap.parse_args(argv)
    if args.cache == "drop" and not can_drop_caches():
        print("[bench] cannot drop the page cache (not root?): warming inputs before each run instead", file=sys.stderr)
    t0 = time.perf_counter()
    base = make_base(args.size, args.seed)
    lycoris = args.algo != "lora"
    lora = (make_lycoris(base, args.seed, args.algo) if lycoris else make_lora(base, args.seed)) / "lora.safetensors"
    print(
        f"[bench] inputs ready in {time.perf_counter() - t0:.1f} s (UNet {folder_bytes(base) / 1e9:.2f} GB, "
        f"LoRA {folder_bytes(lora) / 1e6:.0f} MB)",
        file=sys.stderr,
    )
    out_root = OUT_ROOT / f"kohya-{args.size}{'-' + args.algo if lycoris else ''}"
    out_root.mkdir(parents=True, exist_ok=True)
    lib = "lycoris" if lycoris else "diffusers"  # the library's own merge
    outs = {t: out_root / t for t in ("cp", "ours", lib)}
    cmds = {
        "cp": ["cp", "-r", str(base), str(outs["cp"])],
        "ours": lora_convert_cmd(args.tool_cmd) + ["merge", str(lora), "--base", str(base), "-o", str(outs["ours"])],
        lib: [
            sys.executable,
            str(BENCH_DIR / ("lycoris_merge.py" if lycoris else "diffusers_fuse.py")),
            str(base),
            str(lora),
            str(outs[lib]),
        ],
    }
    tools = ["cp", "ours"] + ([] if args.skip_diffusers else [lib])
    results: dict[str, Measurement] = {}
    for tool in tools:
        results[tool] = measure_tool(
            tool, cmds[tool], outs[tool], cache=args.cache, inputs=[base, lora], timeout=args.timeout
        )
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
    print(table(["tool", "wall s", "CPU s", "peak RSS MB", "out MB", "load b/a", "status"], rows))
    cache = {m.cache for m in results.values()}
    print(
        f"UNet size {args.size}, {args.algo}; page cache before each run: {', '.join(sorted(cache))} ({os.cpu_count()} CPUs)"
    )

    def g(tool: str, attr: str) -> float | None:
        m = results.get(tool)
        return getattr(m, attr) if m is not None and m.ok else None

    print(
        f"merge wall / cp wall {ratio(g('ours', 'wall_s'), g('cp', 'wall_s'))}; {lib} wall / merge wall "
        f"{ratio(g(lib, 'wall_s'), g('ours', 'wall_s'))}; {lib} RSS / merge RSS "
        f"{ratio(g(lib, 'peak_rss_mb'), g('ours', 'peak_rss_mb'))}"
    )
    what = "ΔW by its formula" if lycoris else "alpha/r·up·down"
    print(f"merged tensors, max abs diff to fp32 W + {what} rounded once to fp16:")
    for line in compare(base, lora, {t: outs[t] for t in ("ours", lib) if t in results}, args.algo):
        print("  " + line)
    if not args.keep:
        for p in outs.values():
            rm(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
