"""Routes between the storage forms, each a list of tensor jobs streamed through the writer.

A :class:`~.pipeline.Job` knows its output name, dtype and shape before any data is read, declares
the blocks it will read, and yields its data as blocks of rows; :func:`~.pipeline.execute` streams
the jobs into a folder (the API makes that folder atomic).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from . import lora_math as lm
from .config import AdapterConfig
from .errors import AdapterError, UnsupportedError
from .inventory import Inventory, LoraModule
from .io.reader import Checkpoint
from .io.safetensors_format import FLOAT_DTYPES
from .keys import Role, format_key, short_name
from .pipeline import Buffers, Job, Read, execute  # noqa: F401 - execute: the routes' runner, cv.execute

FORMS = ("merged", "adapter", "unmerged", "base")
DTYPES = {"auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
INPUT_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "embeddings")
QUANT_DTYPES = {torch.int8, torch.uint8} | {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}
COPY_BLOCK = 1 << 20  # bytes per block of a plain copy: cache-sized, like the merge's output blocks


@dataclass
class ConvertResult:
    output: str
    route: str
    source_form: str
    target_form: str
    files: list[str]
    tensors: int
    total_bytes: int
    ops: dict[str, int]
    config_changes: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- small helpers ---------------------------------------------------------------------------

def _copy_job(ck: Checkpoint, src: str, name: str, dtype: torch.dtype | None = None, op: str = "copy") -> Job:
    info = ck.info(src)
    out_dtype = dtype if (dtype is not None and info.dtype in FLOAT_DTYPES) else info.dtype
    numel = info.nbytes // info.dtype.itemsize
    blockwise = bool(info.shape) and numel > 0
    step = max(1, COPY_BLOCK // info.dtype.itemsize)  # a copy is a byte range: bounded pieces, any shape

    def reads() -> list[Read]:
        return [Read(ck, src, s, min(s + step, numel), flat=True) for s in range(0, numel, step)] if blockwise else []

    def blocks(buf: Buffers) -> Iterator[torch.Tensor]:
        if not blockwise:
            yield ck.read(src).to(out_dtype)
            return
        for r in reads():
            w = buf.read(r)
            if out_dtype == info.dtype:
                yield w  # the read block goes to the writer as it is, and back to its pool from there
            else:
                out = buf.out(tuple(w.shape), out_dtype).copy_(w)
                buf.give_back(w)
                yield out

    return Job(name, out_dtype, info.shape, blocks, op, reads=reads)


def _check_finite(t: torch.Tensor, ck: Checkpoint, key: str) -> torch.Tensor:
    if not lm.all_finite(t):
        raise AdapterError("holds NaN or Inf values", path=ck.root, tensor=key)
    return t


class BaseView:
    """Base tensors by their plain key, wherever they live (a base checkpoint, or inside an unmerged one)."""

    def __init__(self, ck: Checkpoint, mapping: dict[str, str] | None = None) -> None:
        self.ck = ck
        self.map = mapping if mapping is not None else {k: k for k in ck.tensors}

    def __contains__(self, key: str) -> bool:
        return key in self.map

    def keys(self) -> list[str]:
        return list(self.map)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.ck.info(self.map[key]).shape

    def dtype(self, key: str) -> torch.dtype:
        return self.ck.info(self.map[key]).dtype


def _input_embedding_key(keys: list[str]) -> str | None:
    for k in keys:
        mod, _, param = k.rpartition(".")
        if param == "weight" and short_name(mod) in INPUT_EMBEDDING_NAMES:
            return k
    return None


def _tied(model_config: dict[str, Any] | None, base: BaseView) -> tuple[str | None, str | None]:
    """(input embedding key, output embedding key) when the model ties them.

    A tied model's lm_head *is* the input embedding at load time, whether or not the file
    also stores ``lm_head.weight``; so its base value is always the embedding's."""
    out_key = "lm_head.weight"
    emb = _input_embedding_key(base.keys())
    if emb is None:
        return None, None
    cfg = model_config or {}
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings"))
    if tie is None:  # transformers' default is True; a file without lm_head can only be tied
        tie = out_key not in base
    return (emb, out_key) if tie else (None, None)


