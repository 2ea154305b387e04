"""Synthetic Llama-shaped checkpoints for the benchmarks: TinyLlama-1.1B shapes (``--size 1b``, the
default) or Llama-3-8B shapes (``--size 8b``: hidden 4096, intermediate 14336, 32 heads / 8 KV heads,
vocab 128256, 5 GB shards; folders named ``base-8b-L{layers}-s{seed}``...).

Three folders are made, each cached under ``bench/.cache/synth/`` (git-ignored) and
reused when their parameters match:

* ``base-L{layers}-s{seed}``: a Llama checkpoint with TinyLlama-1.1B shapes (hidden 2048,
  intermediate 5632, 32 heads / 4 KV heads, vocab 32000, untied ``lm_head``), random bf16
  weights of scale ~0.02, a real ``config.json`` (loads with
  ``AutoModelForCausalLM.from_pretrained``) and ``generation_config.json``, written as
  sharded safetensors (2 GB shards) plus ``model.safetensors.index.json``.
* ``adapter-r16-L{layers}-s{seed}``: an r=16 PEFT LoRA adapter on the seven linears of
  every layer plus ``embed_tokens`` and ``lm_head``, in PEFT's saved-key layout, with
  non-zero B, bf16, and an ``adapter_config.json`` as PEFT 0.21 writes it.
* ``tuned-r16-L{layers}-s{seed}``: base + a random rank-16 delta on the seven linears of
  every layer (+ small full-rank noise), same layout as the base: the input of the
  extraction benchmark.

Every tensor comes from its own ``torch.Generator`` seeded from (seed, name), and each
file is streamed to disk tensor by tensor (the header is planned first), so memory stays
at about one tensor and the base can be regenerated exactly when building ``tuned``.

    python bench/synth.py                       # 22 layers: base, adapter, tuned
    python bench/synth.py --layers 2 --verify   # small one, checked with transformers+PEFT
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_ROOT = BENCH_DIR / ".cache" / "synth"
MARKER = "synth.json"
SYNTH_VERSION = 1  # bump when the generated content changes, to invalidate caches

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_TARGETS = LINEARS + ("embed_tokens", "lm_head")

_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class ModelShape:
    layers: int = 22
    hidden: int = 2048
    intermediate: int = 5632
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of the seven linears of a layer, keyed by module name."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return {
            "q_proj": (h, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, h),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }

    @staticmethod
    def module_path(layer: int, mod: str) -> str:
        group = "mlp" if mod in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        return f"model.layers.{layer}.{group}.{mod}"

    def base_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """All base weights in state-dict order."""
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        shapes = self.linear_shapes()
        for layer in range(self.layers):
            for mod in LINEARS:
                out.append((f"{self.module_path(layer, mod)}.weight", shapes[mod]))
            out.append((f"model.layers.{layer}.input_layernorm.weight", (self.hidden,)))
            out.append((f"model.layers.{layer}.post_attention_layernorm.weight", (self.hidden,)))
        out.append(("model.norm.weight", (self.hidden,)))
        out.append(("lm_head.weight", (self.vocab, self.hidden)))
        return out

    def param_count(self) -> int:
        return sum(math.prod(s) for _, s in self.base_tensors())

    def config_dict(self) -> dict:
        # What transformers 5.24's LlamaConfig(...).save_pretrained writes for these shapes.
        return {
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "dtype": "bfloat16",
            "eos_token_id": 2,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": 2048,
            "mlp_bias": False,
            "model_type": "llama",
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "pad_token_id": None,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "tie_word_embeddings": False,
            "transformers_version": "5.24.0",
            "use_cache": True,
            "vocab_size": self.vocab,
        }


SIZES = {
    "1b": ModelShape(),  # TinyLlama-1.1B
    "8b": ModelShape(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256),  # Llama-3-8B
}
SHARD_BYTES = {"1b": 2 * 10**9, "8b": 5 * 10**9}


def shape_for(size: str, layers: int) -> ModelShape:
    return replace(SIZES[size], layers=layers)


def _folder(kind: str, size: str, layers: int, seed: int) -> str:
    """Cache folder names; the 1b ones keep their old names so existing caches stay valid."""
    tag = f"L{layers}" if size == "1b" else f"{size}-L{layers}"
    return f"{kind}-{tag}-s{seed}"


def check_free_space(root: Path, need_bytes: int, what: str) -> None:
    """Refuse, before writing anything, when the disk cannot hold what is about to be generated."""
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < need_bytes * 1.05:
        raise SystemExit(
            f"[synth] not enough free disk for {what}: {need_bytes / 1e9:.1f} GB needed, "
            f"{free / 1e9:.1f} GB free under {root} (free space, or pass --root elsewhere)"
        )


GENERATION_CONFIG = {
    "_from_model_config": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "output_attentions": False,
    "output_hidden_states": False,
    "transformers_version": "5.24.0",
    "use_cache": True,
}


def adapter_config_dict(base: Path, r: int, alpha: int) -> dict:
    """adapter_config.json as PEFT 0.21.2's LoraConfig.save_pretrained writes it."""
    return {
        "alora_invocation_tokens": None,
        "alpha_pattern": {},
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": str(base),
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "monteclora_config": None,
        "peft_type": "LORA",
        "peft_version": "0.21.2",
        "qalora_group_size": 16,
        "r": r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": list(ADAPTER_TARGETS),
        "target_parameters": None,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": False,
        "velora_config": None,
    }


