"""The routes that only move tensors between PEFT's storage forms, bytes untouched:

* unmerged -> base: strip the LoRA modules, the base tensors under their original names;
* unmerged -> adapter: split the LoRA tensors out under PEFT's saved-adapter names;
* adapter + base -> unmerged: attach, PEFT's in-model state dict (``base_layer``, ``lora_A.<name>``).
"""

from __future__ import annotations

import copy as _copy
from functools import partial
from typing import Any

import torch

from .. import arch
from ..config import TUNER_PEFT_TYPES, AdapterConfig
from ..dialects import oft
from ..dialects.peft_keys import PEFT_PREFIX, Role, format_key
from ..errors import UnsupportedError
from ..inventory import Inventory, LoraModule
from ..io.reader import Checkpoint
from ..io.views import stored_tensors
from ..pipeline import Job
from .adapter_out import factor_job
from .common import BaseView, copy_job, remap_modules, same_tensor
from .moe import attach_expert_jobs, expert_wrappers, memory_view
from .plan import Plan, Request, dtype_config_changes, output_dtype


def adapter_config_out(req: Request) -> dict[str, Any]:
    """The adapter_config.json written beside an adapter: the source's, for inference, naming the base
    the user gave."""
    assert req.config is not None
    d = req.config.to_dict()
    d["inference_mode"] = True
    if req.base_ref is not None:
        d["base_model_name_or_path"] = str(req.base_ref)
    return d


def plan_strip(req: Request) -> Plan:
    """unmerged -> base: the base tensors under their original names, bytes untouched.  A tied head that
    repeats the embedding is left out, as transformers' ``save_pretrained`` leaves it out."""
    ck, base = req.source, req.inventory.base
    keys = list(base)
    tied = arch.tied_pair(ck.config, keys)
    if tied is not None and tied[1] in base and same_tensor((ck, base[tied[0]]), (ck, base[tied[1]])):
        keys.remove(tied[1])
    dtype = output_dtype(req.dtype)
    return Plan(
        "base",
        [copy_job(ck, base[k], k, dtype) for k in keys],
        carry_from=ck.root,
        config_changes=dtype_config_changes(req.dtype, ck.config),
    )


def plan_split(req: Request) -> Plan:
    """unmerged -> adapter: the adapter's tensors under PEFT's saved-adapter names."""
    ck, dtype = stored(req.source, req.inventory), output_dtype(req.dtype)
    jobs = [copy_job(ck, src, name, dtype, "lora") for name, src in split_names(req.inventory, req.adapter).items()]
    return Plan(
        "adapter",
        jobs,
        stem="adapter_model",
        sharded=False,
        tokenizer_from=[ck.root],
        adapter_config=adapter_config_out(req),
    )


def stored(ck: Checkpoint, inv: Inventory) -> Checkpoint:
    """``ck`` as stored, when a tuner's own tensors are written (its LoRA views are what the other routes read)."""
    if not inv.native:
        return ck
    raw = _copy.copy(ck)
    raw.tensors = stored_tensors(ck.tensors)
    return raw


def split_names(inv: Inventory, adapter: str) -> dict[str, str]:
    """Output key (PEFT's saved-adapter name) -> source key, for every tensor of ``adapter``."""
    out: dict[str, str] = {}
    native = inv.native.get(adapter, {})
    for mod, keys in native.items():  # another tuner's own tensors, as PEFT saves them (AdaLoRA: no ranknum)
        where = f"{PEFT_PREFIX}{mod}." if mod else "base_model."  # "": the tuner's own (VeRA's projections)
        out.update({f"{where}{role}": src for role, src in keys.items() if role != "ranknum"})
    for mod, m in inv.modules(adapter).items():
        if m.tuner != "lora":  # LoHa/LoKr: each factor under <module>.<factor>; OFT's <module>.oft_R.weight
            out.update({_factor_key(m, mod, f): key for f, key in m.factors.items()})
            continue
        if mod in native:
            continue
        roles = (Role.EMBED_A, Role.EMBED_B) if m.kind == "embedding" else (Role.LORA_A, Role.LORA_B)
        out[format_key(m.wrapped, roles[0])] = m.a_key  # expert LoRA: keyed by its (nested) ParamWrapper
        out[format_key(m.wrapped, roles[1])] = m.b_key
        if m.bias_key:
            out[format_key(mod, Role.LORA_B, param="bias")] = m.bias_key
        if m.magnitude_key:
            out[format_key(mod, Role.MAGNITUDE)] = m.magnitude_key
    for bk, src in inv.replace.get(adapter, {}).items():
        out[f"{PEFT_PREFIX}{bk}"] = src
    for mod, src in inv.tokens.get(adapter, {}).items():
        out[format_key(mod, Role.TOKENS_DELTA)] = src
    return out


