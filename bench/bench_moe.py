"""Benchmark merging LoRA on a mixture-of-experts model: ``cp -r`` (the floor), ``lora-convert merge`` and
PEFT's ``merge_and_unload``, side by side, on synthetic Qwen3-30B-A3B-shaped checkpoints.

Inputs (cached under bench/.cache/synth/, like synth.py's, and built the same way: one tensor at a time,
each from its own seeded generator):

* ``moe-base-L{layers}-E{experts}-s{seed}``: Qwen3-MoE with Qwen3-30B-A3B shapes (hidden 2048, 32 query
  heads / 4 KV heads of 128, q/k norms, expert intermediate 768, 8 experts per token, vocab 151936) and
  fewer layers, stored as transformers saves it: per expert and projection
  (``mlp.experts.{e}.gate_proj.weight``), bf16, 2 GB shards.  2 layers of 128 experts: 3.7 GB.
* ``moe-adapter-r{r}-L{layers}-E{experts}-s{seed}``: a PEFT ``target_parameters`` adapter on
  ``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj`` of every layer (A (E·r, in), B (out, E·r),
  keys ``experts.base_layer.lora_A`` for gate_up_proj) plus q/k/v/o_proj, bf16, with the adapter_config.json
  PEFT 0.21 writes.  ``--verify`` loads it with PEFT at a tiny size and checks logits of our merge.

Each size runs ``cp -r BASE OUT``, ``python -m lora_convert.cli merge ADAPTER --base BASE -o OUT`` and
``python bench/peft_merge.py BASE ADAPTER OUT`` as child processes (bench/measure.py: cold page cache,
wall, CPU, peak RSS).  Running two expert counts at the same layer count shows whether our peak RSS stays
flat as the experts (and the checkpoint) grow; PEFT holds the whole model.

    python bench/bench_moe.py                              # 2 layers, 32 and 128 experts, all three tools
    python bench/bench_moe.py --layers 1 --experts 8 --tiny --verify --skip-peft   # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import synth  # noqa: E402
from common import OUT_ROOT, child_env, fmt, folder_bytes, lora_convert_cmd, measure_tool, ratio, rm, table  # noqa: E402
from measure import Measurement, can_drop_caches  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
PARTS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MoeShape:
    layers: int = 2
    experts: int = 128
    active: int = 8
    hidden: int = 2048
    moe_intermediate: int = 768
    heads: int = 32
    kv_heads: int = 4
    head_dim: int = 128
    vocab: int = 151936

    def tiny(self) -> MoeShape:
        return replace(self, hidden=64, moe_intermediate=32, heads=4, kv_heads=2, head_dim=16, vocab=256)

    def attn_shapes(self) -> dict[str, tuple[int, int]]:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (q, self.hidden),
            "k_proj": (kv, self.hidden),
            "v_proj": (kv, self.hidden),
            "o_proj": (self.hidden, q),
        }

    def part_shape(self, part: str) -> tuple[int, int]:
        i, h = self.moe_intermediate, self.hidden
        return (h, i) if part == "down_proj" else (i, h)

    def base_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for layer in range(self.layers):
            p = f"model.layers.{layer}"
            out += [(f"{p}.self_attn.{m}.weight", s) for m, s in self.attn_shapes().items()]
            out += [
                (f"{p}.self_attn.q_norm.weight", (self.head_dim,)),
                (f"{p}.self_attn.k_norm.weight", (self.head_dim,)),
            ]
            out.append((f"{p}.mlp.gate.weight", (self.experts, self.hidden)))
            out += [
                (f"{p}.mlp.experts.{e}.{part}.weight", self.part_shape(part))
                for e in range(self.experts)
                for part in PARTS
            ]
            out += [
                (f"{p}.input_layernorm.weight", (self.hidden,)),
                (f"{p}.post_attention_layernorm.weight", (self.hidden,)),
            ]
        out += [("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab, self.hidden))]
        return out

    def config_dict(self) -> dict:
        from transformers import Qwen3MoeConfig

        cfg = Qwen3MoeConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=6144,
            moe_intermediate_size=self.moe_intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            num_experts=self.experts,
            num_experts_per_tok=min(self.active, self.experts),
            tie_word_embeddings=False,
            max_position_embeddings=4096,
            dtype="bfloat16",
        )
        cfg.architectures = ["Qwen3MoeForCausalLM"]
        return cfg.to_dict()


def make_base(shape: MoeShape, seed: int, label: str, force: bool = False) -> Path:
    entries = shape.base_tensors()
    shapes = dict(entries)

    def build(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(shape.config_dict(), indent=2) + "\n")
        synth.write_sharded(tmp, entries, lambda n: synth.base_tensor(n, shapes[n], seed), 2 * 10**9)

    params = {"kind": "moe-base", "version": synth.SYNTH_VERSION, "shape": asdict(shape), "seed": seed}
    return synth._cached(synth.DEFAULT_ROOT / f"moe-base-{label}", params, build, force, False)


def adapter_entries(shape: MoeShape, r: int) -> dict[str, tuple[int, int]]:
    """PEFT's saved keys and shapes: gate_up_proj is the inner wrapper (registered first), down_proj the outer."""
    e, h, i = shape.experts, shape.hidden, shape.moe_intermediate
    pre = "base_model.model.model.layers"
    out: dict[str, tuple[int, int]] = {}
    for layer in range(shape.layers):
        for m, (o, n) in shape.attn_shapes().items():
            out[f"{pre}.{layer}.self_attn.{m}.lora_A.weight"] = (r, n)
            out[f"{pre}.{layer}.self_attn.{m}.lora_B.weight"] = (o, r)
        out[f"{pre}.{layer}.mlp.experts.base_layer.lora_A.weight"] = (e * r, h)
        out[f"{pre}.{layer}.mlp.experts.base_layer.lora_B.weight"] = (2 * i, e * r)
        out[f"{pre}.{layer}.mlp.experts.lora_A.weight"] = (e * r, i)
        out[f"{pre}.{layer}.mlp.experts.lora_B.weight"] = (h, e * r)
    return out


