"""The merge engine: what each output tensor of a merge is (a copy, a replacement, LoRA folded in, a bias, an
expert slab) and how its rows are computed.  Shared by every route that merges or checks a merge: merge
(``merge.py``), unmerge (the same ops with the weights negated), verify (the same rows recomputed beside
MERGED's) and the quantized merge (``quantized.py`` re-quantizes the rows it yields).

:func:`merge_ops` decides, for the request's adapters, a :class:`KeyOps` per base tensor (its
:class:`WeightedLora` s, lora_bias adds, trainable tokens, replacement) and the output keys; :func:`tensor_job`
(or :meth:`MergeOps.job`) turns one into a job whose blocks stream the base weight through
:func:`lora_math.merge_rows` (fp32, rounded once): :func:`block_plan` says which row blocks it reads,
:func:`prepare_rows` builds the :class:`RowMerge` that computes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from .. import arch, lora_math
from ..errors import AdapterError, RouteError, UnsupportedError, option
from ..inventory import ROTATION_TUNERS, LoraModule
from ..io.reader import Checkpoint
from ..pipeline import TILE_BYTES, Buffers, Job, Read
from . import TUNER_WORDS
from .common import BaseView, check_finite, copy_job, remap_modules, same_tensor
from .moe import ExpertPlan, plan_expert_lora
from .plan import AdapterInput, Request
from .quantized import QuantizedBase, quantized_base

if TYPE_CHECKING:
    from .. import oft_math

# the tuners that rotate a weight (routes/oft_terms.py): its input side, or its output rows (LyCORIS's Diag-OFT/BOFT)
ROTATIONS = ROTATION_TUNERS


@dataclass
class WeightedLora:
    """One adapter's LoRA on a base tensor, and the weight its ΔW is multiplied by (PEFT's ``set_scale``)."""

    module: LoraModule
    ck: Checkpoint
    weight: float = 1.0

    @property
    def scaling(self) -> float:
        assert self.module.scaling is not None
        return self.module.scaling * self.weight


@dataclass
class KeyOps:
    """What happens to one base tensor."""

    source: tuple[Checkpoint, str]
    loras: list[WeightedLora] = field(default_factory=list)  # summed into the tensor in one fp32 pass
    bias_adds: list[WeightedLora] = field(default_factory=list)  # lora_bias: s·w·lora_B.bias added to the bias
    tokens: tuple[Checkpoint, str, list[int]] | None = None
    replaced: bool = False
    bias_scales: list[WeightedLora] = field(default_factory=list)  # IA³ on the output side: the bias scaled too

    @property
    def dora(self) -> bool:
        return any(lo.module.magnitude_key for lo in self.loras)

    @property
    def ia3(self) -> bool:
        """IA³ scales the weight (``W ⊙ l``) instead of adding to it: alone on its tensor (see _assign)."""
        return any(lo.module.kind == "ia3" for lo in self.loras)

    @property
    def oft(self) -> bool:
        """OFT/BOFT/HRA rotate the weight's input side (``W·Rᵀ``) instead of adding to it, MiSS ``bat`` multiplies
        its blocks (``W_ij·(I + B_i) + B_i``): alone on its tensor (_assign)."""
        return any(lo.module.tuner in ROTATIONS or lo.module.tuner_args.get("variant") == "bat" for lo in self.loras)

    def signature(self) -> tuple[Any, ...]:
        """What was applied, to decide whether two tied tensors end up equal."""
        return (
            self.source[1] if self.replaced else None,
            tuple((str(lo.ck.root), lo.module.a_key, lo.weight) for lo in self.loras),
            self.tokens[1] if self.tokens else None,
        )


@dataclass
class MergeOps:
    """What a merge does to every base tensor, before any job exists: shared by merge, unmerge and verify."""

    base: BaseView
    ops: dict[str, KeyOps]
    keys: list[str]  # the output tensors, in order
    tied: tuple[str, str] | None
    conv1d: bool  # fan_in_fan_out or a Conv1D architecture (settles square weights)
    config_changes: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    experts: ExpertPlan | None = None  # LoRA on MoE experts, merged slab by slab (moe.py)
    qbase: QuantizedBase | None = None  # a quantized base, read through its dequantized view
    device: str = "cpu"  # where the row merges' fp32 tiles are computed (--device)

    def delta_norm(self, key: str) -> Callable[[], float | None]:
        """‖ΔW‖ of a plain LoRA on ``key``, read when called (None for anything else: several LoRAs, DoRA,
        tokens, a replacement): ``--requantize``'s report (:meth:`.quantized.QuantizedBase.jobs`)."""
        o = self.ops.get(key)

        def norm() -> float | None:
            if o is None or len(o.loras) != 1 or o.tokens is not None or o.replaced:
                return None
            lo = o.loras[0]
            m = lo.module
            if m.magnitude_key or m.scaling is None or m.tuner != "lora" or m.kind == "ia3":
                return None
            from .requantize import lora_delta_norm  # (only --requantize asks: a plain merge never imports it)

            return lora_delta_norm(lo.ck.read(m.a_key), lo.ck.read(m.b_key), lo.scaling)

        return norm

    def job(self, key: str, dtype: torch.dtype | None, observe: Observer | None = None) -> Job:
        """The job that writes ``key``: an expert slab merge, a row merge, a bias, or a copy."""
        if self.experts is not None and key in self.experts.targets:
            return self.experts.job(key, self.base, dtype)
        return tensor_job(key, self.ops[key], self.base, dtype, self.conv1d, observe, self.device)


