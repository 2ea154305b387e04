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
* **LoHa / LoKr** (PEFT rebuilds ΔW at every forward): ``2·d_in·d_out`` per token for ``x @ ΔWᵀ``
  (the rebuild is per forward, not per token: not counted); merge ``4·r·d_in·d_out + d_in·d_out``
  (LoHa: two rank-r products, the add) or ``d_in·d_out`` (LoKr: the Kronecker product is element-wise; a
  LyCORIS full diff: the add alone); parameters are the stored factors.
* **VeRA** (PEFT's ``λ_b ⊙ (B_s (λ_d ⊙ (A_s x)))`` with ``A_s = vera_A[:r, :d_in]``, ``B_s = vera_B[:d_out, :r]``,
  each layer's ``d_in`` from its base weight): per token ``2·r·(d_in + d_out)`` for the two products and
  ``r + d_out`` for the two vector scales; merge ``(λ_b ⊙ B_s) @ (λ_d ⊙ A_s)`` then the add:
  ``r·(d_in + d_out) + 2·r·d_in·d_out + d_in·d_out``.
* **IA³** (PEFT scales the layer's input, feed-forward, or its output by ``l``): per token one multiply per
  scaled feature, ``len(l)`` (the tuner's whole cost, so counted though element-wise); merge ``W ⊙ l`` one
  multiply per weight element, plus the bias ``b ⊙ l`` (``d_out``) on an output-side module with a bias.
  Both need the base weight's shape; without a base the merge is not counted.
* **Parameters** count a tied embedding / LM head once (as ``model.num_parameters()`` does);
  LoRA parameters are everything an adapter trains: A, B, ``lora_B`` bias, DoRA magnitudes,
  ``modules_to_save`` copies and trainable-token deltas (PEFT's trainable parameters).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

from . import arch, moe_layouts
from .arch import ModelShape, module_of
from .bounds import MAX_SEQ_LEN
from .errors import CheckpointError, UnsupportedError, option_name
from .inputs import load_source, open_plain, pick_adapter, resolve
from .inventory import Inventory, LoraModule
from .io.reader import Checkpoint
from .io.safetensors_format import dtype_size
from .third_party import quiet_import

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

#: Added to a report's conventions when its adapter holds such modules (a LoRA report's stay as they were).
TUNER_CONVENTIONS = {
    "vera": "VeRA per token: 2·r·(d_in+d_out) + r + d_out (its λ scales); merge r·(d_in+d_out) + 2·r·d_in·d_out "
    "+ d_in·d_out",
    "ia3": "IA³ per token: one multiply per scaled feature; merge: one per weight element (+ d_out for an "
    "output-side bias)",
}

#: What each form is assumed to do at run time: the numbers of its row follow from it.
FORM_ASSUMPTIONS = {
    "unmerged": "runs the LoRA branches beside the base weights at every token",
    "merged": "LoRA folded into the weights: runs like the base, no LoRA at run time",
    "adapter": "loaded on the base and merged once at load (merge FLOPs), then runs like the merged model; "
    "kept unmerged at run time it costs what the unmerged row says",
    "plain": "as stored",
}

#: Where the base the numbers stand on came from (``Report.base_from``).
BASE_ORIGINS = {
    "argument": "given as the base",
    "adapter_config": "the adapter config's base_model_name_or_path, found as a path from the current folder",
    "beside_adapter": "the config.json beside the adapter",
    "checkpoint": "the base weights inside the checkpoint",
}


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
    assumes: str = ""  # what the form does at run time (FORM_ASSUMPTIONS)

    def __post_init__(self) -> None:
        self.assumes = self.assumes or FORM_ASSUMPTIONS.get(self.form, "")


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
    quantization: dict[str, Any] | None = None  # a quantized base: scheme, weights, bytes on disk and dequantized
    base_from: str | None = None  # a key of BASE_ORIGINS: where the base came from (None: unknown)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["base_used"] = self.base_used()
        d["columns"] = column_notes(self)
        return d

    def form_columns(self) -> list[str]:
        return form_columns(self.seq_len)

    def module_columns(self) -> list[str]:
        return list(MODULE_COLUMNS)

    def column_notes(self) -> dict[str, str]:
        return column_notes(self)

    def base_used(self) -> str:
        """One line: which base the numbers stand on, and how it was found."""
        if self.base_from is None:
            return "base: unknown (base parameters, bytes and FLOPs not reported)"
        if self.base_from == "checkpoint":
            return f"base: {BASE_ORIGINS['checkpoint']}"
        name = f"{self.base} " if self.base and self.base_from != "checkpoint" else ""
        what = {"weights": "its weights", "config.json": "its config.json only (shapes)"}.get(
            self.base_source or "", ""
        )
        return f"base: {name}({BASE_ORIGINS[self.base_from]}; counted from {what})"

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


def _is_embedding(key: str) -> bool:
    return arch.is_embedding(module_of(key))


def _is_lm_head(key: str) -> bool:
    return arch.is_head(module_of(key))


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


@dataclass
class _Routing:
    """Which expert weights one token goes through: ``active`` (num_experts_per_tok) of the E routed
    experts of each MoE layer.  The router and shared experts are plain weights, used by every token."""

    active: int | None = None
    experts_of: dict[str, int] = field(default_factory=dict)  # expert tensor key -> E of its layer

    def weight(self, key: str) -> Fraction:
        e = self.experts_of.get(key)
        return Fraction(1) if e is None or self.active is None else Fraction(min(self.active, e), e)


def _routing(tensors: dict[str, _T] | None, config: dict[str, Any] | None, source: Any = None) -> _Routing:
    if tensors is None:
        return _Routing()
    shapes = {k: t.shape for k, t in tensors.items()}
    experts = moe_layouts.expert_tensor_experts(shapes, moe_layouts.layout_for(config, shapes))
    if not experts:  # a dense model: a top-k key (an old config's sampling top_k) means nothing here
        return _Routing(None, experts)
    return _Routing(moe_layouts.active_experts(config, max(experts.values()), source), experts)


def _matmul_flops(tensors: dict[str, _T], shape: ModelShape, routing: _Routing | None = None) -> int:
    """2 FLOPs per multiply-add over every 2-D weight used as a matmul; a tied head counts once; routed
    experts (2-D per expert, or fused 3-D) only for the experts a token goes through."""
    total = 0
    has_head = False
    routing = routing or _Routing()
    moe = Fraction(0)
    for k, t in tensors.items():
        if k in routing.experts_of:
            moe += 2 * t.numel * routing.weight(k)
            continue
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
    return total + round(moe)


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
    if m.tuner != "lora":  # LoHa/LoKr: the stored factors
        return m.factor_params
    if m.trained_params is not None:  # another tuner read as LoRA (AdaLoRA's lora_E): its own count
        return m.trained_params
    n = m.stored_rank * (m.in_features + m.out_features)
    if m.magnitude_key:
        n += m.out_features
    if m.bias_key:
        n += m.out_features
    return n


def lora_module_flops(m: LoraModule, active: int | None = None, *, vera: bool = False) -> int:
    """Extra FLOPs per token of the unmerged branch ``B(A x)``; LoRA on fused experts for the ``active``
    experts a token goes through (all of them when unknown); ``vera``: a VeRA module (its λ scales too)."""
    if m.tuner == "oft":  # OFT: the input (an embedding: its output) rotated, a b-long dot per feature
        return 2 * m.rank * m.in_features
    if m.tuner == "hra":  # HRA: x − ((x·V)·T)·Vᵀ, two thin products
        return 4 * m.rank * m.in_features + 2 * m.rank * m.rank
    if m.tuner == "boft":  # BOFT: PEFT rebuilds the dense rotation and multiplies the weight per forward
        return 2 * m.in_features * m.out_features
    if m.tuner == "shira":  # the sparse ΔW applied to x: a product and an add per stored value
        return 2 * m.factor_params
    if m.tuner in ("vblora", "delora"):  # A and B (re)built once per forward, then B(A x) as LoRA's
        return 2 * m.rank * (m.in_features + m.out_features)
    if m.tuner == "randlora":  # B(A x) through its r·bases columns
        return 2 * m.rank * int(m.tuner_args.get("bases", 1)) * (m.in_features + m.out_features)
    if m.tuner == "road":  # the output rotated in pairs: y·c + swapped(y)·s (and c, s rebuilt from θ, α)
        return 3 * m.out_features
    if m.tuner == "miss":  # x summed by r-wide pieces, times the block (bat: W rebuilt per forward, then x @ Wᵀ)
        if m.tuner_args.get("variant") == "bat":
            return 2 * m.rank * m.in_features * m.out_features + 2 * m.in_features * m.out_features
        return m.in_features + 2 * m.rank * m.out_features
    if m.tuner == "c3a":  # PEFT's block-circulant product: FFTs of the input and output blocks, products per block pair
        b = max(m.rank, 2)
        return (
            round(5 * b * math.log2(b) * (m.in_features + m.out_features) / b) + 8 * m.in_features * m.out_features // b
        )
    if m.tuner != "lora":  # LoHa/LoKr/full/FourierFT: ΔW rebuilt once per forward, then x @ ΔWᵀ per token
        return 2 * m.in_features * m.out_features
    if m.kind == "ia3":  # x ⊙ l or (W x) ⊙ l: one multiply per feature of its side (the other side is 0)
        return m.in_features + m.out_features
    if m.kind == "experts":
        return min(active or m.experts, m.experts) * 2 * m.rank * (m.in_features + m.out_features)
    if m.kind == "embedding":
        return 2 * m.rank * m.out_features  # gather of A's column is a lookup
    if vera:  # λ_b ⊙ (B_s (λ_d ⊙ (A_s x))): the two products and the two vector scales
        return 2 * m.rank * (m.in_features + m.out_features) + m.rank + m.out_features
    return 2 * m.rank * (m.in_features + m.out_features)


def merge_module_flops(
    m: LoraModule, *, vera: bool = False, weight: tuple[int, ...] | None = None, bias: bool = False
) -> int:
    """One-off FLOPs of merging ``m`` into its base weight.  ``vera``: a VeRA module; ``weight`` and ``bias``:
    the base weight's shape and whether the layer has a bias (IA³ scales the whole weight: without its shape,
    0, not counted)."""
    area = m.in_features * m.out_features
    if m.tuner == "loha":  # two rank-r products, then ⊙ and the add
        return 2 * 2 * m.rank * area + area
    if m.tuner in ("oft", "diag-oft"):  # a b-long dot product per merged entry (rank: the block size b)
        return 2 * m.rank * area
    if m.tuner == "boft":  # one b-long dot product per merged entry for each of its m butterfly stages
        return 2 * int(m.tuner_args.get("stages", 1)) * m.rank * area
    if m.tuner == "hra":  # per row: row·V, ·T, ·Vᵀ (rank: r)
        return 4 * m.rank * area + 2 * m.rank * m.rank * m.out_features
    if m.tuner in ("lokr", "full"):  # kron is element-wise (not counted), a full diff has no product: the add
        return area
    if m.tuner == "shira":  # each stored value scaled and added at its place
        return 2 * m.factor_params
    if m.tuner == "randlora":  # the scaled bases, then a product of rank r·bases and the add
        return 2 * m.rank * int(m.tuner_args.get("bases", 1)) * area + area
    if m.tuner == "delora":  # the norms and the diagonal (small), LoRA's product, the column scale and the add
        return 2 * m.rank * area + 2 * area
    if m.tuner == "road":  # each merged entry two products and a sum (the bias too)
        return 3 * area + (3 * m.out_features if bias else 0)
    if m.tuner == "miss":  # the tiled block added (bat: each r-wide row piece times B_i, then two adds)
        return 2 * m.rank * area + 2 * area if m.tuner_args.get("variant") == "bat" else area
    if m.tuner == "c3a":  # each entry looked up in its circulant block, scaled by 1/in and added
        return 2 * area
    if m.tuner == "vblora":  # A and B from the bank (k products and sums per entry), then LoRA's product and add
        return (
            2 * int(m.tuner_args.get("topk", 2)) * m.rank * (m.in_features + m.out_features) + 2 * m.rank * area + area
        )
    if m.tuner == "fourierft":  # an inverse 2-D FFT of the (out, in) spectrum (~5·N·log₂N), the scaling and the add
        return round(5 * area * math.log2(area)) + 2 * area if area > 1 else 2 * area
    if m.kind == "ia3":  # W ⊙ l: one multiply per element; an output-side module scales the bias too
        if weight is None:
            return 0
        return math.prod(weight) + (m.out_features if bias and m.out_features else 0)
    flops = m.experts * (2 * m.rank * area + area)
    if vera:  # λ_b ⊙ B_s and λ_d ⊙ A_s before the product
        flops += m.rank * (m.in_features + m.out_features)
    if m.magnitude_key:
        flops += 3 * area
    return flops


# -- the base model ------------------------------------------------------------------------------
def _base_from_config(folder: Path) -> tuple[dict[str, _T], dict[str, Any]]:
    """Parameter shapes of a model built on the meta device from its config.json: no weights needed,
    but transformers (and so torch) is."""
    try:
        import torch

        with quiet_import():
            from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    except ImportError:
        raise UnsupportedError(
            "counting a base from its config.json alone needs transformers",
            path=folder,
            hint="pip install transformers, or pass a base folder with its weights",
        ) from None
    from .io.files import load_json

    # bounded and type-checked, before transformers reads it
    raw = arch.check_model_config(load_json(folder / "config.json", what="a config file"), folder / "config.json")
    raw = raw or {}
    try:  # transformers on a stranger's numbers (sizes whose product overflows int64...): its error, one line
        conf = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(conf)
            except ValueError:
                model = AutoModel.from_config(conf)
    except Exception as exc:  # noqa: BLE001 - third-party code over untrusted input
        text = " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"transformers cannot build a model from it ({type(exc).__name__}: {text})",
            path=folder / "config.json",
            hint="pass a base folder with its weights, or fix config.json",
        ) from None
    dt = getattr(conf, "dtype", None) or getattr(conf, "torch_dtype", None) or torch.float32
    if isinstance(dt, str):
        dt = getattr(torch, dt, torch.float32)
    from .io.safetensors_format import dtype_name

    name = dtype_name(dt)
    size = dtype_size(dt)
    out = {k: _T(tuple(p.shape), name, p.numel() * size) for k, p in model.named_parameters()}
    return out, raw


def _weights(ck: Checkpoint, keys: dict[str, str], notes: list[str], quant: dict[str, Any]) -> dict[str, _T]:
    """``keys`` (base key -> stored key) as _T; quantized weights at their logical shapes, in bf16 (what a
    merge writes by default), their real bytes and scheme left in ``quant``."""
    from .io.quantized import find_layout, logical_order, summary

    layout = find_layout(ck) if keys and all(k == v for k, v in keys.items()) else None
    if layout is None:
        return {k: _t(ck.info(v)) for k, v in keys.items()}
    quant.update(summary=summary(ck, layout), stored=ck.dtypes())
    notes.append(
        f"the base is quantized ({layout.scheme}): parameters and FLOPs count its {len(layout.tensors)} quantized "
        "weights at their real shapes; the merged row is the default dequantized (bf16) merge, "
        "merge --requantize writes the base's own bytes instead"
    )
    out = {}
    for n, shape, dt, nb in logical_order(ck, layout):
        out[n] = _T(shape, "BF16", 2 * math.prod(shape)) if n in layout.tensors else _T(shape, dt, nb)
    return out


def _open_base(
    ref: str | Path, notes: list[str], quant: dict[str, Any] | None = None
) -> tuple[dict[str, _T] | None, dict[str, Any] | None, str | None]:
    p = resolve(ref)
    if not os.path.exists(p):  # (False for a name too long or holding a NUL, rather than raising)
        notes.append(f"base {ref} not found: base numbers unknown")
        return None, None, None
    folder = p.parent if p.is_file() and p.name == "config.json" else p
    if p.is_file() and p.name == "config.json":
        return (*_base_from_config(folder), "config.json")
    try:
        ck = open_plain(p, "the base")
    except CheckpointError:
        if folder.is_dir() and (folder / "config.json").is_file():
            notes.append("base has no weights: its parameter shapes come from config.json (meta-device model)")
            return (*_base_from_config(folder), "config.json")
        raise
    with ck:
        return _weights(ck, {k: k for k in ck.tensors}, notes, {} if quant is None else quant), ck.config, "weights"


@dataclass
class _Base:
    tensors: dict[str, _T] | None
    config: dict[str, Any] | None
    source: str | None  # "weights" | "config.json" | None
    name: str | None  # as the report names it
    origin: str | None = None  # a key of BASE_ORIGINS
    quant: dict[str, Any] = field(default_factory=dict)  # a quantized base: its summary and stored bytes


def _adapter_base(ck: Checkpoint, base: str | Path | None, base_name: str | None, notes: list[str]) -> _Base:
    """The base of an adapter: the one given, the config's base path when it exists, or the config.json
    beside the adapter."""
    cfg_base = base_name if base is None else None
    ref = base if base is not None else (cfg_base if cfg_base and os.path.exists(cfg_base) else None)
    if ref is not None:
        quant: dict[str, Any] = {}
        tensors, bconf, source = _open_base(ref, notes, quant)
        origin = ("argument" if base is not None else "adapter_config") if source else None
        return _Base(tensors, bconf or ck.config, source, base_name, origin, quant)
    if ck.config and (ck.root / "config.json").is_file():
        tensors, conf = _base_from_config(ck.root)
        notes.append("base shapes from the config.json beside the adapter (meta-device model)")
        return _Base(tensors, conf, "config.json", base_name, "beside_adapter")
    notes.append(
        "base unknown (pass --base, a folder with weights or only config.json): "
        "base parameters, bytes and FLOPs are not reported"
    )
    return _Base(None, ck.config, None, base_name)


@dataclass
class _Adapter:
    """The tensors of the adapter reported on, sorted for counting."""

    modules: dict[str, LoraModule]
    tensors: dict[str, _T]  # every tensor the adapter form stores
    replace: dict[str, _T]  # base key -> replacement
    trained: set[str]  # replacement / token keys that count as trained parameters
    saved_whole: set[str]
    tokens: dict[str, str]  # module -> trainable-tokens delta key
    vera: bool = False  # a VeRA adapter: its λ scales counted (lora_module_flops, merge_module_flops)
    weights: dict[str, tuple[tuple[int, ...], bool]] = field(default_factory=dict)  # module -> base (shape, bias)

    def flops(self, m: LoraModule, active: int | None = None) -> int:
        return lora_module_flops(m, active, vera=self.vera)

    def merge_flops(self, m: LoraModule) -> int:
        shape, bias = self.weights.get(m.module, (None, False))
        return merge_module_flops(m, vera=self.vera, weight=shape, bias=bias)


def _adapter(ck: Checkpoint, inv: Inventory, name: str | None, notes: list[str]) -> _Adapter:
    mods = inv.modules(name) if name else {}
    out = _Adapter(mods, {}, {}, set(), inv.saved_layers.get(name or "", set()), inv.tokens.get(name or "", {}))
    for m in mods.values():
        for k in (m.a_key, m.b_key, m.bias_key, m.magnitude_key):
            if k:
                out.tensors[k] = _t(ck.info(k))
    for bk, k in inv.replace.get(name or "", {}).items():
        out.tensors[k] = out.replace[bk] = _t(ck.info(k))
        if bk not in out.saved_whole:
            out.trained.add(k)
    for k in out.tokens.values():
        out.tensors[k] = _t(ck.info(k))
        out.trained.add(k)
    if out.saved_whole:
        notes.append(
            "base layers saved whole in the adapter (PEFT's save_embedding_layers) are not trained: "
            "counted in bytes, not as LoRA parameters: " + ", ".join(sorted(out.saved_whole))
        )
    others = [a for a in inv.adapters if a != name]
    if others:
        notes.append(f"other adapters in the checkpoint not counted: {', '.join(others)}")
    if inv.tokens.get(name or ""):
        notes.append("trainable-token deltas are counted as LoRA parameters (no FLOPs)")
    if any(m.magnitude_key for m in mods.values()) and inv.config(name or ""):
        notes.append(
            "DoRA: the unmerged forward also recomputes ‖W + s·B·A‖ per module each forward "
            "(2·r·d_in·d_out + element-wise, not per token; not counted)"
        )
    return out


# -- the report -------------------------------------------------------------------------------------
def build_report(
    path: str | Path, *, base: str | Path | None = None, seq_len: int = 2048, adapter: str | None = None
) -> Report:
    """Count parameters, bytes and FLOPs per token of every form of ``path``, from headers only."""
    from .errors import RouteError

    if seq_len < 1:
        raise RouteError(f"{option_name('seq_len')} must be at least 1")
    if seq_len > MAX_SEQ_LEN:  # a context beyond 4G tokens: the FLOP counts no longer fit a float when shown
        raise RouteError(f"{option_name('seq_len')} must be at most {MAX_SEQ_LEN}")
    notes: list[str] = []
    ck, inv = load_source(path, adapter=adapter)
    with ck:
        form = inv.form
        name = pick_adapter(inv, adapter, ck) if form != "plain" else None
        cfg = inv.config(name) if name else None
        problems = [str(e) for e in inv.problems.get(name or "", [])]  # what conversions would refuse
        if form != "plain" and cfg is None and not problems:
            notes.append("no adapter_config.json: scaling unknown")
        notes += problems
        if form == "adapter":
            named = str(base) if base is not None else (cfg.base_model_name_or_path if cfg else None)
            b = _adapter_base(ck, base, named, notes)
        else:
            quant: dict[str, Any] = {}
            b = _Base(_weights(ck, inv.base, notes, quant), ck.config, "weights", None, "checkpoint", quant)
        if b.source == "weights" and b.tensors is not None:  # the layer count, bounded by the weights' layers
            arch.check_layer_count(b.config, b.tensors, b.name or path)
        ad = _adapter(ck, inv, name, notes)
        _base_shapes(ad, inv, name, b, notes)
        src_bytes = ck.dtypes()
    shape = arch.model_shape(b.config, head_stored=b.tensors is not None and arch.HEAD_KEY in b.tensors)
    if b.tensors is not None and shape.vocab is None:
        emb = [t for k, t in b.tensors.items() if _is_embedding(k) and len(t.shape) == 2]
        shape.vocab = emb[0].shape[0] if emb else None
    routing = _routing(b.tensors, b.config, b.name or path)
    _moe_notes(routing, ad, notes)
    rows = _rows(form, b, ad, shape, seq_len, src_bytes, notes)
    modules = _kinds(ad, routing)
    if set(ad.replace) - ad.saved_whole:
        notes.append(
            "modules_to_save copies are counted as LoRA parameters: "
            + ", ".join(sorted(module_of(k) for k in set(ad.replace) - ad.saved_whole))
        )
    rep = Report(
        path=str(path),
        source_form=form,
        adapter=name,
        base=b.name,
        base_source=b.source,
        seq_len=seq_len,
        model=shape,
        rows=rows,
        modules=modules,
        notes=notes,
        base_from=b.origin,
    )
    rep.quantization = b.quant.get("summary")
    if ad.vera:
        rep.conventions.append(TUNER_CONVENTIONS["vera"])
    if any(m.kind == "ia3" for m in ad.modules.values()):
        rep.conventions.append(TUNER_CONVENTIONS["ia3"])
    return rep


def _base_shapes(ad: _Adapter, inv: Inventory, name: str | None, b: _Base, notes: list[str]) -> None:
    """Each module's base weight shape (and bias) where its counts need the base: IA³ scales the whole weight, a
    VeRA adapter's layers take their input width from the base (unbound, each is as wide as vera_A), and a tuner
    whose file does not say a layer's width takes the missing one from its base weight: SHiRA, FourierFT and
    RandLoRA store none, PEFT's OFT (and HRA) no output width, OFT's ``block_share`` no input width, LyCORIS's
    Diag-OFT/BOFT no input width.  Without the base such widths stay 0 and a note says so."""
    tuner = inv.tuner.get(name or "", {})
    ad.vera = tuner.get("peft_type") == "VERA"
    unbound = ad.vera and "input_widths" in tuner  # dialects.vera.NEEDS_BASE
    ia3 = any(m.kind == "ia3" for m in ad.modules.values())
    widthless = sorted({_TUNER_NAMES.get(m.tuner, m.tuner) for m in ad.modules.values() if _widthless(m)})
    if not (unbound or ia3 or widthless):
        return
    if b.tensors is None:
        if unbound or ia3:
            what = "VeRA's input widths (vera_A's full width counted, an upper bound)" if unbound else "IA³'s merge"
            notes.append(f"{what}: the base weights' shapes are unknown")
        if widthless:
            notes.append(
                f"{', '.join(widthless)}: the file does not say every layer's width and the base weights' shapes are "
                "unknown: those modules' FLOPs are not counted (0; pass --base)"
            )
        return
    from .module_match import match_modules

    match = match_modules(list(ad.modules), b.tensors, spelled=inv.spelled, config=b.config)
    cfg = inv.config(name or "")
    flip = cfg is not None and bool(cfg.fan_in_fan_out)
    for mod, m in list(ad.modules.items()):
        at = match.mapping.get(mod, mod)
        t = b.tensors.get(f"{at}.weight")
        if t is None:
            continue
        ad.weights[mod] = (t.shape, f"{at}.bias" in b.tensors)
        if len(t.shape) < 2:
            continue
        out_f, in_f = (t.shape[1], t.shape[0]) if flip and len(t.shape) == 2 else (t.shape[0], math.prod(t.shape[1:]))
        if unbound and len(t.shape) == 2:
            ad.modules[mod] = replace(m, in_features=int(in_f))
        elif _widthless(m):
            ad.modules[mod] = replace(
                m, in_features=m.in_features or int(in_f), out_features=m.out_features or int(out_f)
            )


#: How a note names a tuner (``LoraModule.tuner``).
_TUNER_NAMES = {
    "diag-oft": "Diag-OFT",
    "boft": "BOFT",
    "oft": "OFT",
    "hra": "HRA",
    "shira": "SHiRA",
    "fourierft": "FourierFT",
    "randlora": "RandLoRA",
    "vblora": "VB-LoRA",
    "delora": "DeLoRA",
    "c3a": "C3A",
}


def _widthless(m: LoraModule) -> bool:
    """A module of another tuner whose file leaves one of its layer's widths unsaid (0)."""
    return m.tuner != "lora" and not (m.in_features and m.out_features)


def _merged_tensors(b: _Base, ad: _Adapter) -> dict[str, _T] | None:
    """The merged model's tensors: the base's, replacements written in the base's dtype."""
    if b.tensors is None:
        return None
    merged = dict(b.tensors)
    for bk, t in ad.replace.items():
        old = b.tensors.get(bk)
        dt = old.dtype if old is not None else t.dtype
        size = old.nbytes // max(old.numel, 1) if old is not None and old.numel else t.nbytes // max(t.numel, 1)
        merged[bk] = _T(t.shape, dt, t.numel * size)
    return merged


def _percent(a: int, b: int | None) -> float | None:
    return round(100.0 * a / b, 4) if b else None


def _lora_flops(m: LoraModule, routing: _Routing, ad: _Adapter) -> int:
    """Per token: an expert LoRA only on the experts a token goes through (per-expert modules: their
    share of them)."""
    return round(ad.flops(m, routing.active) * routing.weight(f"{m.module}.weight"))


def _moe_notes(routing: _Routing, ad: _Adapter, notes: list[str]) -> None:
    if not routing.experts_of:
        return
    if routing.active is None:
        notes.append("MoE: config.json has no num_experts_per_tok, so every routed expert is counted per token")
    else:
        notes.append(
            f"MoE: routed experts counted for the {routing.active} a token goes through "
            "(router and shared experts in full)"
        )
    if any(m.kind == "experts" for m in ad.modules.values()):
        notes.append(
            "expert LoRA (target_parameters) is counted as the factored branch on the active experts; PEFT's "
            "unmerged forward instead adds s·B·A to every expert's weights each forward (2·E·r·d_in·d_out, "
            "not per token; not counted)"
        )


def _rows(
    form: str, b: _Base, ad: _Adapter, shape: ModelShape, seq_len: int, src_bytes: dict[str, int], notes: list[str]
) -> list[FormRow]:
    routing = _routing(b.tensors, b.config, b.name)
    lora_params = sum(lora_module_params(m) for m in ad.modules.values()) + sum(ad.tensors[k].numel for k in ad.trained)
    lora_flops = sum(_lora_flops(m, routing, ad) for m in ad.modules.values())
    attn = attention_flops(shape, seq_len)
    if attn is None:
        notes.append("config.json lacks layers/heads: attention FLOPs not reported")
    merged = _merged_tensors(b, ad)
    base_params = _params(b.tensors, shape.tied) if b.tensors is not None else None
    merged_params = _params(merged, shape.tied) if merged is not None else None
    mm = _matmul_flops(merged, shape, routing) if merged is not None else None
    merged_total = mm + (attn or 0) if mm is not None else None
    if form == "plain":
        return [
            FormRow(
                form="plain",
                base_parameters=base_params,
                lora_parameters=0,
                total_parameters=base_params,
                added_percent=0.0 if base_params else None,
                bytes=src_bytes,
                bytes_total=sum(src_bytes.values()),
                load_bytes_total=sum(src_bytes.values()),
                flops_base_matmul=mm,
                flops_lora=0,
                flops_attention=attn,
                flops_total=merged_total,
                overhead_percent=0.0,
                measured=True,
            )
        ]
    adapter_bytes = _bytes(ad.tensors) if form != "adapter" else src_bytes
    base_bytes = b.quant.get("stored") or (_bytes(b.tensors) if b.tensors is not None else None)
    ub = src_bytes if form == "unmerged" else (_add_bytes(base_bytes, adapter_bytes) if base_bytes else None)
    total = base_params + lora_params if base_params is not None else None
    mb = _bytes(merged) if merged is not None else {}
    ab = sum(adapter_bytes.values())
    return [
        FormRow(
            form="unmerged",
            base_parameters=base_params,
            lora_parameters=lora_params,
            total_parameters=total,
            added_percent=_percent(lora_params, base_params),
            bytes=ub or {},
            bytes_total=sum(ub.values()) if ub else 0,
            load_bytes_total=sum(ub.values()) if ub else None,
            flops_base_matmul=mm,
            flops_lora=lora_flops,
            flops_attention=attn,
            flops_total=merged_total + lora_flops if merged_total is not None else None,
            overhead_percent=_percent(lora_flops, merged_total),
            measured=form == "unmerged",
        ),
        FormRow(
            form="merged",
            base_parameters=merged_params,
            lora_parameters=0,
            total_parameters=merged_params,
            added_percent=0.0 if merged_params is not None else None,
            bytes=mb,
            bytes_total=sum(mb.values()),
            load_bytes_total=sum(mb.values()) if merged is not None else None,
            flops_base_matmul=mm,
            flops_lora=0,
            flops_attention=attn,
            flops_total=merged_total,
            overhead_percent=0.0 if merged_total is not None else None,
        ),
        FormRow(
            form="adapter",
            base_parameters=base_params,
            lora_parameters=lora_params,
            total_parameters=total,
            added_percent=_percent(lora_params, base_params),
            bytes=adapter_bytes,
            bytes_total=ab,
            load_bytes_total=ab + sum(base_bytes.values()) if base_bytes is not None else None,
            flops_base_matmul=mm,
            flops_lora=0,
            flops_attention=attn,
            flops_total=merged_total,
            overhead_percent=0.0 if merged_total is not None else None,
            merge_flops=sum(ad.merge_flops(m) for m in ad.modules.values()),
            measured=form == "adapter",
        ),
    ]


def _kinds(ad: _Adapter, routing: _Routing) -> list[KindRow]:
    kinds: dict[str, KindRow] = {}

    def row(module: str) -> KindRow:
        k = arch.report_kind(module)
        return kinds.setdefault(
            k, KindRow(kind=k, count=0, ranks=[], scalings=[], lora_parameters=0, extra_flops=0, merge_flops=0)
        )

    for m in ad.modules.values():
        r = row(m.module)
        r.count += 1
        if m.rank not in r.ranks:
            r.ranks.append(m.rank)
        if m.scaling is not None and round(m.scaling, 6) not in r.scalings:
            r.scalings.append(round(m.scaling, 6))
        r.lora_parameters += lora_module_params(m)
        r.extra_flops += _lora_flops(m, routing, ad)
        r.merge_flops += ad.merge_flops(m)
    for bk, t in ad.replace.items():
        if bk not in ad.saved_whole:
            row(module_of(bk)).lora_parameters += t.numel
    for mod, key in ad.tokens.items():
        row(mod).lora_parameters += ad.tensors[key].numel
    out = [kinds[k] for k in arch.REPORT_KINDS if k in kinds]
    for r in out:
        r.ranks.sort()
        r.scalings.sort()
    return out


# -- column names ---------------------------------------------------------------------------------------
def form_columns(seq_len: int) -> list[str]:
    """The names of a form row's numbers, in order: the table headers, and the keys of ``Report.to_dict()``'s
    ``columns`` (what each one counts)."""
    return [
        "form",
        "base params",
        "LoRA params",
        "total params",
        "added",
        "bytes on disk",
        "bytes to load",
        "base matmul FLOPs/token",
        "LoRA FLOPs/token",
        f"attention FLOPs/token (L={seq_len})",
        "total FLOPs/token",
        "overhead",
        "merge FLOPs (once)",
    ]


#: The names of a module row's numbers (:class:`KindRow`), in order.
MODULE_COLUMNS = ["module", "count", "rank", "scaling", "LoRA params", "extra FLOPs/token", "merge FLOPs"]


def column_notes(report: Report) -> dict[str, str]:
    """What each column (:func:`form_columns`, :data:`MODULE_COLUMNS`) counts and assumes, by its name."""
    head = form_columns(report.seq_len)
    notes = [
        "",
        "parameters of the base model; a tied embedding / LM head counted once (as num_parameters() does)",
        "what the adapter trains: A, B, lora_B bias, DoRA magnitudes, modules_to_save copies, trainable-token "
        "deltas (PEFT's trainable parameters)",
        "base + LoRA (unmerged, adapter); the merged model's own (merged)",
        "LoRA params relative to the base params",
        "this form's own files, from the tensor headers ('est.': what the conversion would write)",
        "what must be read to use the form: the adapter adds its base",
        "every 2-D weight used as a matmul (linear, Conv1D, LM head); embedding gathers are 0; a tied head once",
        "LoRA branches run unmerged (" + CONVENTIONS[2].split(": ", 1)[1] + "); 0 for the merged form and for the "
        "adapter form, which is assumed merged at load",
        f"one token attending to L={report.seq_len} positions: 4·L·n_heads·head_dim per layer (score + value); "
        "a causal prefill of L tokens averages (L+1)/2 positions",
        "base matmul + LoRA + attention, per token",
        "LoRA FLOPs relative to the merged model's total (0% where no LoRA branch runs)",
        "one-off merge at load, adapter form only: " + CONVENTIONS[4].split(": ", 1)[1] + "; n/a for the "
        "unmerged form (it runs its branches) and the merged one (already merged)",
    ]
    out = {h: n for h, n in zip(head, notes, strict=True) if n}
    out["extra FLOPs/token"] = "per token, run unmerged (the modules' share of LoRA FLOPs/token)"
    out["merge FLOPs"] = "one-off merge of these modules at load (their share of merge FLOPs)"
    return out