def make_adapter(shape: MoeShape, base: Path, r: int, seed: int, label: str, force: bool = False) -> Path:
    entries = adapter_entries(shape, r)

    def produce(name: str) -> torch.Tensor:
        g = synth._gen(seed, "moe-adapter", name)
        scale = 0.02 if ".lora_A." in name else 0.01
        return torch.randn(entries[name], generator=g).mul_(scale).to(torch.bfloat16)

    def build(tmp: Path) -> None:
        cfg = synth.adapter_config_dict(base, r, 2 * r)
        cfg.update(
            target_modules=list(ATTN),
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            peft_version="0.21.2",
        )
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        synth.write_safetensors(tmp / "adapter_model.safetensors", list(entries.items()), produce)

    params = {"kind": "moe-adapter", "version": synth.SYNTH_VERSION, "r": r, "seed": seed, "base": str(base.resolve())}
    return synth._cached(synth.DEFAULT_ROOT / f"moe-adapter-r{r}-{label}", params, build, force, False)


def verify(base: Path, adapter: Path, merged: Path) -> None:
    """At a tiny size: PEFT loads the adapter with no missing/unexpected keys, and our merged model gives
    PEFT's unmerged logits (fp32)."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    def load(p: Path) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()

    pm = PeftModel(load(base), PeftConfig.from_pretrained(adapter))
    res = pm.load_adapter(str(adapter), adapter_name="default")
    if res.missing_keys or res.unexpected_keys:
        raise SystemExit(f"PEFT load: {res}")
    ids = torch.tensor([[1, 5, 9, 17, 33, 2, 64, 80]])
    with torch.no_grad():
        want, got = pm.eval()(ids).logits, load(merged)(ids).logits
    diff = (want - got).abs().max().item()
    print(
        f"[bench] verify: PEFT loads the adapter cleanly; merged vs PEFT unmerged logits max |Δ| = {diff:.2e}",
        file=sys.stderr,
    )
    if diff > 1e-2:  # bf16 weights merged in bf16: a few ulps of the logits
        raise SystemExit("merged logits differ from PEFT's")


def run_size(shape: MoeShape, args: argparse.Namespace, env: dict[str, str]) -> dict:
    label = f"L{shape.layers}-E{shape.experts}{'-tiny' if args.tiny else ''}-s{args.seed}"
    t0 = time.perf_counter()
    base = make_base(shape, args.seed, label)
    adapter = make_adapter(shape, base, args.rank, args.seed, label)
    print(
        f"[bench] {label}: inputs ready in {time.perf_counter() - t0:.1f} s (base {folder_bytes(base) / 1e9:.2f} GB)",
        file=sys.stderr,
    )
    out_root = OUT_ROOT / f"moe-{label}"
    out_root.mkdir(parents=True, exist_ok=True)
    outs = {t: out_root / t for t in ("cp", "ours", "peft")}
    cmds = {
        "cp": ["cp", "-r", str(base), str(outs["cp"])],
        "ours": lora_convert_cmd(args.tool_cmd)
        + ["merge", str(adapter), "--base", str(base), "-o", str(outs["ours"]), "--force"],
        "peft": [sys.executable, str(BENCH_DIR / "peft_merge.py"), str(base), str(adapter), str(outs["peft"])],
    }
    results: dict[str, Measurement] = {}
    for tool in ["cp", "ours"] + ([] if args.skip_peft else ["peft"]):
        results[tool] = measure_tool(
            tool,
            cmds[tool],
            outs[tool],
            cache=args.cache,
            inputs=[base, adapter],
            timeout=args.timeout,
            env=env,
            label=f"{label}: ",
        )
    if args.verify and results["ours"].ok:
        verify(base, adapter, outs["ours"])
    if not args.keep:
        for p in outs.values():
            rm(p)
    return {"label": label, "experts": shape.experts, "base_bytes": folder_bytes(base), "results": results}


def report(sizes: list[dict]) -> str:
    rows = []
    for s in sizes:
        for tool, m in s["results"].items():
            rows.append(
                [
                    tool,
                    s["experts"],
                    fmt(s["base_bytes"] / 1e9, 2),
                    fmt(m.wall_s, 2),
                    fmt(m.cpu_s, 2),
                    fmt(m.peak_rss_mb, 0),
                    fmt(m.extra["out_bytes"] / 1e6, 0),
                    f"{m.load_before:.1f}/{m.load_after:.1f}",
                    "ok" if m.ok else m.failure(100),
                ]
            )
    out = [
        table(
            ["tool", "experts", "base GB", "wall s", "CPU s", "peak RSS MB", "out MB", "load b/a", "status"],
            rows,
            right={1, 2, 3, 4, 5, 6},
        )
    ]
    ratio_rows = []
    for s in sizes:
        r = s["results"]

        def g(tool: str, attr: str, r: dict = r) -> float | None:
            m = r.get(tool)
            return getattr(m, attr) if m is not None and m.ok else None

        ratio_rows.append(
            [
                s["experts"],
                ratio(g("ours", "wall_s"), g("cp", "wall_s")),
                ratio(g("peft", "wall_s"), g("ours", "wall_s")),
                ratio(g("peft", "peak_rss_mb"), g("ours", "peak_rss_mb")),
            ]
        )
    out += ["", table(["experts", "merge / cp wall", "PEFT / merge wall", "PEFT / merge RSS"], ratio_rows)]
    rss = [(s["experts"], s["results"]["ours"].peak_rss_mb) for s in sizes if s["results"]["ours"].ok]
    if len(rss) > 1:
        out.append(
            "lora-convert merge peak RSS by expert count: "
            + ", ".join(f"E={e}: {v:.0f} MB" for e, v in rss)
            + f" (largest/smallest {max(v for _, v in rss) / min(v for _, v in rss):.2f}x)"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument(
        "--experts", type=int, nargs="+", default=[32, 128], help="expert counts to compare (default 32 128)"
    )
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank per expert")
    ap.add_argument("--tiny", action="store_true", help="tiny hidden sizes (a smoke run of the whole bench)")
    ap.add_argument("--verify", action="store_true", help="check PEFT's load and our merged logits (use with --tiny)")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--keep", action="store_true", help=f"keep the outputs under {OUT_ROOT}")
    ap.add_argument("--cache", choices=("drop", "warm", "none"), default="drop")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tool-cmd", help="how to call lora-convert (default: python -m lora_convert.cli)")
    ap.add_argument("--json", type=Path, help="also write the raw measurements here")
    args = ap.parse_args(argv)
    if args.cache == "drop" and not can_drop_caches():
        print("[bench] cannot drop the page cache (not root?): warming inputs before each run instead", file=sys.stderr)
    env = child_env()
    shapes = [MoeShape(layers=args.layers, experts=e) for e in args.experts]
    sizes = [run_size(s.tiny() if args.tiny else s, args, env) for s in shapes]
    print(report(sizes))
    if args.json:
        args.json.write_text(
            json.dumps([{**s, "results": {k: asdict(m) for k, m in s["results"].items()}} for s in sizes], indent=2)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
