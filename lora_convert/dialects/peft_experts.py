"""PEFT's ``target_parameters`` LoRA (``ParamWrapper``) on fused expert parameters, read into
:class:`~lora_convert.inventory.LoraModule` objects of kind ``experts``.

What PEFT 0.17+ writes for ``target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``:

* one ``ParamWrapper`` per targeted parameter; several on one module nest, the first-registered
  parameter innermost.  Saved keys: ``…experts.base_layer.lora_A.weight`` (inner, gate_up_proj),
  ``…experts.lora_A.weight`` (outer, down_proj); in the model, the base parameters sit at
  ``…experts.base_layer.base_layer.gate_up_proj``;
* lora_A is (E·r, in) with expert e's rows ``e·r … e·r+r-1``; lora_B is (out, E·r) with expert e's
  columns ``e, e+E, e+2E, …`` (rank-major).  Unsloth marks a block-per-expert B as
  ``"lora_B_layout": "grouped_by_expert"``; without a marker PEFT's packing is assumed (and said);
* ``r`` and ``lora_alpha`` (rank_pattern/alpha_pattern keys match ``<module>.<param>``) are per expert.

The key names alone do not say which parameter a wrapper targets: the config's ``target_parameters``,
matched as PEFT matches them, and the experts classes' registration order
(:data:`~lora_convert.moe_layouts.EXPERT_PARAM_ORDER`) do.  E comes from the model's tensors (unmerged),
a marker, config.json or, failing those, the config's rank.  Torch-free.
"""

from __future__ import annotations

from typing import Any

from ..config import AdapterConfig
from ..errors import AdapterError
from ..inventory import Inventory, LoraModule
from ..io.reader import Checkpoint
from ..moe_layouts import EXPERT_PARAM_ORDER, num_experts

B_LAYOUTS = ("rank_major", "grouped_by_expert")
UNSLOTH_MARKER = "unsloth_fused_expert_lora"
_NEST = ".base_layer"


def targeted_params(module: str, targets: list[str], *, bare: bool = True) -> list[str]:
    """The parameter names of ``module`` that ``target_parameters`` reach, by PEFT's rule: the key
    ``<module>.<param>`` equals a target or ends with ``.<target>``.  ``bare=False`` leaves out targets
    that name no module (``"gate_up_proj"``): those reach a module only if it has such a parameter."""
    out: list[str] = []
    for t in targets:
        param = t.rpartition(".")[2]
        key = f"{module}.{param}"
        if (bare or "." in t) and (key == t or key.endswith(f".{t}")) and param not in out:
            out.append(param)
    return out


def _split_nest(path: str) -> tuple[str, int]:
    depth = 0
    while path.endswith(_NEST):
        path, depth = path[: -len(_NEST)], depth + 1
    return path, depth


def resolve_experts(inv: Inventory, configs: dict[str, AdapterConfig], ck: Checkpoint) -> None:
    """Turn the LoRA modules that are ParamWrappers on 3-D expert parameters into ``experts`` modules
    (in place, every adapter, each read with its own config).  Raises AdapterError when the wrappers
    cannot be told apart."""
    for name, mods in inv.lora.items():
        cfg = configs.get(name)
        targets = [str(t) for t in (cfg.raw.get("target_parameters") or [])] if cfg else []
        by_module: dict[str, dict[int, LoraModule]] = {}
        for key, m in list(mods.items()):
            module, depth = _split_nest(key)
            if depth or _is_param_wrapper(module, targets, inv):
                by_module.setdefault(module, {})[depth] = m
            elif "weight" in targeted_params(module, targets, bare=False):
                m.param = "weight"  # a 2-D ParamWrapper (a router): a linear whose patterns match <module>.weight
        for module, levels in by_module.items():
            params = _assign(module, levels, targets, inv, ck)
            for depth, m in levels.items():
                del mods[m.module]
                em = _experts_module(m, f"{module}.{params[depth]}", depth, cfg, inv, ck)
                mods[em.module] = em


def _is_param_wrapper(module: str, targets: list[str], inv: Inventory) -> bool:
    """Whether a module whose keys look like a plain linear's (``experts.lora_A``) is a ParamWrapper: a
    target names it with its module path, or a bare parameter name reaches an experts module (the only
    modules of transformers' MoE models that hold 3-D parameters), or the model holds such a parameter."""
    if any(f"{module}.{p}" in inv.base for p in EXPERT_PARAM_ORDER):
        return True
    named = targeted_params(module, targets, bare=module.rpartition(".")[2] == "experts")
    return any(p != "weight" for p in named)


def _candidates(module: str, targets: list[str], inv: Inventory) -> list[str]:
    """Expert parameters of ``module`` that carry LoRA: named by the config, or (an unmerged checkpoint
    without one) the 3-D parameters the model holds there.  A 2-D ``weight`` wrapper is a plain linear."""
    if targets:
        return [p for p in targeted_params(module, targets) if p != "weight"]
    return [p for p in EXPERT_PARAM_ORDER if f"{module}.{p}" in inv.base]


