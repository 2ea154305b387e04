"""adapter + base -> merged, and unmerged -> merged: every base tensor, with ``s·B·A`` folded in, DoRA
rescaled, replacements (``modules_to_save``, resized embeddings) and trainable tokens applied.

Each LoRA target is one job that streams the base weight in row blocks through
:func:`lora_math.merge_rows` (fp32, rounded once); everything else is a copy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .. import arch, lora_math
from ..errors import AdapterError, UnsupportedError
from ..inventory import LoraModule
from ..io.reader import Checkpoint
from ..pipeline import Buffers, Job, Read
from .common import BaseView, check_finite, copy_job, remap_modules, same_tensor
from .moe import plan_expert_lora
from .plan import Plan, Request, dtype_config_changes, output_dtype
from .quantized import quantized_base


@dataclass
class _KeyOps:
    """What happens to one base tensor."""

    source: tuple[Checkpoint, str]
    lora: LoraModule | None = None
    lora_ck: Checkpoint | None = None
    bias_add: tuple[LoraModule, Checkpoint] | None = None
    tokens: tuple[Checkpoint, str, list[int]] | None = None
    replaced: bool = False

    def signature(self) -> tuple[Any, ...]:
        """What was applied, to decide whether two tied tensors end up equal."""
        return (
            self.source[1] if self.replaced else None,
            self.lora.a_key if self.lora else None,
            self.tokens[1] if self.tokens else None,
        )


def plan_merge(req: Request) -> Plan:
    """Jobs that write the merged model: base tensors, with LoRA folded in and replacements applied."""
    cfg, model_config = req.config, req.model_config
    assert cfg is not None, "the API checks that an adapter config exists"
    cfg.check_supported()
    base = BaseView(req.base) if req.base is not None else BaseView(req.source, req.inventory.base)
    qbase = quantized_base(req, base)  # read through its dequantized view
    if qbase is not None:
        base = BaseView(qbase.view)
    tied = arch.tied_pair(model_config, base.keys())
    warnings: list[str] = []
    experts = plan_expert_lora(req.inventory.modules(req.adapter), req.source, base, model_config, cfg)
    ops = _assign(req, base, tied, warnings, experts.handled, experts.renames)
    config_changes: dict[str, Any] = {}
    keys = base.keys()
    if tied is not None:
        emb_key, head_key = tied
        if ops[head_key].signature() != ops[emb_key].signature() and not _mirrors(ops[head_key], ops[emb_key]):
            if head_key not in keys:
                keys.append(head_key)
            config_changes["tie_word_embeddings"] = False
            warnings.append(
                "embed_tokens and lm_head were tied in the base but differ after the merge: "
                "both are written and tie_word_embeddings is set to false"
            )
        elif head_key in keys:
            keys.remove(head_key)  # still tied: the shared tensor is stored once, as save_pretrained does
    dtype = output_dtype(req.dtype)
    conv1d = bool(cfg.fan_in_fan_out) or arch.stores_conv1d(model_config)
    dtypes = qbase.dtypes(req.dtype) if qbase is not None else {}
    jobs = [
        experts.job(k, base, dtypes.get(k, dtype))
        if k in experts.targets
        else _job(k, ops[k], base, dtypes.get(k, dtype), conv1d)
        for k in keys
    ]
    warnings += experts.warnings
    if qbase is not None:
        jobs = qbase.jobs(jobs, ops)
    vocab = _new_vocab(ops, base.keys(), tied, model_config)
    if vocab is not None:
        config_changes["vocab_size"] = vocab
    # Dequantized weights are written in --dtype, bf16 for auto: the config must say what is stored.
    written = "bf16" if qbase is not None and not qbase.requantize and req.dtype == "auto" else req.dtype
    config_changes.update(dtype_config_changes(written, model_config))
    plan = Plan(
        "merged",
        jobs,
        stem=base.ck.stem,
        carry_from=(req.base or req.source).root,
        tokenizer_from=[req.source.root] if req.base is not None else [],
        config_changes=config_changes,
        warnings=warnings,
    )
    if qbase is not None:
        qbase.annotate(plan)
    return plan


def _assign(
    req: Request,
    base: BaseView,
    tied: tuple[str, str] | None,
    notes: list[str],
    skip: set[str] = frozenset(),
    renames: dict[str, str] | None = None,
) -> dict[str, _KeyOps]:
    """Base key -> what to do with it: its source (base or replacement), LoRA, lora_bias, tokens.
    ``notes`` receives how adapter modules were matched to the base (prefixes, parts left out);
    ``skip``: modules merged as experts; ``renames``: modules the base stores under another name."""
    inv, ad, cfg = req.inventory, req.source, req.config
    assert cfg is not None
    modules, replace, tokens = (
        {k: m for k, m in inv.modules(req.adapter).items() if k not in skip},
        inv.replace.get(req.adapter, {}),
        inv.tokens.get(req.adapter, {}),
    )
    view = dict(base.map)
    if tied is not None:
        view[tied[1]] = base.map[tied[0]]  # a tied head *is* the embedding, whatever the file stores
    all_mods = sorted(set(modules) | {k.rsplit(".", 1)[0] for k in replace if k not in view} | set(tokens))
    renames = renames or {}
    rest = [m for m in all_mods if m not in renames]
    remap = (
        remap_modules(
            rest,
            BaseView(base.ck, view),
            "adapter modules",
            ad.root,
            spelled=inv.spelled,
            config=req.model_config,
            notes=notes,
        )
        if rest
        else {}
    )
    remap.update(renames)
    ops = {k: _KeyOps((base.ck, src)) for k, src in view.items()}
    for k, src in replace.items():
        mod, _, param = k.rpartition(".")
        bk = f"{remap.get(mod, mod)}.{param}" if mod in remap else k
        if bk not in ops:
            raise AdapterError(f"replaces {bk}, which the base does not have", path=ad.root, tensor=src)
        ops[bk].source, ops[bk].replaced = (ad, src), True
    for mod, m in modules.items():
        if mod not in remap:
            continue  # a part the base does not hold (reported in notes)
        wk = f"{remap[mod]}.weight"
        if wk not in ops:
            raise AdapterError(f"module {mod} has no weight in the base", path=ad.root, tensor=m.a_key)
        ops[wk].lora, ops[wk].lora_ck = m, ad
        if m.bias_key:
            bk = f"{remap.get(mod, mod)}.bias"
            if bk not in ops:
                raise UnsupportedError(
                    f"lora_bias on {mod}, whose base layer has no bias: the merged model "
                    "would need a new tensor its architecture cannot load",
                    path=ad.root,
                    tensor=m.bias_key,
                )
            ops[bk].bias_add = (m, ad)
    token_map = cfg.trainable_token_map()
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
        ops[wk].tokens = (ad, key, idx)
        if wk == emb_key and head_key in ops:
            ops[head_key].tokens = (ad, key, idx)  # PEFT ties the token adapter of a tied lm_head
    return ops


def _mirrors(head: _KeyOps, emb: _KeyOps) -> bool:
    """Whether the tied head ends up equal to the embedding although its ops are spelled differently.

    PEFT's ``ensure_weight_tying`` gives the head the embedding's adapter (lora_A = B_eᵀ, lora_B = A_eᵀ,
    the same parameters) and saves both, each with its own copy of the shared base weight; the two
    sides then stay equal and should stay tied, as in the unmerged model.
    """
    if head.tokens is not None or emb.tokens is not None or head.bias_add or emb.bias_add:
        return False
    if head.replaced != emb.replaced or (head.replaced and not same_tensor(head.source, emb.source)):
        return False
    if (head.lora is None) != (emb.lora is None):
        return False
    if head.lora is None:
        return True
    h, e = head.lora, emb.lora
    if h.kind == "embedding" or e.kind != "embedding" or h.magnitude_key or e.magnitude_key:
        return False
    if h.scaling != e.scaling or head.lora_ck is None or emb.lora_ck is None:
        return False
    ha, hb = head.lora_ck.read(h.a_key), head.lora_ck.read(h.b_key)
    ea, eb = emb.lora_ck.read(e.a_key), emb.lora_ck.read(e.b_key)
    return ha.shape == eb.T.shape and hb.shape == ea.T.shape and torch.equal(ha, eb.T) and torch.equal(hb, ea.T)


def _new_vocab(
    ops: dict[str, _KeyOps], keys: list[str], tied: tuple[str, str] | None, model_config: dict[str, Any] | None
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


def _job(key: str, o: _KeyOps, base: BaseView, dtype: torch.dtype | None, conv1d: bool) -> Job:
    src_ck, src_key = o.source
    info = src_ck.info(src_key)
    if dtype is not None and info.is_float:
        out_dtype = dtype
    elif key in base and info.is_float and base.ck.info(base.map[key]).is_float:
        out_dtype = base.ck.info(base.map[key]).dtype  # a replacement is written in the base's dtype
    else:
        out_dtype = info.dtype
    if o.lora is not None or o.tokens is not None or o.bias_add is not None:
        _check_float_target(src_ck, src_key)
    if o.lora is not None or o.tokens is not None:
        return _merge_job(key, o, info.shape, out_dtype, conv1d)
    if o.bias_add is not None:
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


def _factors(
    m: LoraModule, ck: Checkpoint, base_shape: tuple[int, ...], conv1d_hint: bool
) -> tuple[lora_math.DeltaFactors, bool]:
    """ΔW factors in the stored orientation, and whether that orientation is transposed."""
    a = check_finite(ck.read(m.a_key), ck, m.a_key)
    b = check_finite(ck.read(m.b_key), ck, m.b_key)
    assert m.scaling is not None
    if m.kind == "embedding":
        if tuple(base_shape) != (m.in_features, m.out_features):
            raise AdapterError(
                f"embedding LoRA for shape ({m.in_features}, {m.out_features}) but the base weight is "
                f"{tuple(base_shape)}",
                path=ck.root,
                tensor=m.module,
                hint="is this adapter for this base model?",
            )
        return lora_math.embedding_factors(a, b, m.scaling), True
    if m.kind == "conv" or len(base_shape) > 2:
        return _conv_factors(m, ck, a, b, base_shape), False
    try:
        transposed = lora_math.is_transposed(base_shape, m.in_features, m.out_features, hint=conv1d_hint)
    except ValueError as exc:
        raise AdapterError(
            f"LoRA expects (out, in) = ({m.out_features}, {m.in_features}) but the base weight is {tuple(base_shape)}",
            path=ck.root,
            tensor=m.module,
            hint="is this adapter for this base model?",
        ) from exc
    return lora_math.linear_factors(a, b, m.scaling, transposed=transposed), transposed


def _conv_factors(
    m: LoraModule, ck: Checkpoint, a: torch.Tensor, b: torch.Tensor, base_shape: tuple[int, ...]
) -> lora_math.DeltaFactors:
    """A convolution's ΔW on its flattened (out, in·k·k) weight, after checking the kernel fits."""
    assert m.scaling is not None
    kernel = tuple(a.shape[1:]) if a.dim() > 2 else (m.in_features, *([1] * (len(base_shape) - 2)))
    if tuple(base_shape) != (m.out_features, *kernel) or any(d != 1 for d in b.shape[2:]):
        raise AdapterError(
            f"conv LoRA for weight shape {(m.out_features, *kernel)} (B {list(b.shape)}) but the base weight is "
            f"{tuple(base_shape)}",
            path=ck.root,
            tensor=m.module,
            hint="is this adapter for this base model?",
        )
    return lora_math.conv_factors(a, b, m.scaling)