def merge_ops(req: Request) -> MergeOps:
    """Every base tensor's ops, the output keys (a tied head written only when it ends up different) and
    the config edits, for the request's adapters."""
    model_config = req.model_config
    if not req.stack and req.inventory.form == "plain":
        raise RouteError(
            "holds no LoRA tensors (a full model: base, merged or fine-tuned); nothing to convert to merged",
            path=req.source.root,
            hint=f"to merge adapters into it, pass {option('adapter', 'ADAPTER[:WEIGHT]')}",
        )
    for inp in req.adapters_in():
        assert inp.config is not None, "the API checks that an adapter config exists"
        inp.config.check_supported()
    base = BaseView(req.base) if req.base is not None else BaseView(req.source, req.inventory.base)
    qbase = quantized_base(req, base)  # read through its dequantized view
    if qbase is not None:
        base = BaseView(qbase.view)
    tied = arch.tied_pair(model_config, base.keys())
    warnings: list[str] = []
    experts = _experts(req, base)
    ops = _assign(req, base, tied, warnings, experts)
    mo = MergeOps(base, ops, base.keys(), tied, False, warnings=warnings, experts=experts, qbase=qbase)
    if tied is not None:
        emb_key, head_key = tied
        if ops[head_key].signature() != ops[emb_key].signature() and not _mirrors(ops[head_key], ops[emb_key]):
            if head_key not in mo.keys:
                mo.keys.append(head_key)
            mo.config_changes["tie_word_embeddings"] = False
            mo.warnings.append(
                "embed_tokens and lm_head were tied in the base but differ after the merge: "
                "both are written and tie_word_embeddings is set to false"
            )
        elif head_key in mo.keys:
            mo.keys.remove(head_key)  # still tied: the shared tensor is stored once, as save_pretrained does
    fan_in_fan_out = any(inp.config is not None and inp.config.fan_in_fan_out for inp in req.adapters_in())
    mo.conv1d = fan_in_fan_out or arch.stores_conv1d(model_config)
    mo.warnings += experts.warnings
    vocab = _new_vocab(ops, base.keys(), tied, model_config)
    if vocab is not None:
        mo.config_changes["vocab_size"] = vocab
    return mo


def _experts(req: Request, base: BaseView) -> ExpertPlan:
    """Where the adapters' MoE-expert LoRA lands (moe.py), each module's scaling times its adapter's
    weight.  One adapter at most may put LoRA on experts: the slab merge sums one adapter's parts."""
    plans = []
    for inp in req.adapters_in():
        modules = inp.inventory.modules(inp.name)
        if inp.weight != 1:
            modules = {k: replace(m, scaling=(m.scaling or 0.0) * inp.weight) for k, m in modules.items()}
        plans.append((inp, plan_expert_lora(modules, inp.ck, base, req.model_config, inp.config)))
    on_experts = [(inp, plan) for inp, plan in plans if plan.targets]
    if len(on_experts) > 1:
        raise UnsupportedError(
            "several adapters put LoRA on MoE experts; merging them in one pass is not supported",
            path=on_experts[1][0].ck.root,
            hint="merge them one at a time",
        )
    chosen = on_experts[0][1] if on_experts else plans[0][1]
    for _, plan in plans:
        if plan is not chosen:
            chosen.renames.update(plan.renames)  # where the base stores a module under another name
    return chosen


