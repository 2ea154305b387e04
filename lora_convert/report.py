"""What each storage form costs: parameters, bytes on disk and forward FLOPs per token.

Pure counting from safetensors headers (and ``config.json``); no tensor data is read.

Conventions
-----------
* **FLOPs** are 2 per multiply-add, counted over matrix products only (the same ops
  ``torch.utils.flop_counter.FlopCounterMode`` counts: mm/addmm/bmm).  Element-wise work
  (norms, activations, the LoRA scaling and add, rotary embeddings, softmax, DoRA's
  magnitude rescale) is not counted.
* **Base matmuls**: every 2-D ``*.weight`` of the model used as a matmul in a forward, i.e.
  ``2 · d_in · d_out`` per token for each linear / ``Conv1D`` weight and for the LM head.
  Embedding gathers (``embed_tokens``, ``wte``, ``wpe``, ...) are lookups: 0 FLOPs.
  A tied LM head is counted once, as a matmul over the embedding matrix.
* **LoRA** (unmerged form, per token): a linear ``d_in → d_out`` with rank ``r`` adds
  ``2·r·(d_in + d_out)``; an embedding LoRA adds a row gather of A (0 FLOPs) plus ``2·r·d``;
  an LM-head LoRA is a linear ``d → vocab``: ``2·r·(d + vocab)``.
* **Attention** (score ``QKᵀ`` and value ``AV``) at ``seq_len`` = L: one token attending to L
  positions, ``4 · L · n_heads · head_dim`` per layer (query heads; grouped KV heads do not
  reduce it).  That is a decode step at context L; the per-token mean over a causal prefill of
  L tokens is ``(L + 1) / 2`` positions instead.  Sliding-window layers (``layer_types``) use
  ``min(L, sliding_window)``.
* **Merge** (one-off, adapter loaded then merged): ``2·r·d_in·d_out`` for ``B @ A`` plus
  ``d_in·d_out`` for the add, per module (DoRA: ``+ 3·d_in·d_out`` for the column norm and
  rescale).
* **Parameters** count a tied embedding / LM head once (as ``model.num_parameters()`` does);
  LoRA parameters are everything an adapter trains: A, B, ``lora_B`` bias, DoRA magnitudes,
  ``modules_to_save`` copies and trainable-token deltas (PEFT's trainable parameters).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import AdapterConfig
from .errors import CheckpointError, RouteError
from .inventory import LoraModule, build_inventory
from .io.reader import open_checkpoint
from .io.safetensors_format import DTYPE_NAMES, dtype_size
from .keys import short_name

KINDS = ("embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head",
         "other")
_ALIASES = {
    "embed_tokens": "embed_tokens", "wte": "embed_tokens", "word_embeddings": "embed_tokens",
    "tok_embeddings": "embed_tokens", "embed_in": "embed_tokens",
    "q_proj": "q_proj", "query": "q_proj", "k_proj": "k_proj", "key": "k_proj", "v_proj": "v_proj", "value": "v_proj",
    "o_proj": "o_proj", "out_proj": "o_proj", "gate_proj": "gate_proj", "w1": "gate_proj", "up_proj": "up_proj",
    "w3": "up_proj", "c_fc": "up_proj", "fc1": "up_proj", "down_proj": "down_proj", "w2": "down_proj",
    "fc2": "down_proj", "lm_head": "lm_head", "embed_out": "lm_head",
}
EMBEDDING_NAMES = {"embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
                   "embed_positions", "embed_in", "tok_embeddings", "shared", "embeddings"}
LM_HEAD_NAMES = {"lm_head", "embed_out"}

CONVENTIONS = [
    "FLOPs: 2 per multiply-add, matrix products only (element-wise ops, norms, softmax, rotary not counted)",
    "base matmuls: every 2-D weight used as a matmul (linear, Conv1D, LM head); embedding gathers are 0 FLOPs; "
    "a tied LM head counts once",
    "LoRA per token: linear 2·r·(d_in+d_out); embedding 2·r·d (gather of A free); LM head 2·r·(d+vocab)",
    "attention: one token attending to seq_len positions, 4·L·n_heads·head_dim per layer (score + value); "
    "causal-prefill mean is (L+1)/2 positions",
    "merge (one-off): 2·r·d_in·d_out + d_in·d_out per module (DoRA +3·d_in·d_out)",
    "parameters: tied weights once; LoRA = A, B, lora bias, DoRA magnitude, modules_to_save, trainable tokens",
]


# -- dataclasses ---------------------------------------------------------------------------
@dataclass
class FormRow:
    """One storage form.  ``None`` where the base is unknown."""

    form: str  # unmerged | merged | adapter | plain
    base_parameters: int | None
    lora_parameters: int
    total_parameters: int | None
    added_percent: float | None
    bytes: dict[str, int]  # dtype -> bytes of this form's own files
    bytes_total: int
    load_bytes_total: int | None  # what must be read to use it (adapter: + the base)
    flops_base_matmul: int | None  # per token
    flops_lora: int  # per token, unmerged LoRA branches (0 once merged)
    flops_attention: int | None  # per token at seq_len
    flops_total: int | None
    overhead_percent: float | None  # flops_lora relative to the merged model
    merge_flops: int | None = None  # adapter row: one-off merge at load time
    measured: bool = False  # bytes come from real files (False: what the conversion would write)


@dataclass
class KindRow:
    kind: str
    count: int
    ranks: list[int]
    scalings: list[float]
    lora_parameters: int
    extra_flops: int  # per token, unmerged
    merge_flops: int


@dataclass
class ModelShape:
    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    hidden: int | None = None
    vocab: int | None = None
    tied: bool = False
    window_layers: int = 0
    sliding_window: int | None = None


@dataclass
class Report:
    path: str
    source_form: str
    adapter: str | None
    base: str | None
    base_source: str | None  # "weights" | "config.json" | None (unknown)
    seq_len: int
    model: ModelShape
    rows: list[FormRow]
    modules: list[KindRow]
    notes: list[str] = field(default_factory=list)
    conventions: list[str] = field(default_factory=lambda: list(CONVENTIONS))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def row(self, form: str) -> FormRow:
        for r in self.rows:
            if r.form == form:
                return r
        raise KeyError(form)


# -- tensor sets (name -> shape, dtype name, bytes) -------------------------------------------
@dataclass(frozen=True)
class _T:
    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _t(info: Any) -> _T:
    return _T(tuple(info.shape), info.dtype_name, info.nbytes)


def _module_of(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else key


def _is_embedding(key: str) -> bool:
    return short_name(_module_of(key)) in EMBEDDING_NAMES


def _is_lm_head(key: str) -> bool:
    return short_name(_module_of(key)) in LM_HEAD_NAMES


def _tied_duplicate(tensors: dict[str, _T], tied: bool) -> str | None:
    """The LM-head key that repeats a tied input embedding (counted once), if both are stored."""
    if not tied:
        return None
    heads = [k for k in tensors if _is_lm_head(k) and k.endswith(".weight")]
    embeds = [k for k in tensors if _is_embedding(k) and k.endswith(".weight")]
    for h in heads:
        if any(tensors[e].shape == tensors[h].shape for e in embeds):
            return h
    return None


def _params(tensors: dict[str, _T], tied: bool) -> int:
    dup = _tied_duplicate(tensors, tied)
    return sum(t.numel for k, t in tensors.items() if k != dup)


def _bytes(tensors: dict[str, _T]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in tensors.values():
        out[t.dtype] = out.get(t.dtype, 0) + t.nbytes
    return out


def _add_bytes(*parts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0) + v
    return out


def _matmul_flops(tensors: dict[str, _T], shape: ModelShape) -> int:
    """2 FLOPs per multiply-add over every 2-D weight used as a matmul; a tied head counts once."""
    total = 0
    has_head = False
    for k, t in tensors.items():
        if not k.endswith(".weight") or len(t.shape) != 2:
            continue
        if _is_lm_head(k):
            has_head = True
        elif _is_embedding(k):
            continue
        total += 2 * t.numel
    if shape.tied and not has_head:
        embeds = [t for k, t in tensors.items() if k.endswith(".weight") and len(t.shape) == 2 and _is_embedding(k)]
        pick = [t for t in embeds if shape.vocab is None or t.shape[0] == shape.vocab] or embeds[:1]
        if pick:
            total += 2 * pick[0].numel
    return total


# -- model shape from config.json ------------------------------------------------------------
def _first(cfg: dict[str, Any], *names: str) -> Any:
    for n in names:
        v = cfg.get(n)
        if v is not None:
            return v
    return None


def model_shape(config: dict[str, Any] | None) -> ModelShape:
    if not config:
        return ModelShape()
    cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    s = ModelShape(
        layers=_first(cfg, "num_hidden_layers", "n_layer", "num_layers"),
        heads=_first(cfg, "num_attention_heads", "n_head", "num_heads"),
        hidden=_first(cfg, "hidden_size", "n_embd", "d_model"),
        vocab=_first(cfg, "vocab_size"),
    )
    s.kv_heads = _first(cfg, "num_key_value_heads") or s.heads
    s.head_dim = _first(cfg, "head_dim")
    if s.head_dim is None and s.hidden and s.heads:
        s.head_dim = s.hidden // s.heads
    tied = _first(config, "tie_word_embeddings")
    if tied is None:
        tied = cfg.get("tie_word_embeddings")
    s.tied = bool(tied) if tied is not None else False
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if window and isinstance(types, list):
        s.window_layers = sum(1 for t in types if t == "sliding_attention")
        s.sliding_window = int(window)
    elif window and cfg.get("use_sliding_window"):
        s.window_layers = int(s.layers or 0)
        s.sliding_window = int(window)
    return s


def attention_flops(shape: ModelShape, seq_len: int) -> int | None:
    """Score + value FLOPs of one token attending to ``seq_len`` positions, summed over layers."""
    if not (shape.layers and shape.heads and shape.head_dim):
        return None
    per_pos = 4 * shape.heads * shape.head_dim
    full = shape.layers - shape.window_layers
    windowed = min(seq_len, shape.sliding_window or seq_len)
    return per_pos * (full * seq_len + shape.window_layers * windowed)


# -- LoRA counting ----------------------------------------------------------------------------
def lora_module_params(m: LoraModule) -> int:
    n = m.rank * (m.in_features + m.out_features)
    if m.magnitude_key:
        n += m.out_features
    if m.bias_key:
        n += m.out_features
    return n


def lora_module_flops(m: LoraModule) -> int:
    """Extra matmul FLOPs per token of the unmerged branch ``B(A x)``."""
    if m.kind == "embedding":
        return 2 * m.rank * m.out_features  # gather of A's column is a lookup
    return 2 * m.rank * (m.in_features + m.out_features)


def merge_module_flops(m: LoraModule) -> int:
    area = m.in_features * m.out_features
    flops = 2 * m.rank * area + area
    if m.magnitude_key:
        flops += 3 * area
    return flops


def kind_of(module: str) -> str:
    """Module kind for the breakdown; GPT-2's ``c_proj`` is o_proj under ``attn``, down_proj under ``mlp``."""
    parts = module.split(".")
    if parts[-1] == "c_proj" and len(parts) > 1:
        return {"attn": "o_proj", "mlp": "down_proj"}.get(parts[-2], "other")
    return _ALIASES.get(parts[-1], "other")