def _quantized(model_config: dict[str, Any] | None, base: BaseView) -> str | None:
    if model_config and model_config.get("quantization_config"):
        qc = model_config["quantization_config"]
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
        return f"the base is quantized ({method}); merge into the unquantized base instead"
    for k in base.keys():
        if k.endswith((".weight_scale", ".weight_scale_inv", ".qweight", ".scales", ".absmax", ".SCB")):
            return f"the base holds quantized weights ({k}); merge into the unquantized base instead"
    return None


def _remap_modules(modules: list[str], base: BaseView, what: str, adapter_root: Path) -> dict[str, str]:
    """Module path in the adapter -> base key prefix; handles a base saved without its
    ``base_model_prefix`` (e.g. GPT-2's ``h.0...`` vs ``transformer.h.0...``), errs on anything else."""
    keys = set(base.keys())

    def found(m: str) -> bool:
        return any(f"{m}.{p}" in keys for p in ("weight", "bias")) or m in keys

    missing = [m for m in modules if not found(m)]
    if not missing:
        return {m: m for m in modules}
    heads = {m.split(".", 1)[0] for m in missing}
    if len(heads) == 1:
        head = heads.pop()
        if not any(k.startswith(head + ".") for k in keys):
            stripped = {m: m.split(".", 1)[1] for m in modules if m.startswith(head + ".") and "." in m}
            if all(found(v) for v in stripped.values()) and len(stripped) == len(missing):
                return {m: stripped.get(m, m) for m in modules}
    hint = _prefix_hint(missing, keys)
    sample = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    raise AdapterError(
        f"{len(missing)} of {len(modules)} {what} match no tensor of the base: {sample}",
        path=adapter_root, hint=hint or "is this adapter for this base model?")


def _prefix_hint(missing: list[str], keys: set[str]) -> str | None:
    m = missing[0]
    parts = m.split(".")
    for k in sorted(keys):
        kp = k.split(".")[:-1]
        for cut in range(1, min(3, len(parts))):
            if kp == parts[cut:]:
                return f"the adapter's keys carry an extra {'.'.join(parts[:cut])!r} prefix: expected e.g. {'.'.join(kp)}"
        for cut in range(1, min(3, len(kp))):
            if kp[cut:] == parts:
                return f"the adapter's keys lack the {'.'.join(kp[:cut])!r} prefix the base uses: expected e.g. {'.'.join(kp)}"
    return None


# -- the merge route ---------------------------------------------------------------------

@dataclass
class _KeyOps:
    source: tuple[Checkpoint, str]
    lora: LoraModule | None = None
    lora_ck: Checkpoint | None = None
    bias_add: tuple[LoraModule, Checkpoint] | None = None
    tokens: tuple[Checkpoint, str, list[int]] | None = None
    replaced: bool = False

    def signature(self) -> tuple[Any, ...]:
        """What was applied, to decide whether two tied tensors end up equal."""
        return (self.source[1] if self.replaced else None, self.lora.a_key if self.lora else None,
                self.tokens[1] if self.tokens else None)