def _assign(
    req: Request, base: BaseView, tied: tuple[str, str] | None, notes: list[str], experts: ExpertPlan
) -> dict[str, KeyOps]:
    """Base key -> what to do with it: its source (base or replacement), LoRAs, lora_bias, tokens.
    ``notes`` receives how adapter modules were matched to the base (prefixes, parts left out); the
    modules ``experts`` handles are merged there, and its renames say where the base stores others."""
    view = dict(base.map)
    if tied is not None:
        view[tied[1]] = base.map[tied[0]]  # a tied head *is* the embedding, whatever the file stores
    ops = {k: KeyOps((base.ck, src)) for k, src in view.items()}
    for inp in req.adapters_in():
        _assign_adapter(ops, inp, base, view, tied, notes, experts, req.model_config)
    for k in experts.targets:
        if ops[k].loras:
            raise UnsupportedError(
                f"{k}: LoRA on its experts from one adapter and on the whole tensor from another",
                hint="merge them one at a time",
            )
    for k, o in ops.items():
        if o.ia3 and (len(o.loras) > 1 or o.loras[0].weight != 1.0):
            lo = next((lo for lo in o.loras if lo.module.kind == "ia3"), o.loras[0])
            raise UnsupportedError(
                f"{k}: IA³ scales this weight (W ⊙ l); with another adapter on it, a weight or an unmerge the "
                "result is not what PEFT merges",
                path=lo.ck.root,
                tensor=lo.module.a_key,
                hint="merge an IA³ adapter alone, at weight 1",
            )
        products = {"road": "RoAd rotates this weight's output rows (R·W)", "miss": "MiSS bat multiplies this weight"}
        if o.oft and o.loras[0].module.tuner in products and (len(o.loras) > 1 or o.loras[0].weight != 1.0):
            raise UnsupportedError(
                f"{k}: {products[o.loras[0].module.tuner]}; with another adapter on it, a weight or an unmerge the "
                "result is not what PEFT merges (PEFT gives it no scale and no inverse here)",
                hint="merge this adapter alone, at weight 1",
            )
        if o.oft and (len(o.loras) > 1 or o.loras[0].weight != 1.0):
            lo = next((lo for lo in o.loras if lo.module.tuner in ROTATIONS), o.loras[0])
            raise UnsupportedError(
                f"{k}: {TUNER_WORDS.get(lo.module.tuner, lo.module.tuner)} rotates this weight"
                + (
                    " (R·W, LyCORIS); with another adapter on it, a weight or an unmerge the result is no rotation "
                    "lora-convert merges (only weight 1 is)"
                    if "rows_mixed" in lo.module.tuner_args
                    else "'s input side (W·Rᵀ); with another adapter on it, a weight or an unmerge the result is not "
                    "what PEFT merges (PEFT gives it no scale)"
                ),
                path=lo.ck.root,
                tensor=lo.module.a_key,
                hint="merge this adapter alone, at weight 1",
            )
        if len(o.loras) > 1 and o.dora:
            raise UnsupportedError(
                f"{k}: several adapters change it and one is DoRA; PEFT applies DoRA adapters one after "
                "the other (each rescales the result so far), which is not a sum",
                hint="merge them one at a time, in the order PEFT would apply them",
            )
    return ops


def _assign_adapter(
    ops: dict[str, KeyOps],
    inp: AdapterInput,
    base: BaseView,
    view: dict[str, str],
    tied: tuple[str, str] | None,
    notes: list[str],
    experts: ExpertPlan,
    model_config: dict[str, Any] | None,
) -> None:
    """One adapter's modules, replacements and tokens, added to ``ops``."""
    inv, ad, name, cfg = inp.inventory, inp.ck, inp.name, inp.config
    assert cfg is not None
    modules = {k: m for k, m in inv.modules(name).items() if k not in experts.handled}
    replaced, tokens = inv.replace.get(name, {}), inv.tokens.get(name, {})
    all_mods = sorted(set(modules) | {k.rsplit(".", 1)[0] for k in replaced if k not in view} | set(tokens))
    rest = [m for m in all_mods if m not in experts.renames]
    remap = (
        remap_modules(
            rest,
            BaseView(base.ck, view),
            "adapter modules",
            ad.root,
            spelled=inv.spelled,
            config=model_config,
            notes=notes,
        )
        if rest
        else {}
    )
    remap.update({m: d for m, d in experts.renames.items() if m in all_mods})
    for k, src in replaced.items():
        mod, _, param = k.rpartition(".")
        bk = f"{remap.get(mod, mod)}.{param}" if mod in remap else k
        if bk not in ops:
            raise AdapterError(f"replaces {bk}, which the base does not have", path=ad.root, tensor=src)
        if ops[bk].replaced:
            raise UnsupportedError(
                f"two adapters replace {bk} (modules_to_save); PEFT activates one adapter per saved module",
                path=ad.root,
                tensor=src,
            )
        ops[bk].source, ops[bk].replaced = (ad, src), True
    for mod, m in modules.items():
        if mod not in remap:
            continue  # a part the base does not hold (reported in notes)
        wk = f"{remap[mod]}.weight"
        if wk not in ops:
            raise AdapterError(f"module {mod} has no weight in the base", path=ad.root, tensor=m.a_key)
        if m.tuner not in ("lora", *ROTATIONS) and arch.is_embedding(remap[mod]):
            word = TUNER_WORDS.get(m.tuner, m.tuner)
            raise UnsupportedError(
                f"{m.tuner} module on the embedding {mod}: "
                + (
                    f"lora-convert merges a LyCORIS {word} module into linear and conv weights only"
                    if inv.dialect == "kohya"
                    else f"PEFT builds {word} only on nn.Linear, nn.Conv1d and nn.Conv2d and refuses embeddings"
                    if m.tuner in ("loha", "lokr")
                    else f"PEFT builds {word} on no embedding layer (it refuses nn.Embedding)"
                ),
                path=ad.root,
                tensor=m.a_key,
            )
        ops[wk].loras.append(WeightedLora(m, ad, inp.weight))
        if m.kind == "ia3" and m.out_features and f"{remap[mod]}.bias" in ops:  # output side: PEFT scales the bias
            ops[f"{remap[mod]}.bias"].bias_scales.append(WeightedLora(m, ad, inp.weight))
        if m.tuner == "road" and f"{remap[mod]}.bias" in ops:  # R·(Wx + b): PEFT rotates the bias too
            ops[f"{remap[mod]}.bias"].bias_scales.append(WeightedLora(m, ad, inp.weight))
        if m.bias_key:
            bk = f"{remap.get(mod, mod)}.bias"
            if bk not in ops:
                raise UnsupportedError(
                    f"lora_bias on {mod}, whose base layer has no bias: the merged model "
                    "would need a new tensor its architecture cannot load",
                    path=ad.root,
                    tensor=m.bias_key,
                )
            ops[bk].bias_adds.append(WeightedLora(m, ad, inp.weight))
    _assign_tokens(ops, inp, tokens, remap, tied)