# -- the base model ------------------------------------------------------------------------------
def _base_from_config(folder: Path) -> tuple[dict[str, _T], dict[str, Any]]:
    """Parameter shapes of a model built on the meta device from its config.json: no weights needed."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    conf = AutoConfig.from_pretrained(str(folder))
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    dt = getattr(conf, "dtype", None) or getattr(conf, "torch_dtype", None) or torch.float32
    if isinstance(dt, str):
        dt = getattr(torch, dt, torch.float32)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(conf)
        except ValueError:
            model = AutoModel.from_config(conf)
    name = DTYPE_NAMES.get(dt, "F32")
    size = dtype_size(dt)
    out = {k: _T(tuple(p.shape), name, p.numel() * size) for k, p in model.named_parameters()}
    return out, raw


def _open_base(ref: str | Path, notes: list[str]) -> tuple[dict[str, _T] | None, dict[str, Any] | None, str | None]:
    from .sources import resolve

    p = resolve(ref, what="base")
    if p is None or not p.exists():
        notes.append(f"base {ref} not found: base numbers unknown")
        return None, None, None
    folder = p.parent if p.is_file() and p.name == "config.json" else p
    if p.is_file() and p.name == "config.json":
        return (*_base_from_config(folder), "config.json")
    try:
        with open_checkpoint(p) as ck:
            inv = build_inventory(ck)
            if inv.form != "plain":
                raise RouteError("the base holds LoRA tensors itself", path=ck.root,
                                 hint="give the plain base model as --base")
            return {k: _t(ck.info(v)) for k, v in inv.base.items()}, ck.config, "weights"
    except CheckpointError:
        if folder.is_dir() and (folder / "config.json").is_file():
            notes.append("base has no weights: its parameter shapes come from config.json (meta-device model)")
            return (*_base_from_config(folder), "config.json")
        raise


# -- the report -------------------------------------------------------------------------------------
def build_report(path: str | Path, *, base: str | Path | None = None, seq_len: int = 2048,
                 adapter: str | None = None) -> Report:
    """Count parameters, bytes and FLOPs per token of every form of ``path``, from headers only."""
    from .sources import pick_adapter, resolve

    if seq_len < 1:
        raise RouteError("--seq-len must be at least 1")
    notes: list[str] = []
    p = resolve(path, what="checkpoint")
    with open_checkpoint(p, adapter_name=adapter) as ck:  # type: ignore[arg-type]
        inv = build_inventory(ck)
        cfg = AdapterConfig.load(ck.adapter_config_path) if ck.adapter_config_path else None
        form = inv.form
        name = pick_adapter(inv, adapter, ck) if form != "plain" else None
        if form != "plain" and cfg is None:
            notes.append("no adapter_config.json: scaling unknown")
        src_bytes = ck.dtypes()
        base_set: dict[str, _T] | None
        base_source: str | None = None
        base_name: str | None = None
        model_config = ck.config
        if form == "adapter":
            ref = base
            if ref is None and cfg is not None and cfg.base_model_name_or_path and \
                    Path(cfg.base_model_name_or_path).exists():
                ref = cfg.base_model_name_or_path
            base_name = str(base) if base is not None else (cfg.base_model_name_or_path if cfg else None)
            if ref is not None:
                base_set, bconf, base_source = _open_base(ref, notes)
                model_config = bconf or model_config
            elif ck.config and (ck.root / "config.json").is_file():
                base_set, model_config = _base_from_config(ck.root)
                base_source = "config.json"
                notes.append("base shapes from the config.json beside the adapter (meta-device model)")
            else:
                base_set = None
                notes.append("base unknown (pass --base, a folder with weights or only config.json): "
                             "base parameters, bytes and FLOPs are not reported")
        else:
            base_set = {k: _t(ck.info(v)) for k, v in inv.base.items()}
            base_source = "weights"
        adapter_set: dict[str, _T] = {}
        replace: dict[str, _T] = {}
        mods = inv.modules(name) if name else {}
        for m in mods.values():
            for k in (m.a_key, m.b_key, m.bias_key, m.magnitude_key):
                if k:
                    adapter_set[k] = _t(ck.info(k))
        saved_whole = inv.saved_layers.get(name or "", set())
        for bk, k in inv.replace.get(name or "", {}).items():
            adapter_set[k] = replace[bk] = _t(ck.info(k))
        trained = {k for bk, k in inv.replace.get(name or "", {}).items() if bk not in saved_whole}
        trained |= set(inv.tokens.get(name or "", {}).values())
        if saved_whole:
            notes.append("base layers saved whole in the adapter (PEFT's save_embedding_layers) are not trained: "
                         "counted in bytes, not as LoRA parameters: " + ", ".join(sorted(saved_whole)))
        for k in inv.tokens.get(name or "", {}).values():
            adapter_set[k] = _t(ck.info(k))
        others = [a for a in inv.adapters if a != name]
        if others:
            notes.append(f"other adapters in the checkpoint not counted: {', '.join(others)}")
        if inv.tokens.get(name or ""):
            notes.append("trainable-token deltas are counted as LoRA parameters (no FLOPs)")

    shape = model_shape(model_config)
    if base_set is not None and shape.vocab is None:
        emb = [t for k, t in base_set.items() if _is_embedding(k) and len(t.shape) == 2]
        shape.vocab = emb[0].shape[0] if emb else None
    if cfg is not None and any(m.magnitude_key for m in mods.values()):
        notes.append("DoRA: the unmerged forward also recomputes ‖W + s·B·A‖ per module each forward "
                     "(2·r·d_in·d_out + element-wise, not per token; not counted)")

    lora_params = sum(lora_module_params(m) for m in mods.values()) + sum(adapter_set[k].numel for k in trained)
    lora_flops = sum(lora_module_flops(m) for m in mods.values())
    merge_flops = sum(merge_module_flops(m) for m in mods.values())
    attn = attention_flops(shape, seq_len)
    if attn is None:
        notes.append("config.json lacks layers/heads: attention FLOPs not reported")
    attn_n = attn or 0

    merged_set: dict[str, _T] | None = None
    if base_set is not None:
        merged_set = dict(base_set)
        for bk, t in replace.items():
            old = base_set.get(bk)
            dt = old.dtype if old is not None else t.dtype
            size = old.nbytes // max(old.numel, 1) if old is not None and old.numel else t.nbytes // max(t.numel, 1)
            merged_set[bk] = _T(t.shape, dt, t.numel * size)
    base_params = _params(base_set, shape.tied) if base_set is not None else None
    merged_params = _params(merged_set, shape.tied) if merged_set is not None else None
    mm = _matmul_flops(merged_set, shape) if merged_set is not None else None
    merged_total = mm + attn_n if mm is not None else None

    def pct(a: int, b: int | None) -> float | None:
        return round(100.0 * a / b, 4) if b else None

    rows: list[FormRow] = []
    adapter_bytes = _bytes(adapter_set) if form != "adapter" else src_bytes
    base_bytes = _bytes(base_set) if base_set is not None else None
    if form == "plain":
        rows.append(FormRow("plain", base_params, 0, base_params, 0.0 if base_params else None, src_bytes,
                            sum(src_bytes.values()), sum(src_bytes.values()), mm, 0, attn, merged_total, 0.0,
                            measured=True))
    else:
        if form == "unmerged":
            ub: dict[str, int] | None = src_bytes
        else:
            ub = _add_bytes(base_bytes, adapter_bytes) if base_bytes is not None else None
        total = base_params + lora_params if base_params is not None else None
        rows.append(FormRow(
            "unmerged", base_params, lora_params, total, pct(lora_params, base_params), ub or {},
            sum(ub.values()) if ub else 0, sum(ub.values()) if ub else None, mm, lora_flops, attn,
            merged_total + lora_flops if merged_total is not None else None, pct(lora_flops, merged_total),
            measured=form == "unmerged"))
        mb = _bytes(merged_set) if merged_set is not None else {}
        rows.append(FormRow(
            "merged", merged_params, 0, merged_params, 0.0 if merged_params is not None else None, mb,
            sum(mb.values()), sum(mb.values()) if merged_set is not None else None, mm, 0, attn, merged_total,
            0.0 if merged_total is not None else None))
        ab = sum(adapter_bytes.values())
        rows.append(FormRow(
            "adapter", base_params, lora_params, total, pct(lora_params, base_params), adapter_bytes, ab,
            ab + sum(base_bytes.values()) if base_bytes is not None else None, mm, 0, attn, merged_total,
            0.0 if merged_total is not None else None, merge_flops=merge_flops, measured=form == "adapter"))

    kinds: dict[str, KindRow] = {}
    for m in mods.values():
        k = kind_of(m.module)
        row = kinds.setdefault(k, KindRow(k, 0, [], [], 0, 0, 0))
        row.count += 1
        if m.rank not in row.ranks:
            row.ranks.append(m.rank)
        if cfg is not None:
            s = round(cfg.scaling_for(m.module, m.rank), 6)
            if s not in row.scalings:
                row.scalings.append(s)
        row.lora_parameters += lora_module_params(m)
        row.extra_flops += lora_module_flops(m)
        row.merge_flops += merge_module_flops(m)
    for bk, t in replace.items():
        if bk in saved_whole:
            continue
        k = kind_of(_module_of(bk))
        row = kinds.setdefault(k, KindRow(k, 0, [], [], 0, 0, 0))
        row.lora_parameters += t.numel
    for mod, key in inv.tokens.get(name or "", {}).items():
        k = kind_of(mod)
        row = kinds.setdefault(k, KindRow(k, 0, [], [], 0, 0, 0))
        row.lora_parameters += adapter_set[key].numel
    modules = [kinds[k] for k in KINDS if k in kinds]
    for r in modules:
        r.ranks.sort()
        r.scalings.sort()
    if set(replace) - saved_whole:
        notes.append("modules_to_save copies are counted as LoRA parameters: " +
                     ", ".join(sorted(_module_of(k) for k in set(replace) - saved_whole)))
    return Report(str(path), form, name, base_name, base_source, seq_len, shape, rows, modules, notes)


# -- rendering ------------------------------------------------------------------------------------
def _n(x: int | float | None) -> str:
    if x is None:
        return "?"
    if isinstance(x, float):
        return f"{x:.3g}"
    return f"{x:,}"


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{x:.3g}%"


def form_table(report: Report) -> tuple[list[str], list[list[str]]]:
    head = ["form", "base params", "LoRA params", "total params", "added", "bytes on disk", "bytes to load",
            "base matmul FLOPs/token", "LoRA FLOPs/token", f"attention FLOPs/token (L={report.seq_len})",
            "total FLOPs/token", "overhead", "merge FLOPs (once)"]
    rows = []
    for r in report.rows:
        by_dtype = ", ".join(f"{k} {_size(v)}" for k, v in sorted(r.bytes.items()))
        disk = f"{_size(r.bytes_total)} ({by_dtype})" if by_dtype else "?"
        if r.bytes_total and not r.measured:
            disk += " est."
        rows.append([r.form, _n(r.base_parameters), _n(r.lora_parameters), _n(r.total_parameters),
                     _pct(r.added_percent), disk, _size(r.load_bytes_total), _n(r.flops_base_matmul),
                     _n(r.flops_lora), _n(r.flops_attention), _n(r.flops_total), _pct(r.overhead_percent),
                     _n(r.merge_flops) if r.merge_flops is not None else "-"])
    return head, rows


def module_table(report: Report) -> tuple[list[str], list[list[str]]]:
    head = ["module", "count", "rank", "scaling", "LoRA params", "extra FLOPs/token", "merge FLOPs"]
    rows = [[k.kind, str(k.count), ",".join(map(str, k.ranks)) or "-",
             ",".join(f"{s:g}" for s in k.scalings) or ("?" if k.count else "-"), _n(k.lora_parameters),
             _n(k.extra_flops), _n(k.merge_flops)] for k in report.modules]
    return head, rows


def _md(head: list[str], rows: list[list[str]]) -> list[str]:
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"] + \
        ["| " + " | ".join(r) + " |" for r in esc]


def report_markdown(report: Report) -> str:
    """The report as Markdown tables, ready for a model card's README.md."""
    lines = ["## Cost by storage form", ""]
    lines += _md(*form_table(report))
    if report.modules:
        lines += ["", "### LoRA modules", ""]
        lines += _md(*module_table(report))
    lines += ["", "Conventions: " + "; ".join(report.conventions) + "."]
    if report.notes:
        lines += [""] + [f"- {n}" for n in report.notes]
    return "\n".join(lines) + "\n"