def _dora_scales(
    buf: Buffers,
    plan: list[Read],
    m: LoraModule,
    lck: Checkpoint,
    delta: lora_math.DeltaFactors,
    transposed: bool,
    rows: int,
    cols: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(row scale, column scale) m/‖W+ΔW‖ — one pass over the base weight before the merge pass.

    DoRA normalises per output feature: a stored row for nn.Linear, a stored column for Conv1D and
    Embedding (whose stored weight is transposed to the LoRA view)."""
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
        return lora_math.dora_scale(mag, norms), None
    sq = torch.zeros(cols, dtype=torch.float32)
    for r in plan:
        w = buf.read(r)
        sq += lora_math.dora_col_sq_norms(w, delta, r.start, _acc(buf, w.shape[0], cols))
        buf.give_back(w)
    return None, lora_math.dora_scale(mag, sq.sqrt_())


def _acc(buf: Buffers, n: int, cols: int) -> torch.Tensor:
    return buf.scratch("acc", (n, cols), torch.float32)


def _token_rows(ops: _KeyOps, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor] | None:
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


def _merge_job(name: str, ops: _KeyOps, shape: tuple[int, ...], out_dtype: torch.dtype, conv1d_hint: bool) -> Job:
    src_ck, src_key = ops.source
    m, lck = ops.lora, ops.lora_ck
    rows, cols = shape[0], math.prod(shape[1:])  # a conv weight is merged as its (out, in·k·k) matrix
    step = lora_math.block_rows(rows, cols, elem_bytes=max(src_ck.info(src_key).itemsize, out_dtype.itemsize))
    dora = m is not None and m.magnitude_key is not None
    plan = [Read(src_ck, src_key, s, min(s + step, rows)) for s in range(0, rows, step)]

    def blocks(buf: Buffers) -> Iterator[torch.Tensor]:
        delta, transposed = _factors(m, lck, shape, conv1d_hint) if m is not None and lck else (None, False)
        row_scale, col_scale = _dora_scales(buf, plan, m, lck, delta, transposed, rows, cols) if dora else (None, None)
        tokens = _token_rows(ops, rows, cols)
        for r in plan:
            s, w = r.start, buf.read(r)
            out = buf.out(tuple(w.shape), out_dtype)
            if delta is not None:
                lora_math.merge_rows(
                    w.view(w.shape[0], cols),
                    delta,
                    s,
                    out.view(w.shape[0], cols),
                    acc=_acc(buf, w.shape[0], cols),
                    col_scale=col_scale,
                    row_scale=row_scale,
                )
            else:
                out.copy_(w)
            buf.give_back(w)
            if tokens is not None:
                sel = (tokens[0] >= s) & (tokens[0] < s + w.shape[0])
                if sel.any():
                    out[tokens[0][sel] - s] = tokens[1][sel].to(out_dtype)
            if not lora_math.all_finite(out):
                raise AdapterError(
                    "merged weight holds NaN or Inf",
                    path=src_ck.root,
                    tensor=name,
                    hint="the adapter or the base has extreme values",
                )
            yield out

    op = "dora" if dora else ("merge" if m is not None else "tokens")
    return Job(name, out_dtype, shape, blocks, op, reads=lambda: plan * (2 if dora else 1))


def _bias_job(name: str, ops: _KeyOps, out_dtype: torch.dtype) -> Job:
    src_ck, src_key = ops.source
    assert ops.bias_add is not None
    m, lck = ops.bias_add
    shape = src_ck.info(src_key).shape

    def blocks(buf: Buffers) -> Iterator[torch.Tensor]:
        b = src_ck.read(src_key).to(torch.float32)
        assert m.bias_key is not None and m.scaling is not None
        extra = check_finite(lck.read(m.bias_key), lck, m.bias_key).to(torch.float32)
        if extra.shape != b.shape:
            raise AdapterError(
                f"lora_B.bias has shape {list(extra.shape)}, base bias {list(b.shape)}",
                path=lck.root,
                tensor=m.bias_key,
            )
        yield (b + extra * m.scaling).to(out_dtype)

    return Job(name, out_dtype, shape, blocks, "bias")