def _assign(
    module: str, levels: dict[int, LoraModule], targets: list[str], inv: Inventory, ck: Checkpoint
) -> dict[int, str]:
    """Nesting depth -> parameter: the outermost wrapper is the last-registered targeted parameter."""
    names = _candidates(module, targets, inv)
    held = [p for p in names if f"{module}.{p}" in inv.base]
    if len(names) > len(levels) and len(held) == len(levels):
        names = held  # an unmerged checkpoint shows which of the named parameters the module has
    some = next(iter(levels.values()))
    if sorted(levels) != list(range(len(levels))) or len(names) != len(levels):
        raise AdapterError(
            f"{module}: {len(levels)} nested LoRA wrapper(s) but target_parameters name "
            f"{len(names)} parameter(s) of it ({', '.join(names) or 'none'})",
            path=ck.root,
            tensor=some.a_key,
            hint="adapter_config.json's target_parameters must list the expert parameters this adapter was trained on",
        )
    if len(names) > 1 and any(p not in EXPERT_PARAM_ORDER for p in names):
        raise AdapterError(
            f"{module}: cannot tell which of {', '.join(names)} each nested LoRA wrapper targets "
            "(their registration order in the model is not known here)",
            path=ck.root,
            tensor=some.a_key,
        )
    ordered = sorted(names, key=EXPERT_PARAM_ORDER.index) if len(names) > 1 else names
    return {depth: ordered[len(ordered) - 1 - depth] for depth in levels}


def _experts_module(
    m: LoraModule, path: str, depth: int, cfg: AdapterConfig | None, inv: Inventory, ck: Checkpoint
) -> LoraModule:
    rows = m.rank  # the linear reading took A's rows as the rank: E·r here
    marker = _marker(cfg, path)
    layout = marker.get("lora_B_layout") or (cfg.raw.get("lora_B_layout") if cfg else None)
    if layout is not None and layout not in B_LAYOUTS:
        raise AdapterError(
            f"lora_B_layout {layout!r} is not one of {', '.join(B_LAYOUTS)}", path=cfg.source if cfg else ck.root
        )
    e = _num_experts(path, rows, marker, cfg, inv, ck)
    if e is None or rows % e:
        raise AdapterError(
            f"LoRA on expert parameter {path}: lora_A has {rows} rows, which is not experts × rank "
            + (f"for {e} experts" if e else "for any rank the config gives"),
            path=ck.root,
            tensor=m.a_key,
            hint="is this adapter for this model?",
        )
    em = LoraModule(
        path,
        m.adapter,
        "experts",
        m.a_key,
        m.b_key,
        rows // e,
        m.in_features,
        m.out_features,
        m.bias_key,
        m.magnitude_key,
        experts=e,
        nest=depth,
        b_layout=layout or "rank_major",
        b_layout_assumed=layout is None,
    )
    if m.bias_key or m.magnitude_key:
        raise AdapterError(
            "lora_bias and DoRA are not defined for LoRA on expert parameters", path=ck.root, tensor=m.a_key
        )
    return em


def _marker(cfg: AdapterConfig | None, path: str) -> dict[str, Any]:
    """Unsloth's per-parameter entry (``unsloth_fused_expert_lora.parameters``) for ``path``, if any."""
    block = (cfg.raw.get(UNSLOTH_MARKER) if cfg else None) or {}
    params = block.get("parameters") if isinstance(block, dict) else None
    if not isinstance(params, dict):
        return {}
    for key, value in params.items():
        if isinstance(value, dict) and (path == key or path.endswith(f".{key}")):
            return value
    return {}


def _num_experts(
    path: str, rows: int, marker: dict[str, Any], cfg: AdapterConfig | None, inv: Inventory, ck: Checkpoint
) -> int | None:
    """E: the model's own parameter (unmerged), a marker, config.json, else the config's rank."""
    base_key = inv.base.get(path)
    if base_key is not None and len(ck.info(base_key).shape) == 3:
        return ck.info(base_key).shape[0]
    if "num_experts" in marker:  # from adapter_config.json: it divides lora_A's rows, so 1..rows
        e = marker["num_experts"]
        if not (isinstance(e, int) and not isinstance(e, bool) and 1 <= e <= max(rows, 1)):
            raise AdapterError(
                f"{UNSLOTH_MARKER} num_experts for {path} must be an integer from 1 to {rows} (lora_A's rows), "
                f"not {str(e)[:40]}",
                path=cfg.source if cfg else ck.root,
                hint="fix it in adapter_config.json",
            )
        return e
    e = num_experts(ck.config)
    if e is not None:
        return e
    if cfg is not None:
        r = cfg.rank_for(path)
        return rows // r if r > 0 and rows % r == 0 else None
    return None