# ------------------------------------------------------------------ random tensors


def _gen(seed: int, *key: object) -> torch.Generator:
    digest = hashlib.sha256(repr((seed,) + key).encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def base_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The base weight ``name``, bf16: N(0, 0.02) matrices, 1 + N(0, 0.02) norms."""
    g = _gen(seed, "base", name)
    t = torch.randn(shape, generator=g, dtype=torch.float32).mul_(0.02)
    if len(shape) == 1:
        t.add_(1.0)
    return t.to(torch.bfloat16)


def adapter_factors(name: str, out_f: int, in_f: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in) and B (out, r), bf16, for the adapter.  With scale alpha/r = 2 the
    delta B@A*2 has element std ~ 8 * 0.02 * 0.01 = 1.6e-3, ~8% of the base weights."""
    g = _gen(seed, "adapter", name)
    a = torch.randn((r, in_f), generator=g).mul_(0.02).to(torch.bfloat16)
    b = torch.randn((out_f, r), generator=g).mul_(0.01).to(torch.bfloat16)
    return a, b


def tuned_delta(name: str, w: torch.Tensor, r: int, rel: float, noise: float, seed: int) -> torch.Tensor:
    """fp32 delta for the tuned checkpoint: a random rank-``r`` matrix with decaying
    singular values and ||delta||_F = rel * ||W||_F, plus i.i.d. full-rank noise of
    std ``noise`` * std(W)."""
    g = _gen(seed, "tuned", name)
    out_f, in_f = w.shape
    u = torch.linalg.qr(torch.randn((out_f, r), generator=g))[0]
    v = torch.linalg.qr(torch.randn((in_f, r), generator=g))[0]
    s = 1.0 / (1.0 + torch.arange(r, dtype=torch.float32) / 4.0)  # 1 .. 0.21
    delta = (u * s) @ v.T
    wf = w.float()
    delta.mul_(rel * wf.norm() / delta.norm())
    if noise > 0:
        delta.add_(torch.randn((out_f, in_f), generator=g).mul_(noise * wf.std()))
    return delta


# ------------------------------------------------------------ streaming safetensors


def _tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def write_safetensors(
    path: Path,
    entries: list[tuple[str, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    dtype: torch.dtype = torch.bfloat16,
) -> int:
    """Write a safetensors file whose tensors come one at a time from ``produce(name)``.

    The header is planned from ``entries`` first, so only one tensor is in memory at a
    time.  Returns the number of data bytes written."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        n = _tensor_nbytes(shape, dtype)
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in entries:
            t = produce(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise AssertionError(f"{name}: produced {tuple(t.shape)} {t.dtype}, planned {shape} {dtype}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return offset


def write_sharded(
    folder: Path,
    entries: list[tuple[str, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    max_shard_bytes: int,
    dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Shards named like transformers' save_pretrained, plus model.safetensors.index.json."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in entries:
        n = _tensor_nbytes(shape, dtype)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", shards[0], produce, dtype)
        return
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(folder / fname, shard, produce, dtype)
        weight_map.update({name: fname for name, _ in shard})
    index = {
        "metadata": {"total_parameters": sum(math.prod(s) for _, s in entries), "total_size": total},
        "weight_map": weight_map,
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# -------------------------------------------------------------------------- caching


def _cached(folder: Path, params: dict, build: Callable[[Path], None], force: bool, quiet: bool) -> Path:
    """Reuse ``folder`` when its marker holds ``params``; otherwise build it in a
    sibling ``.partial`` folder and rename it into place (so a killed run leaves no
    half-written cache)."""
    marker = folder / MARKER
    if not force and marker.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                if not quiet:
                    print(f"[synth] reusing {folder}", file=sys.stderr)
                return folder
        except (OSError, ValueError):
            pass
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    build(tmp)
    (tmp / MARKER).write_text(json.dumps(params, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    if not quiet:
        print(f"[synth] wrote {folder} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return folder


def _write_configs(folder: Path, shape: ModelShape) -> None:
    (folder / "config.json").write_text(json.dumps(shape.config_dict(), indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")


def make_base(
    layers: int = 22,
    seed: int = 0,
    root: Path = DEFAULT_ROOT,
    max_shard_bytes: int | None = None,
    force: bool = False,
    quiet: bool = False,
    size: str = "1b",
) -> Path:
    shape = shape_for(size, layers)
    max_shard_bytes = max_shard_bytes or SHARD_BYTES[size]
    params = {
        "kind": "base",
        "version": SYNTH_VERSION,
        "shape": asdict(shape),
        "seed": seed,
        "max_shard_bytes": max_shard_bytes,
    }
    entries = shape.base_tensors()
    shapes = dict(entries)

    def build(tmp: Path) -> None:
        check_free_space(Path(root), shape.param_count() * 2, f"the {size} base ({layers} layers)")
        _write_configs(tmp, shape)
        write_sharded(tmp, entries, lambda n: base_tensor(n, shapes[n], seed), max_shard_bytes)

    return _cached(Path(root) / _folder("base", size, layers, seed), params, build, force, quiet)


def make_adapter(
    base: Path,
    layers: int = 22,
    seed: int = 0,
    r: int = 16,
    alpha: int = 32,
    root: Path = DEFAULT_ROOT,
    force: bool = False,
    quiet: bool = False,
    size: str = "1b",
) -> Path:
    shape = shape_for(size, layers)
    base = Path(base).resolve()
    params = {
        "kind": "adapter",
        "version": SYNTH_VERSION,
        "shape": asdict(shape),
        "seed": seed,
        "r": r,
        "alpha": alpha,
        "base": str(base),
    }
    p = "base_model.model."
    entries: list[tuple[str, tuple[int, ...]]] = []
    factors: dict[str, tuple[str, str, int, int]] = {}  # tensor name -> (module, A|B, out, in)
    # PEFT's embedding LoRA: lora_embedding_A (r, vocab), lora_embedding_B (hidden, r);
    # delta = (B @ A).T * alpha / r.
    for mod, out_f, in_f, kind in (
        ["model.embed_tokens", shape.hidden, shape.vocab, "emb"],
        *[[shape.module_path(i, m), *shape.linear_shapes()[m], "lin"] for i in range(layers) for m in LINEARS],
        ["lm_head", shape.vocab, shape.hidden, "lin"],
    ):
        if kind == "emb":
            names = (f"{p}{mod}.lora_embedding_A", f"{p}{mod}.lora_embedding_B")
        else:
            names = (f"{p}{mod}.lora_A.weight", f"{p}{mod}.lora_B.weight")
        entries += [(names[0], (r, in_f)), (names[1], (out_f, r))]
        factors[names[0]] = (mod, "A", out_f, in_f)
        factors[names[1]] = (mod, "B", out_f, in_f)

    def produce(name: str) -> torch.Tensor:
        mod, which, out_f, in_f = factors[name]
        a, b = adapter_factors(mod, out_f, in_f, r, seed)
        return a if which == "A" else b

    def build(tmp: Path) -> None:
        write_safetensors(tmp / "adapter_model.safetensors", entries, produce)
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config_dict(base, r, alpha), indent=2) + "\n")

    return _cached(Path(root) / _folder(f"adapter-r{r}", size, layers, seed), params, build, force, quiet)


def make_tuned(
    layers: int = 22,
    seed: int = 0,
    r: int = 16,
    rel: float = 0.1,
    noise: float = 1e-4,
    root: Path = DEFAULT_ROOT,
    max_shard_bytes: int | None = None,
    force: bool = False,
    quiet: bool = False,
    size: str = "1b",
) -> Path:
    """base (regenerated bit-identically) + rank-``r`` delta on every layer's seven linears.

    ``rel``: ||delta||_F / ||W||_F per module.  ``noise``: full-rank noise std relative to
    std(W) (1e-4 lies below bf16's resolution, so in practice the full-rank residual is
    the bf16 rounding of the tuned weights, ~0.1% of W, i.e. ~1% of the delta)."""
    shape = shape_for(size, layers)
    max_shard_bytes = max_shard_bytes or SHARD_BYTES[size]
    params = {
        "kind": "tuned",
        "version": SYNTH_VERSION,
        "shape": asdict(shape),
        "seed": seed,
        "r": r,
        "rel": rel,
        "noise": noise,
        "max_shard_bytes": max_shard_bytes,
    }
    entries = shape.base_tensors()
    shapes = dict(entries)
    targets = {f"{shape.module_path(i, m)}.weight" for i in range(layers) for m in LINEARS}

    def produce(name: str) -> torch.Tensor:
        w = base_tensor(name, shapes[name], seed)
        if name not in targets:
            return w
        return (w.float() + tuned_delta(name, w, r, rel, noise, seed)).to(torch.bfloat16)

    def build(tmp: Path) -> None:
        check_free_space(Path(root), shape.param_count() * 2, f"the {size} tuned checkpoint ({layers} layers)")
        _write_configs(tmp, shape)
        write_sharded(tmp, entries, produce, max_shard_bytes)

    return _cached(Path(root) / _folder(f"tuned-r{r}", size, layers, seed), params, build, force, quiet)


# ---------------------------------------------------------------------- verification


def verify_with_peft(base: Path, adapter: Path) -> None:
    """Load base with transformers and the adapter with PEFT; fail on any missing or
    unexpected key (warnings included) and check the loaded LoRA weights equal the file."""
    import logging
    import warnings

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    records: list[str] = []

    class _Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    grab = _Grab(level=logging.WARNING)
    for name in ("transformers", "peft", ""):
        logging.getLogger(name).addHandler(grab)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, adapter)
    msgs = records + [str(w.message) for w in caught]
    bad = [
        m
        for m in msgs
        if any(k in m.lower() for k in ("missing", "unexpected", "not initialized", "newly initialized"))
    ]
    if bad:
        raise SystemExit("PEFT load reported key problems:\n  " + "\n  ".join(bad))

    sd = model.state_dict()
    file_sd = load_file(adapter / "adapter_model.safetensors")
    for key, t in file_sd.items():
        live = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        )
        live = live.replace(".lora_embedding_A", ".lora_embedding_A.default").replace(
            ".lora_embedding_B", ".lora_embedding_B.default"
        )
        if live not in sd:
            raise SystemExit(f"adapter tensor {key} not in the PEFT model (looked for {live})")
        if not torch.equal(sd[live].to(t.dtype), t):
            raise SystemExit(f"adapter tensor {key} differs after loading")
    n_lora = sum(1 for k in sd if "lora_" in k)
    if n_lora != len(file_sd):
        raise SystemExit(f"PEFT model has {n_lora} LoRA tensors, the file {len(file_sd)}")
    print(
        f"[synth] verify: PEFT loaded {len(file_sd)} adapter tensors, no missing/unexpected keys"
        f" ({len(msgs)} other warnings)",
        file=sys.stderr,
    )
    for m in msgs:
        print(f"[synth]   warning seen: {m[:200]}", file=sys.stderr)


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="1b", help="model shapes: 1b (TinyLlama) or 8b (Llama-3)")
    ap.add_argument("--layers", type=int, help="decoder layers (default: the size's own: 22 or 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="cache folder (default bench/.cache/synth)")
    ap.add_argument("--what", nargs="+", choices=("base", "adapter", "tuned"), default=["base", "adapter", "tuned"])
    ap.add_argument("--force", action="store_true", help="regenerate even when cached")
    ap.add_argument(
        "--verify", action="store_true", help="load base+adapter with transformers and PEFT and check the keys"
    )
    args = ap.parse_args(None if argv is None else list(argv))

    out: dict[str, str] = {}
    layers = args.layers or (22 if args.size == "1b" else SIZES[args.size].layers)
    base = make_base(layers, args.seed, args.root, force=args.force, size=args.size)
    out["base"] = str(base)
    if "adapter" in args.what or args.verify:
        out["adapter"] = str(
            make_adapter(base, layers, args.seed, args.rank, 2 * args.rank, args.root, force=args.force, size=args.size)
        )
    if "tuned" in args.what:
        out["tuned"] = str(make_tuned(layers, args.seed, args.rank, root=args.root, force=args.force, size=args.size))
    if args.verify:
        verify_with_peft(base, Path(out["adapter"]))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