def plan_attach(req: Request) -> Plan:
    """adapter + base -> unmerged: PEFT's in-model state dict (``base_layer``, ``lora_A.<name>``)."""
    assert req.base is not None and req.config is not None
    req.config.check_supported()
    inv, ad, name = req.inventory, req.source, req.adapter
    # the base under the names PEFT's in-model state dict uses: MoE experts fused as transformers holds them
    mem = memory_view(req.base, req.model_config)
    in_file = {k: v[0] for k, v in mem.items()}
    tied = arch.tied_pair(req.model_config, in_file)
    # a tied head the file does not store is still a module an adapter can target (PEFT wraps lm_head)
    virtual_head = tied[1] if tied is not None and tied[1] not in in_file else None
    base = BaseView(req.base, {**in_file, virtual_head: in_file[tied[0]]} if tied and virtual_head else in_file)
    modules, replace, tokens = inv.modules(name), inv.replace.get(name, {}), inv.tokens.get(name, {})
    native = inv.native.get(name, {})
    raw = stored(ad, inv)
    targets = sorted(set(modules) | set(tokens) | set(native) - {""})
    notes: list[str] = []
    remap = (
        remap_modules(
            targets, base, "adapter modules", ad.root, spelled=inv.spelled, config=req.base.config, notes=notes
        )
        if targets
        else {}
    )
    renamed = [m for m in native if m and remap.get(m, m) != m]
    if renamed:  # _renamed_config rewrites LoRA's patterns; another tuner's config names the adapter's own paths
        raise UnsupportedError(
            f"the adapter's module {renamed[0]} is {remap[renamed[0]]} in the base: attaching a "
            f"{inv.tuner.get(name, {}).get('peft_type')} adapter under other names than its own is not supported "
            "(its adapter_config.json would name paths the unmerged model does not have)",
            path=ad.root,
            tensor=renamed[0],
        )
    lora_by_base = {remap[m]: lm for m, lm in modules.items() if m in remap and lm.kind != "experts"}
    experts_by_base = {remap[m]: lm for m, lm in modules.items() if m in remap and lm.kind == "experts"}
    wrappers = expert_wrappers(experts_by_base)  # experts module -> how many ParamWrappers nest around it
    tok_by_base = {remap[m]: key for m, key in tokens.items() if m in remap}
    native_by_base = {remap[m]: keys for m, keys in native.items() if m in remap}
    shared = native.get("", {})  # VeRA's projections: PEFT's in-model state dict holds them under every layer too
    saved_modules = {k.rsplit(".", 1)[0] for k in replace} - set(lora_by_base) - set(tok_by_base) - set(native_by_base)
    jobs: list[Job] = []
    copy = partial(copy_job, dtype=output_dtype(req.dtype))  # --dtype casts floating tensors
    for k in base.keys():
        mod, _, param = k.rpartition(".")
        src = (ad, replace[k]) if k in replace else base.where(k)
        if mod in wrappers or len(mem.get(k, ())) > 1:  # an expert parameter (wrapped, or fused per-expert tensors)
            expert = experts_by_base.get(k)
            jobs += attach_expert_jobs(k, mem[k], src, expert, wrappers.get(mod, 0), ad, name, output_dtype(req.dtype))
            continue
        if k == virtual_head and mod not in lora_by_base and mod not in native_by_base:
            continue  # tied and untouched: the embedding alone is stored, as in the base
        if mod in native_by_base:
            jobs.append(copy(*src, format_key(mod, Role.BASE, param=param, base_layer=True)))
            if param == "weight":
                jobs += _native_jobs(raw, mod, {**native_by_base[mod], **shared}, name, inv.tuner.get(name, {}), copy)
        elif mod in lora_by_base:
            m = lora_by_base[mod]
            if k != virtual_head:  # a tied head's base_layer is the embedding: stored once, under its name
                jobs.append(copy(*src, format_key(mod, Role.BASE, param=param, base_layer=True)))
            if param != "weight":
                continue
            if m.tuner != "lora":  # LoHa/LoKr/...: each factor under <module>.<factor>.<adapter>
                for f, key in {**m.factors, **shared}.items():  # (and a tuner's shared tensors: VB-LoRA's bank)
                    jobs.append(copy(ad, key, _factor_key(m, mod, f, name), op="lora"))
                continue
            roles = (Role.EMBED_A, Role.EMBED_B) if m.kind == "embedding" else (Role.LORA_A, Role.LORA_B)
            jobs.append(copy(ad, m.a_key, format_key(mod, roles[0], adapter=name), op="lora"))
            jobs.append(copy(ad, m.b_key, format_key(mod, roles[1], adapter=name), op="lora"))
            if m.bias_key:
                jobs.append(copy(ad, m.bias_key, format_key(mod, Role.LORA_B, param="bias", adapter=name), op="lora"))
            if m.magnitude_key:
                jobs.append(copy(ad, m.magnitude_key, format_key(mod, Role.MAGNITUDE, adapter=name), op="lora"))
        elif mod in tok_by_base and param == "weight":
            jobs.append(copy(*src, f"{PEFT_PREFIX}{mod}.token_adapter.base_layer.weight"))
            jobs.append(copy(ad, tok_by_base[mod], format_key(mod, Role.TOKENS_DELTA, adapter=name), op="lora"))
        elif mod in saved_modules and k in replace:
            jobs.append(copy(*base.where(k), format_key(mod, Role.ORIGINAL_MODULE, param=param)))
            jobs.append(
                copy(ad, replace[k], format_key(mod, Role.MODULES_TO_SAVE, param=param, adapter=name), op="replace")
            )
        else:
            jobs.append(copy(*src, f"{PEFT_PREFIX}{k}"))
    jobs += [copy(raw, src, f"base_model.{role}.{name}", op="lora") for role, src in shared.items()]
    return Plan(
        "unmerged",
        jobs,
        carry_from=req.base.root,
        tokenizer_from=[ad.root],
        config_changes=dtype_config_changes(req.dtype, req.base.config),
        adapter_config=_renamed_config(adapter_config_out(req), modules, remap),
        warnings=notes,
    )