def _assign_tokens(
    ops: dict[str, KeyOps],
    inp: AdapterInput,
    tokens: dict[str, str],
    remap: dict[str, str],
    tied: tuple[str, str] | None,
) -> None:
    """An adapter's trainable tokens (one adapter per token table, as PEFT activates them)."""
    ad = inp.ck
    assert inp.config is not None
    token_map = inp.config.trainable_token_map()
    emb_key, head_key = tied or (None, None)
    for mod, key in tokens.items():
        wk = f"{remap.get(mod, mod)}.weight"
        if wk == head_key and any(f"{remap.get(m, m)}.weight" == emb_key for m in tokens):
            continue  # the tied lm_head's token adapter is the embedding's (PEFT ties them); applied below
        idx = token_map.get(arch.short_name(mod)) or token_map.get(mod)
        if idx is None:
            raise AdapterError(
                f"trainable tokens for {mod} but trainable_token_indices names no indices for it",
                path=ad.root,
                tensor=key,
            )
        if ops[wk].tokens is not None:
            raise UnsupportedError(
                f"two adapters train tokens of {mod}; PEFT activates one adapter per token table",
                path=ad.root,
                tensor=key,
            )
        ops[wk].tokens = (ad, key, idx)
        if wk == emb_key and head_key in ops:
            ops[head_key].tokens = (ad, key, idx)  # PEFT ties the token adapter of a tied lm_head


def _mirrors(head: KeyOps, emb: KeyOps) -> bool:
    """Whether the tied head ends up equal to the embedding although its ops are spelled differently.

    PEFT's ``ensure_weight_tying`` gives the head the embedding's adapter (lora_A = B_eᵀ, lora_B = A_eᵀ,
    the same parameters) and saves both, each with its own copy of the shared base weight; the two
    sides then stay equal and should stay tied, as in the unmerged model.
    """
    if head.tokens is not None or emb.tokens is not None or head.bias_adds or emb.bias_adds:
        return False
    if head.replaced != emb.replaced or (head.replaced and not same_tensor(head.source, emb.source)):
        return False
    if len(head.loras) != len(emb.loras) or len(head.loras) > 1:
        return False
    if not head.loras:
        return True
    (hl,), (el,) = head.loras, emb.loras
    h, e = hl.module, el.module
    if h.kind == "embedding" or e.kind != "embedding" or h.magnitude_key or e.magnitude_key:
        return False
    if hl.scaling != el.scaling:
        return False
    ha, hb = hl.ck.read(h.a_key), hl.ck.read(h.b_key)
    ea, eb = el.ck.read(e.a_key), el.ck.read(e.b_key)
    return ha.shape == eb.T.shape and hb.shape == ea.T.shape and torch.equal(ha, eb.T) and torch.equal(hb, ea.T)


def _new_vocab(
    ops: dict[str, KeyOps], keys: list[str], tied: tuple[str, str] | None, model_config: dict[str, Any] | None
) -> int | None:
    """The vocabulary size after a replaced (resized) input embedding, when config.json says otherwise."""
    if tied is None and arch.HEAD_KEY not in ops:
        return None
    ek = tied[0] if tied is not None else arch.input_embedding_key(keys)
    if ek is None or ek not in ops or not ops[ek].replaced:
        return None
    ck, key = ops[ek].source
    vocab = ck.info(key).shape[0]
    return vocab if model_config and model_config.get("vocab_size") not in (None, vocab) else None