def _same_tensor(a: tuple[Checkpoint, str], b: tuple[Checkpoint, str]) -> bool:
    """Bit-equal stored tensors, compared in row blocks (embeddings can be GBs)."""
    (ca, ka), (cb, kb) = a, b
    ia, ib = ca.info(ka), cb.info(kb)
    if ia.shape != ib.shape or ia.dtype != ib.dtype:
        return False
    rows = ia.shape[0] if ia.shape else 1
    step = max(1, COPY_BLOCK * 16 // max(1, ia.nbytes // max(1, rows)))
    return all(torch.equal(ca.read_rows(ka, s, s + step), cb.read_rows(kb, s, s + step)) for s in range(0, rows, step))


def _mirrors(head: _KeyOps, emb: _KeyOps, cfg: AdapterConfig) -> bool:
    """Whether the tied head ends up equal to the embedding although its ops are spelled differently.

    PEFT's ``ensure_weight_tying`` gives the head the embedding's adapter (lora_A = B_eᵀ, lora_B = A_eᵀ,
    the same parameters) and saves both, each with its own copy of the shared base weight; the two
    sides then stay equal and should stay tied, as in the unmerged model.
    """
    if head.tokens is not None or emb.tokens is not None or head.bias_add or emb.bias_add:
        return False
    if head.replaced != emb.replaced or (head.replaced and not _same_tensor(head.source, emb.source)):
        return False
    if (head.lora is None) != (emb.lora is None):
        return False
    if head.lora is None:
        return True
    h, e = head.lora, emb.lora
    if h.kind == "embedding" or e.kind != "embedding" or h.magnitude_key or e.magnitude_key:
        return False
    if _scaling(cfg, h) != _scaling(cfg, e) or head.lora_ck is None or emb.lora_ck is None:
        return False
    ha, hb = head.lora_ck.read(h.a_key), head.lora_ck.read(h.b_key)
    ea, eb = emb.lora_ck.read(e.a_key), emb.lora_ck.read(e.b_key)
    return ha.shape == eb.T.shape and hb.shape == ea.T.shape and torch.equal(ha, eb.T) and torch.equal(hb, ea.T)


def _scaling(cfg: AdapterConfig, m: LoraModule) -> float:
    return cfg.scaling_for(m.module, m.rank)


def _factors(m: LoraModule, ck: Checkpoint, cfg: AdapterConfig, base_shape: tuple[int, ...],
             conv1d_hint: bool) -> tuple[lm.DeltaFactors, bool]:
    """ΔW factors in the stored orientation, and whether that orientation is transposed."""
    a = _check_finite(ck.read(m.a_key), ck, m.a_key)
    b = _check_finite(ck.read(m.b_key), ck, m.b_key)
    s = _scaling(cfg, m)
    if m.kind == "embedding":
        if tuple(base_shape) != (m.in_features, m.out_features):
            raise AdapterError(
                f"embedding LoRA for shape ({m.in_features}, {m.out_features}) but the base weight is "
                f"{tuple(base_shape)}", path=ck.root, tensor=m.module, hint="is this adapter for this base model?")
        return lm.embedding_factors(a, b, s), True
    try:
        transposed = lm.is_transposed(base_shape, m.in_features, m.out_features, hint=conv1d_hint)
    except ValueError as exc:
        raise AdapterError(f"LoRA expects (out, in) = ({m.out_features}, {m.in_features}) but the base weight is "
                           f"{tuple(base_shape)}", path=ck.root, tensor=m.module,
                           hint="is this adapter for this base model?") from exc
    return lm.linear_factors(a, b, s, transposed=transposed), transposed


def _merge_job(name: str, ops: _KeyOps, shape: tuple[int, ...], out_dtype: torch.dtype, cfg: AdapterConfig,
               conv1d_hint: bool) -> Job:
    src_ck, src_key = ops.source
    m, lck = ops.lora, ops.lora_ck
    rows_total, cols = shape[0], (shape[1] if len(shape) > 1 else 1)
    step = lm.block_rows(rows_total, cols, elem_bytes=max(src_ck.info(src_key).dtype.itemsize, out_dtype.itemsize))
    passes = 2 if (m is not None and m.magnitude_key is not None) else 1  # DoRA: norms, then merge
    plan = [Read(src_ck, src_key, s, min(s + step, rows_total)) for s in range(0, rows_total, step)]

    def blocks(buf: Buffers) -> Iterator[torch.Tensor]:

        def acc(n: int) -> torch.Tensor:
            return buf.scratch("acc", (n, cols), torch.float32)

        delta, transposed = _factors(m, lck, cfg, shape, conv1d_hint) if m is not None else (None, False)
        row_scale = col_scale = None
        if m is not None and m.magnitude_key is not None:
            # DoRA normalises per output feature: a stored row for nn.Linear, a stored column
            # for Conv1D and Embedding (whose stored weight is transposed to the LoRA view).
            mag = _check_finite(lck.read(m.magnitude_key), lck, m.magnitude_key)
            if not transposed:
                row_scale = torch.empty(rows_total, dtype=torch.float32)
                for r in plan:
                    w = buf.read(r)
                    row_scale[r.start:r.stop] = lm.dora_row_norms(w, delta, r.start, acc(w.shape[0]))
                    buf.give_back(w)
                row_scale = lm.dora_scale(mag, row_scale)
            else:
                sq = torch.zeros(cols, dtype=torch.float32)
                for r in plan:
                    w = buf.read(r)
                    sq += lm.dora_col_sq_norms(w, delta, r.start, acc(w.shape[0]))
                    buf.give_back(w)
                col_scale = lm.dora_scale(mag, sq.sqrt_())
        tok_rows = tok_delta = None
        if ops.tokens is not None:
            tck, tkey, idx = ops.tokens
            tok_delta = _check_finite(tck.read(tkey), tck, tkey)
            tok_rows = torch.tensor(idx, dtype=torch.long)
            if tok_delta.shape != (len(idx), cols):
                raise AdapterError(f"trainable tokens delta has shape {list(tok_delta.shape)}, expected "
                                   f"[{len(idx)}, {cols}]", path=tck.root, tensor=tkey)
            if len(idx) and (max(idx) >= rows_total or min(idx) < 0):
                raise AdapterError(f"token index out of range for vocabulary {rows_total}", path=tck.root, tensor=tkey)
        for r in plan:
            s, w = r.start, buf.read(r)
            out = buf.out(tuple(w.shape), out_dtype)
            if delta is not None:
                lm.merge_rows(w, delta, s, out, acc=acc(w.shape[0]), col_scale=col_scale, row_scale=row_scale)
            else:
                out.copy_(w)
            buf.give_back(w)
            if tok_rows is not None:
                sel = (tok_rows >= s) & (tok_rows < s + w.shape[0])
                if sel.any():
                    out[tok_rows[sel] - s] = tok_delta[sel].to(out_dtype)
            if not lm.all_finite(out):
                raise AdapterError("merged weight holds NaN or Inf", path=src_ck.root, tensor=name,
                                   hint="the adapter or the base has extreme values")
            yield out

    op = "dora" if (m is not None and m.magnitude_key) else ("merge" if m is not None else "tokens")

    return Job(name, out_dtype, shape, blocks, op, reads=lambda: plan * passes)


def _bias_job(name: str, ops: _KeyOps, out_dtype: torch.dtype, cfg: AdapterConfig) -> Job:
    src_ck, src_key = ops.source
    m, lck = ops.bias_add
    shape = src_ck.info(src_key).shape

    def blocks(buf: Buffers) -> Iterator[torch.Tensor]:
        b = src_ck.read(src_key).to(torch.float32)
        extra = _check_finite(lck.read(m.bias_key), lck, m.bias_key).to(torch.float32)
        if extra.shape != b.shape:
            raise AdapterError(f"lora_B.bias has shape {list(extra.shape)}, base bias {list(b.shape)}",
                               path=lck.root, tensor=m.bias_key)
        yield (b + extra * _scaling(cfg, m)).to(out_dtype)

    return Job(name, out_dtype, shape, blocks, "bias")


def plan_merge(base: BaseView, ad: Checkpoint, inv: Inventory, adapter: str, cfg: AdapterConfig,
               dtype: torch.dtype | None, model_config: dict[str, Any] | None
               ) -> tuple[list[Job], dict[str, Any], list[str]]:
    """Jobs that write the merged model: base tensors, with LoRA folded in and replacements applied."""
    cfg.check_supported()
    q = _quantized(model_config, base)
    if q:
        raise UnsupportedError(q, path=base.ck.root)
    warnings: list[str] = []
    modules = inv.modules(adapter)
    replace = inv.replace.get(adapter, {})
    tokens = inv.tokens.get(adapter, {})
    emb_key, out_key = _tied(model_config, base)
    keys = base.keys()
    tied_view = dict(base.map)
    if out_key is not None and out_key not in tied_view:
        tied_view[out_key] = base.map[emb_key]
    view = BaseView(base.ck, tied_view)
    all_mods = sorted({m for m in modules} | {k.rsplit(".", 1)[0] for k in replace if k not in view}
                      | set(tokens))
    remap = _remap_modules(all_mods, view, "adapter modules", ad.root) if all_mods else {}

    def rk(key: str) -> str:  # adapter key -> base key
        mod, _, param = key.rpartition(".")
        return f"{remap.get(mod, mod)}.{param}" if mod in remap else key

    ops: dict[str, _KeyOps] = {k: _KeyOps((view.ck, view.map[k])) for k in view.map}
    if out_key is not None:
        ops[out_key] = _KeyOps((view.ck, view.map[emb_key]))
    new_keys: list[str] = []
    for k, src in replace.items():
        bk = rk(k)
        if bk not in ops:
            raise AdapterError(f"replaces {bk}, which the base does not have", path=ad.root, tensor=src)
        ops[bk].source = (ad, src)
        ops[bk].replaced = True
    conv1d = bool(cfg.fan_in_fan_out) or (model_config or {}).get("model_type") in CONV1D_MODEL_TYPES
    for mod, m in modules.items():
        wk = f"{remap.get(mod, mod)}.weight"
        if wk not in ops:
            raise AdapterError(f"module {mod} has no weight in the base", path=ad.root, tensor=m.a_key)
        ops[wk].lora, ops[wk].lora_ck = m, ad
        if m.bias_key:
            bk = f"{remap.get(mod, mod)}.bias"
            if bk not in ops:
                raise UnsupportedError(f"lora_bias on {mod}, whose base layer has no bias: the merged model "
                                       "would need a new tensor its architecture cannot load", path=ad.root,
                                       tensor=m.bias_key)
            ops[bk].bias_add = (m, ad)
    token_map = cfg.trainable_token_map()
    for mod, key in tokens.items():
        wk = f"{remap.get(mod, mod)}.weight"
        if wk == out_key and emb_key is not None and any(f"{remap.get(m, m)}.weight" == emb_key for m in tokens):
            continue  # the tied lm_head's token adapter is the embedding's (PEFT ties them); applied below
        idx = token_map.get(short_name(mod)) or token_map.get(mod)
        if idx is None:
            raise AdapterError(f"trainable tokens for {mod} but trainable_token_indices names no indices for it",
                               path=ad.root, tensor=key)
        ops[wk].tokens = (ad, key, idx)
        if out_key is not None and wk == emb_key and out_key in ops:
            ops[out_key].tokens = (ad, key, idx)  # PEFT ties the token adapter of a tied lm_head
    config_changes: dict[str, Any] = {}
    if out_key is not None:
        if ops[out_key].signature() != ops[emb_key].signature() and not _mirrors(ops[out_key], ops[emb_key], cfg):
            if out_key not in keys:
                new_keys.append(out_key)
            config_changes["tie_word_embeddings"] = False
            warnings.append("embed_tokens and lm_head were tied in the base but differ after the merge: "
                            "both are written and tie_word_embeddings is set to false")
    jobs: list[Job] = []
    for k in keys + new_keys:
        o = ops[k]
        src_ck, src_key = o.source
        info = src_ck.info(src_key)
        out_dtype = dtype if (dtype is not None and info.dtype in FLOAT_DTYPES) else (
            base.dtype(k) if k in base and base.dtype(k) in FLOAT_DTYPES and info.dtype in FLOAT_DTYPES
            else info.dtype)
        if o.lora is not None or o.tokens is not None:
            jobs.append(_merge_job(k, o, info.shape, out_dtype, cfg, conv1d))
        elif o.bias_add is not None:
            jobs.append(_bias_job(k, o, out_dtype, cfg))
        else:
            jobs.append(_copy_job(src_ck, src_key, k, out_dtype, "replace" if o.replaced else "copy"))
    if emb_key is not None or "lm_head.weight" in ops:
        ek = emb_key or _input_embedding_key(keys)
        if ek is not None and ek in ops and ops[ek].replaced:
            vocab = ops[ek].source[0].info(ops[ek].source[1]).shape[0]
            if model_config and model_config.get("vocab_size") not in (None, vocab):
                config_changes["vocab_size"] = vocab
    return jobs, config_changes, warnings


# -- the other routes ------------------------------------------------------------------

def plan_strip(inv: Inventory, ck: Checkpoint) -> list[Job]:
    """unmerged -> base: the base tensors under their original names, bytes untouched."""
    return [_copy_job(ck, src, key) for key, src in inv.base.items()]


def plan_split(inv: Inventory, ck: Checkpoint, adapter: str) -> dict[str, str]:
    """unmerged -> adapter: output key (PEFT's saved layout) -> source key."""
    out: dict[str, str] = {}
    for mod, m in inv.modules(adapter).items():
        if m.kind == "embedding":
            out[format_key(mod, Role.EMBED_A)] = m.a_key
            out[format_key(mod, Role.EMBED_B)] = m.b_key
        else:
            out[format_key(mod, Role.LORA_A)] = m.a_key
            out[format_key(mod, Role.LORA_B)] = m.b_key
        if m.bias_key:
            out[format_key(mod, Role.LORA_B, param="bias")] = m.bias_key
        if m.magnitude_key:
            out[format_key(mod, Role.MAGNITUDE)] = m.magnitude_key
    for bk, src in inv.replace.get(adapter, {}).items():
        out[f"base_model.model.{bk}"] = src
    for mod, src in inv.tokens.get(adapter, {}).items():
        out[format_key(mod, Role.TOKENS_DELTA)] = src
    return out


def plan_attach(base: BaseView, ad: Checkpoint, inv: Inventory, adapter: str, cfg: AdapterConfig,
                model_config: dict[str, Any] | None) -> list[Job]:
    """adapter + base -> unmerged: PEFT's in-model state dict (``base_layer``, ``lora_A.<name>``)."""
    cfg.check_supported()
    modules = inv.modules(adapter)
    replace = inv.replace.get(adapter, {})
    tokens = inv.tokens.get(adapter, {})
    remap = _remap_modules(sorted(set(modules) | set(tokens)), base, "adapter modules", ad.root) if (
        modules or tokens) else {}
    lora_by_base = {remap[m]: lmod for m, lmod in modules.items()}
    tok_by_base = {remap[m]: key for m, key in tokens.items()}
    mts_modules = set()
    for k in replace:
        mod = k.rsplit(".", 1)[0]
        if mod not in lora_by_base and mod not in tok_by_base:
            mts_modules.add(mod)
    jobs: list[Job] = []
    for k in base.keys():
        mod, _, param = k.rpartition(".")
        src = (ad, replace[k]) if k in replace else (base.ck, base.map[k])
        if mod in lora_by_base:
            m = lora_by_base[mod]
            jobs.append(_copy_job(src[0], src[1], format_key(mod, Role.BASE, param=param, base_layer=True)))
            if param == "weight":
                roles = (Role.EMBED_A, Role.EMBED_B) if m.kind == "embedding" else (Role.LORA_A, Role.LORA_B)
                jobs.append(_copy_job(ad, m.a_key, format_key(mod, roles[0], adapter=adapter), op="lora"))
                jobs.append(_copy_job(ad, m.b_key, format_key(mod, roles[1], adapter=adapter), op="lora"))
                if m.bias_key:
                    jobs.append(_copy_job(ad, m.bias_key, format_key(mod, Role.LORA_B, param="bias",
                                                                       adapter=adapter), op="lora"))
                if m.magnitude_key:
                    jobs.append(_copy_job(ad, m.magnitude_key, format_key(mod, Role.MAGNITUDE, adapter=adapter),
                                          op="lora"))
        elif mod in tok_by_base and param == "weight":
            jobs.append(_copy_job(src[0], src[1], f"base_model.model.{mod}.token_adapter.base_layer.weight"))
            jobs.append(_copy_job(ad, tok_by_base[mod], format_key(mod, Role.TOKENS_DELTA, adapter=adapter),
                                  op="lora"))
        elif mod in mts_modules and k in replace:
            jobs.append(_copy_job(base.ck, base.map[k], format_key(mod, Role.ORIGINAL_MODULE, param=param)))
            jobs.append(_copy_job(ad, replace[k], format_key(mod, Role.MODULES_TO_SAVE, param=param,
                                                               adapter=adapter), op="replace"))
        else:
            jobs.append(_copy_job(src[0], src[1], f"base_model.model.{k}"))
    return jobs