def _factor_key(m: LoraModule, mod: str, factor: str, adapter: str | None = None) -> str:
    """Another tuner's tensor as PEFT keys it: a ParameterDict's ``<module>.<factor>[.<adapter>]`` (LoHa, LoKr), or
    OFT's module dict of ``OFTRotationModule`` s, ``<module>.oft_R[.<adapter>].weight``."""
    if m.tuner == "oft":
        return oft.key(mod, factor, adapter)
    return format_key(mod, Role.TUNER, param=factor, adapter=adapter)


def _native_jobs(
    ck: Checkpoint, mod: str, keys: dict[str, str], name: str, tuner: dict[str, Any], copy: Any
) -> list[Job]:
    """Another tuner's tensors in PEFT's in-model state dict: ``<module>.<role>.<name>``, and AdaLoRA's
    ``ranknum`` (PEFT keeps ``init_r`` there, 0 for a layer its budget resized to no rows)."""
    jobs = [copy(ck, src, f"{PEFT_PREFIX}{mod}.{role}.{name}", op="lora") for role, src in keys.items()]
    if tuner.get("peft_type") == "ADALORA" and "ranknum" not in keys:
        value = float(tuner["init_r"]) if ck.info(keys["lora_A"]).shape[0] else 0.0
        jobs.append(
            factor_job(
                f"{PEFT_PREFIX}{mod}.ranknum.{name}",
                (1,),
                torch.float32,
                lambda: torch.tensor([value], dtype=torch.float32),
            )
        )
    return jobs


def _renamed_config(d: dict[str, Any], modules: dict[str, LoraModule], remap: dict[str, str]) -> dict[str, Any]:
    """The adapter config under the base's module names, when matching renamed any (a VLM prefix, a kohya
    name): patterns and targets spelled for the source's paths would miss, so every module's rank and
    scaling is written under its new path (scaling · rank as alpha: exact without use_rslora)."""
    if all(remap.get(m, m) == m for m in modules):
        return d
    ranks = {remap[m]: lm.rank for m, lm in modules.items() if m in remap}
    alphas = {remap[m]: float(lm.scaling or 0) * lm.rank for m, lm in modules.items() if m in remap}
    cfg = AdapterConfig.for_modules(ranks, alphas)
    d.update(
        r=cfg.r,
        **{"alpha" if d.get("peft_type") in TUNER_PEFT_TYPES else "lora_alpha": cfg.lora_alpha},
        rank_pattern=cfg.rank_pattern,
        alpha_pattern=cfg.alpha_pattern,
        use_rslora=False,
        target_modules=cfg.target_modules,
    )
    if d.get("peft_type") in TUNER_PEFT_TYPES:
        d.pop("use_rslora")  # LoHa/LoKr configs have no rsLoRA
    return d