def tensor_job(
    key: str,
    o: KeyOps,
    base: BaseView,
    dtype: torch.dtype | None,
    conv1d: bool,
    observe: Observer | None = None,
    device: str = "cpu",
) -> Job:
    src_ck, src_key = o.source
    info = src_ck.info(src_key)
    if dtype is not None and info.is_float:
        out_dtype = dtype
    elif key in base and info.is_float and base.ck.info(base.map[key]).is_float:
        out_dtype = base.ck.info(base.map[key]).dtype  # a replacement is written in the base's dtype
    else:
        out_dtype = info.dtype
    if o.loras or o.tokens is not None or o.bias_adds or o.bias_scales:
        _check_float_target(src_ck, src_key)
    if o.loras or o.tokens is not None:
        return _merge_job(key, o, info.shape, out_dtype, conv1d, observe, device)
    if o.bias_adds or o.bias_scales:
        return _bias_job(key, o, out_dtype)
    return copy_job(src_ck, src_key, key, out_dtype, "replace" if o.replaced else "copy")


def _check_float_target(ck: Checkpoint, key: str) -> None:
    """A merge adds a floating-point delta: into an integer (or float8, bool) weight it would be
    rounded to a different tensor with no error.  Such targets are refused by name."""
    info = ck.info(key)
    if not info.is_float:
        raise UnsupportedError(
            f"the LoRA targets a weight stored as {info.dtype_name}; a merge can only change F32, F16, BF16 "
            "or F64 weights",
            path=ck.root,
            tensor=key,
            hint="merge into the base with floating-point weights (quantized bases: dequantize first)",
        )


def _factors(lo: WeightedLora, base_shape: tuple[int, ...], conv1d_hint: bool) -> tuple[lora_math.RowDelta, bool]:
    """ΔW factors (weight folded into the scaling) in the stored orientation, and whether that
    orientation is transposed.  Another tuner's module (LoHa, LoKr) gives its row producer."""
    m, ck = lo.module, lo.ck
    if m.tuner != "lora":
        from . import tuner_terms  # (LoHa, LoKr: a LoRA merge never imports their formulas)

        return tuner_terms.delta(m, ck, lo.scaling, base_shape, conv1d_hint), False
    a = check_finite(ck.read(m.a_key), ck, m.a_key)
    b = check_finite(ck.read(m.b_key), ck, m.b_key)
    if m.kind == "embedding":
        if tuple(base_shape) != (m.in_features, m.out_features):
            raise AdapterError(
                f"embedding LoRA for shape ({m.in_features}, {m.out_features}) but the base weight is "
                f"{tuple(base_shape)}",
                path=ck.root,
                tensor=m.module,
                hint="is this adapter for this base model?",
            )
        return lora_math.embedding_factors(a, b, lo.scaling), True
    if m.kind == "conv" or len(base_shape) > 2:
        return _conv_factors(lo, a, b, base_shape), False
    try:
        transposed = lora_math.is_transposed(base_shape, m.in_features, m.out_features, hint=conv1d_hint)
    except ValueError as exc:
        raise AdapterError(
            f"LoRA expects (out, in) = ({m.out_features}, {m.in_features}) but the base weight is {tuple(base_shape)}",
            path=ck.root,
            tensor=m.module,
            hint="is this adapter for this base model?",
        ) from exc
    return lora_math.linear_factors(a, b, lo.scaling, transposed=transposed), transposed


def _conv_factors(
    lo: WeightedLora, a: torch.Tensor, b: torch.Tensor, base_shape: tuple[int, ...]
) -> lora_math.DeltaFactors:
    """A convolution's ΔW on its flattened (out, in·k·k) weight, after checking the kernel fits."""
    m = lo.module
    kernel = tuple(a.shape[1:]) if a.dim() > 2 else (m.in_features, *([1] * (len(base_shape) - 2)))
    if m.kind == "linear" and a.dim() == 2 and len(base_shape) == 4 and math.prod(base_shape[1:]) == m.in_features:
        kernel = tuple(base_shape[1:])  # AdaLoRA's SVDConv2d: A (r, in·k·k), ΔW = B·(A ⊙ E) reshaped to the kernel
    if tuple(base_shape) != (m.out_features, *kernel) or any(d != 1 for d in b.shape[2:]):
        raise AdapterError(
            f"conv LoRA for weight shape {(m.out_features, *kernel)} (B {list(b.shape)}) but the base weight is "
            f"{tuple(base_shape)}",
            path=lo.ck.root,
            tensor=m.module,
            hint="is this adapter for this base model?",
        )
    return lora_math.conv_factors(a, b, lo.scaling)


def _dora_scales(
    buf: Buffers,
    plan: list[Read],
    lo: WeightedLora,
    delta: lora_math.DeltaFactors,
    transposed: bool,
    rows: int,
    cols: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """(row scale, column scale, the norms ‖W+ΔW‖) m/‖W+ΔW‖ — one pass over the base weight before the merge pass.

    DoRA normalises per output feature: a stored row for nn.Linear, a stored column for Conv1D and
    Embedding (whose stored weight is transposed to the LoRA view)."""
    m, lck = lo.module, lo.ck
    assert m.magnitude_key is not None
    mag = check_finite(lck.read(m.magnitude_key), lck, m.magnitude_key).reshape(-1)  # conv: (1, out, 1, 1)
    if not transposed:
        norms = torch.empty(rows, dtype=torch.float32)
        for r in plan:
            w = buf.read(r)
            norms[r.start : r.stop] = lora_math.dora_row_norms(
                w.view(w.shape[0], cols), delta, r.start, _acc(buf, w.shape[0], cols)
            )
            buf.give_back(w)
        return lora_math.dora_scale(mag, norms), None, norms
    sq = torch.zeros(cols, dtype=torch.float32)
    for r in plan:
        w = buf.read(r)
        sq += lora_math.dora_col_sq_norms(w, delta, r.start, _acc(buf, w.shape[0], cols))
        buf.give_back(w)
    norms = sq.sqrt_()
    return None, lora_math.dora_scale(mag, norms), norms


def _ia3_vector(lo: WeightedLora, n: int) -> torch.Tensor:
    """IA³'s ``ia3_l`` as an fp32 vector of ``n`` values (refused by name when the base has another size)."""
    m, ck = lo.module, lo.ck
    vec = check_finite(ck.read(m.a_key), ck, m.a_key).to(torch.float32).reshape(-1)
    if vec.numel() != n:
        raise AdapterError(
            f"ia3_l has {vec.numel()} values, the base layer's side it scales has {n}",
            path=ck.root,
            tensor=m.a_key,
            hint="is this adapter for this base model?",
        )
    return vec


def _ia3_scales(
    lo: WeightedLora, shape: tuple[int, ...], fan_in_fan_out: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(row scale, column scale) of PEFT's IA³ merge ``W ⊙ transpose(l, fan_in_fan_out)``: a feed-forward
    module's ``(1, in)`` vector scales nn.Linear's columns (Conv1D's rows), another's ``(out, 1)`` its rows.  On
    a Conv2d/Conv3d weight ``(out, in, *kernel)``, merged as its ``(out, in·k)`` matrix, an output-side vector
    scales the rows and a feed-forward one each input channel's k columns (PEFT's ``_ConvNd.merge``)."""
    m = lo.module
    if len(shape) in (4, 5):
        if m.out_features:
            return _ia3_vector(lo, shape[0]), None
        if m.in_features != shape[1] and m.in_features % shape[1] == 0:
            raise UnsupportedError(
                f"IA³ on the input side of a grouped convolution ({m.in_features} input channels, "
                f"{shape[1]} per group): PEFT scales each group's weights by another slice of ia3_l, which is no "
                "row or column scale of the weight; not merged",
                path=lo.ck.root,
                tensor=m.a_key,
            )
        kernel = math.prod(shape[2:])
        return None, _ia3_vector(lo, shape[1]).repeat_interleave(kernel)
    if len(shape) != 2:
        raise UnsupportedError(
            f"IA³ on a weight of shape {list(shape)}: PEFT's IA³ wraps nn.Linear, Conv1D, nn.Conv2d and nn.Conv3d",
            path=lo.ck.root,
            tensor=m.a_key,
        )
    on_rows = bool(m.out_features) != fan_in_fan_out
    vec = _ia3_vector(lo, shape[0] if on_rows else shape[1])
    return (vec, None) if on_rows else (None, vec)


def _acc(buf: Buffers, n: int, cols: int, device: str = "cpu") -> torch.Tensor:
    return buf.scratch("acc", (n, cols), torch.float32, device)


def _token_rows(ops: KeyOps, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row indices, their new values) of a trainable-tokens adapter, checked against the weight."""
    if ops.tokens is None:
        return None
    tck, tkey, idx = ops.tokens
    delta = check_finite(tck.read(tkey), tck, tkey)
    if delta.shape != (len(idx), cols):
        raise AdapterError(
            f"trainable tokens delta has shape {list(delta.shape)}, expected [{len(idx)}, {cols}]",
            path=tck.root,
            tensor=tkey,
        )
    if len(idx) and (max(idx) >= rows or min(idx) < 0):
        raise AdapterError(f"token index out of range for vocabulary {rows}", path=tck.root, tensor=tkey)
    return torch.tensor(idx, dtype=torch.long), delta


@dataclass
class RowMerge:
    """How the row blocks of one base tensor become merged rows, prepared once per tensor: the LoRA
    deltas (summed in one tile), DoRA's scales and the trainable-token rows.  Merge and verify share it."""

    deltas: list[lora_math.RowDelta]  # LoRA's factors, or another tuner's rows (tuner_terms)
    row_scale: torch.Tensor | None = None
    col_scale: torch.Tensor | None = None
    tokens: tuple[torch.Tensor, torch.Tensor] | None = None
    norms: torch.Tensor | None = None  # DoRA's ‖W+ΔW‖ per output feature (verify bounds its error)
    rotation: oft_math.Rotation | None = None  # OFT/BOFT/HRA: each row times Rᵀ (alone on its tensor)

    def rows(self, w: torch.Tensor, start: int, out: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
        """Merged rows ``start:start+len(w)`` rounded once into ``out`` (a conv weight's rows are its
        flattened (out, in·k·k) matrix's)."""
        if self.rotation is not None:
            n, cols = w.shape[0], acc.shape[1]
            acc.copy_(w.view(n, cols))
            out.view(n, cols).copy_(self.rotation.rotate_(acc, start))
        elif self.deltas or self.row_scale is not None or self.col_scale is not None:
            n, cols = w.shape[0], acc.shape[1]
            lora_math.merge_rows(
                w.view(n, cols),
                self.deltas,
                start,
                out.view(n, cols),
                acc=acc,
                col_scale=self.col_scale,
                row_scale=self.row_scale,
            )
        else:
            out.copy_(w)
        if self.tokens is not None:
            sel = (self.tokens[0] >= start) & (self.tokens[0] < start + w.shape[0])
            if sel.any():
                out[self.tokens[0][sel] - start] = self.tokens[1][sel].to(out.dtype)
        return out


def _whole_groups(ops: KeyOps, step: int) -> int:
    """``step`` rounded up to whole groups of the rows an output-side rotation mixes (LyCORIS's Diag-OFT: its
    blocks, BOFT: its butterfly); 1 row for everything else."""
    unit = max((int(lo.module.tuner_args.get("rows_mixed", 1)) for lo in ops.loras), default=1)
    return -(-step // unit) * unit


def block_plan(
    ops: KeyOps, shape: tuple[int, ...], out_dtype: torch.dtype, block_bytes: int | None = None
) -> list[Read]:
    """The row blocks a merge of this tensor reads (once, or twice for DoRA's norm pass first): with
    ``block_bytes``, blocks of up to that many bytes in and out; else :func:`lora_math.block_rows`' tiles."""
    src_ck, src_key = ops.source
    rows, cols = shape[0], math.prod(shape[1:])  # a conv weight is merged as its (out, in·k·k) matrix
    elem = max(src_ck.info(src_key).itemsize, out_dtype.itemsize)
    if block_bytes is not None:  # an even count of equal blocks where the rows allow: two threads take turns
        cap = max(1, block_bytes // max(1, elem * cols))
        n = -(-rows // cap)
        step = min(cap, max(1, -(-rows // (n + n % 2))))
    else:
        step = lora_math.block_rows(rows, cols, elem_bytes=elem)
    # an output-side rotation (LyCORIS's Diag-OFT, BOFT) mixes the rows of a block or butterfly: read whole ones
    step = _whole_groups(ops, step)
    return [Read(src_ck, src_key, s, min(s + step, rows)) for s in range(0, rows, step)]


def prepare_rows(
    ops: KeyOps, shape: tuple[int, ...], conv1d_hint: bool, buf: Buffers, plan: list[Read], device: str = "cpu"
) -> RowMerge:
    """Read the factors and tokens; for DoRA, make the norm pass over ``plan`` (its first reading).  With a
    ``device`` other than the CPU, the factors and DoRA's scales move there: the tiles are computed there."""
    rows, cols = shape[0], math.prod(shape[1:])
    if ops.oft:  # alone on its tensor (see _assign): rows rotated, nothing added
        (lo,) = ops.loras
        emb = lo.module.kind == "embedding" or arch.is_embedding(lo.module.module)
        from . import oft_terms  # (OFT/BOFT/HRA/Diag-OFT: a LoRA merge never imports their rotations)

        rot = oft_terms.rotation(lo.module, lo.ck, shape, conv1d_hint, emb)
        return RowMerge([], tokens=_token_rows(ops, rows, cols), rotation=rot.to(device) if device != "cpu" else rot)
    if ops.ia3:  # alone on its tensor (see _assign): rows or columns scaled, nothing added
        rm = RowMerge([], tokens=_token_rows(ops, rows, cols))
        rm.row_scale, rm.col_scale = _ia3_scales(ops.loras[0], shape, conv1d_hint)
        return rm
    found = [_factors(lo, shape, conv1d_hint) for lo in ops.loras]
    rm = RowMerge([d for d, _ in found], tokens=_token_rows(ops, rows, cols))
    if ops.dora:  # a DoRA tensor has exactly one LoRA (see _assign)
        d0 = found[0][0]
        assert isinstance(d0, lora_math.DeltaFactors), "DoRA is LoRA's"
        rm.row_scale, rm.col_scale, rm.norms = _dora_scales(buf, plan, ops.loras[0], d0, found[0][1], rows, cols)
    if device != "cpu":
        rm.deltas = [d.to(device) for d in rm.deltas]
        rm.row_scale = rm.row_scale.to(device) if rm.row_scale is not None else None
        rm.col_scale = rm.col_scale.to(device) if rm.col_scale is not None else None
    return rm


Observer = Callable[[torch.Tensor, torch.Tensor], None]  # (input block, output block), before both are released


def _merge_job(
    name: str,
    ops: KeyOps,
    shape: tuple[int, ...],
    out_dtype: torch.dtype,
    conv1d_hint: bool,
    observe: Observer | None = None,
    device: str = "cpu",
) -> Job:
    src_ck = ops.source[0]
    cols = math.prod(shape[1:])
    # Blocks as large as the pipeline pools (8 MB) are read and written: one direct read each, an eighth of the
    # pipeline's hand-offs; each is computed in cache-sized tiles (block_rows: the kernels cost ~1.5x per byte
    # on a 16 MB fp32 tile, bench/README.md).  Not for DoRA: a transposed weight's norms are summed block by
    # block, so its blocks are part of the result (verify recomputes them with block_plan's default tiles).
    plan = block_plan(ops, shape, out_dtype, None if ops.dora else TILE_BYTES)
    elem = max(src_ck.info(ops.source[1]).itemsize, out_dtype.itemsize)
    tile = _whole_groups(ops, lora_math.block_rows(shape[0], cols, elem_bytes=elem)) if shape else 1

    def blocks(buf: Buffers) -> Iterator[torch.Tensor]:
        rm = prepare_rows(ops, shape, conv1d_hint, buf, plan, device)
        on = device if rm.deltas or rm.rotation is not None else "cpu"
        side = buf.side if observe is None and on == "cpu" and len(plan) > 1 else None

        step = tile if on == "cpu" else max(1, shape[0])  # another device: one kernel launch per block

        def compute(w: torch.Tensor, start: int, out: torch.Tensor, role: str) -> bool:
            """Merged rows into ``out``, a tile at a time; whether they are all finite (each tile checked while
            it is in the cache)."""
            finite, n = True, w.shape[0]
            for s in range(0, n, step):
                e = min(n, s + step)
                o = out[s:e]
                rm.rows(w[s:e], start + s, o, buf.scratch(role, (e - s, cols), torch.float32, on))
                finite = lora_math.merged_finite(o) and finite
            return finite

        def done(finite: bool, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            if observe is not None:
                observe(w, out)
            buf.give_back(w)
            if not finite:
                raise AdapterError(
                    "merged weight holds NaN or Inf",
                    path=src_ck.root,
                    tensor=name,
                    hint="the adapter or the base has extreme values",
                )
            return out

        # With a side thread, every other block is computed there while this thread computes the next one
        # (the kernels release the GIL): two cores' worth of kernels, blocks still yielded in order, and each
        # block computed by the same single-threaded kernels, so the bytes do not depend on who made them.
        held: tuple[Future[bool], torch.Tensor, torch.Tensor] | None = None
        for i, r in enumerate(plan):
            w = buf.read(r)
            out = buf.out(tuple(w.shape), out_dtype, (name, r.start * cols * out_dtype.itemsize))
            if side is not None and held is None and i + 1 < len(plan):
                held = (side.submit(compute, w, r.start, out, "acc-side"), w, out)
                continue
            finite = compute(w, r.start, out, "acc")
            if held is not None:
                fut, hw, hout = held
                held = None
                yield done(fut.result(), hw, hout)
            yield done(finite, w, out)

    op = "dora" if ops.dora else ("merge" if ops.loras else "tokens")
    return Job(name, out_dtype, shape, blocks, op, reads=lambda: plan * (2 if ops.dora else 1))


def bias_value(ops: KeyOps) -> torch.Tensor:
    """The merged bias in fp32: the base's plus Σ s·w·lora_B.bias (lora_bias)."""
    src_ck, src_key = ops.source
    b = src_ck.read(src_key).to(torch.float32)
    for lo in ops.bias_adds:
        m, lck = lo.module, lo.ck
        assert m.bias_key is not None
        extra = check_finite(lck.read(m.bias_key), lck, m.bias_key).to(torch.float32)
        if extra.shape != b.shape:
            raise AdapterError(
                f"lora_B.bias has shape {list(extra.shape)}, base bias {list(b.shape)}",
                path=lck.root,
                tensor=m.bias_key,
            )
        b = b + extra * lo.scaling
    for lo in ops.bias_scales:  # IA³: b ⊙ l; RoAd: R·b
        if lo.module.tuner == "road":
            from . import oft_terms as rotations  # (imported where used: main imports tuner code lazily)

            rot = rotations.rotation(lo.module, lo.ck, (b.numel(), 1), False, False)
            b = rot.rotate_(b.reshape(-1, 1).clone()).reshape(b.shape)
            continue
        vec = _ia3_vector(lo, b.numel())
        b = b * vec.reshape(b.shape)
    return b


def _bias_job(name: str, ops: KeyOps, out_dtype: torch.dtype) -> Job:
    src_ck, src_key = ops.source

    def blocks(buf: Buffers) -> Iterator[torch.Tensor]:
        yield bias_value(ops).to(out_dtype)

    return Job(name, out_dtype, src_ck.info(src_key).shape, blocks, "bias")
