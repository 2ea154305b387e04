"""adapter -> adapter, ``--moe-layout per-expert|fused``: expert LoRA between PEFT's ``target_parameters``
layout (one A/B pair for the E experts of a fused parameter) and one LoRA module per expert and projection
(transformers-v4 names: ``mlp.experts.3.gate_proj``, Mixtral ``block_sparse_moe.experts.3.w1``), which
engines that serve per-expert LoRA read and PEFT converts on load.  Everything else is copied.

Exact both ways: per expert, A_e and B_e are slices of the packed factors; gate and up of ``gate_up_proj``
share A_e and take their rows of B_e.  Back to fused, expert e's A is its parts' A stacked and its B their
B placed block-diagonally (PEFT's own conversion does the same), each part's rank padded with zeros to the
largest across experts; when the parts' scalings differ they are folded into B (written fp32).

Needs the base (its config.json and tensor headers): the architecture's per-expert names, E, and which
way PEFT read the fused parameters.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import lora_math, moe_layouts
from ..dialects.peft_keys import Role, format_key
from ..errors import AdapterError, RouteError, UnsupportedError
from ..inventory import LoraModule
from ..moe_layouts import EXPERT_PARAM_ORDER, ExpertParam, MoeLayout
from ..pipeline import Buffers, Job
from .common import BaseView, copy_job
from .extract import target_regex
from .moe import SharedFactors, bind_experts, peft_version, transposed_reading
from .plan import Plan, Request
from .strip_split_attach import adapter_config_out, split_names

MOE_LAYOUTS = ("per-expert", "fused")


@dataclass
class _Out:
    """The converted adapter: jobs for the new tensors, and each new module's rank and alpha."""

    jobs: list[Job] = field(default_factory=list)
    settings: dict[str, tuple[int, float]] = field(default_factory=dict)  # module path -> (rank, alpha)
    replaced: set[str] = field(default_factory=set)  # source modules whose tensors are not copied
    warnings: list[str] = field(default_factory=list)


def plan_moe_layout(req: Request) -> Plan:
    """An adapter with its expert LoRA in the other layout (``req.moe_layout``)."""
    if req.moe_layout not in MOE_LAYOUTS:
        raise RouteError(f"--moe-layout must be one of {', '.join(MOE_LAYOUTS)}, not {req.moe_layout!r}")
    assert req.base is not None and req.config is not None
    base = BaseView(req.base)
    shapes = {k: tuple(req.base.info(k).shape) for k in base.keys()}
    layout = moe_layouts.layout_for(req.model_config, shapes)
    if layout is None or not layout.parts:
        kind = moe_layouts.layout_for(req.model_config)
        raise UnsupportedError(
            f"{kind.name if kind else 'this model'} has no per-expert layout: its experts exist only fused",
            path=req.base.root,
            hint="keep the target_parameters adapter (vLLM and PEFT load it)",
        )
    params = moe_layouts.find_expert_params(shapes, layout)
    modules = req.inventory.modules(req.adapter)
    if req.moe_layout == "per-expert":
        out = _to_per_expert(req, modules, layout, params)
    else:
        out = _to_fused(req, modules, layout, params)
    if not out.replaced:
        raise RouteError(f"holds no expert LoRA in the other layout: nothing to convert to {req.moe_layout}")
    drop = {format_key(modules[p].wrapped, r) for p in out.replaced for r in (Role.LORA_A, Role.LORA_B)}
    kept = {k: v for k, v in split_names(req.inventory, req.adapter).items() if k not in drop}
    jobs = [copy_job(req.source, src, name, op="lora") for name, src in kept.items()] + out.jobs
    config = _config(req, modules, out, layout)
    return Plan(
        "adapter",
        jobs,
        stem="adapter_model",
        sharded=False,
        tokenizer_from=[req.source.root],
        adapter_config=config,
        warnings=out.warnings,
        op_counts={"copy": len(kept), req.moe_layout: len(out.jobs)},
    )


def _tensor_job(name: str, shape: tuple[int, ...], dtype: torch.dtype, make: Callable[[], torch.Tensor]) -> Job:
    def blocks(buf: Buffers) -> Iterator[torch.Tensor]:
        yield make().contiguous()

    return Job(name, dtype, shape, blocks, "lora")


def _router(m: LoraModule, layout: MoeLayout) -> bool:
    return m.kind == "linear" and (
        m.module.endswith(f".{layout.router}") or m.module.endswith(f".{layout.to_disk(layout.router)}")
    )


def _move_router(out: _Out, ck: Any, m: LoraModule, path: str, pattern_path: str, alpha: float) -> None:
    out.jobs += [
        copy_job(ck, m.a_key, format_key(path, Role.LORA_A), op="lora"),
        copy_job(ck, m.b_key, format_key(path, Role.LORA_B), op="lora"),
    ]
    out.settings[pattern_path] = (m.rank, alpha)
    out.replaced.add(m.module)


# -- fused -> per expert -------------------------------------------------------------------------------------


def _to_per_expert(
    req: Request, modules: dict[str, LoraModule], layout: MoeLayout, params: dict[str, ExpertParam]
) -> _Out:
    out, cfg, ck = _Out(), req.config, req.source
    assert cfg is not None
    version = peft_version(cfg)
    for path, m in modules.items():
        if _router(m, layout):  # a 2-D target_parameters wrapper becomes the v4 linear, under its on-disk name
            _move_router(out, ck, m, layout.to_disk(path), layout.to_disk(path), cfg.alpha_for(m.config_key))
        if m.kind != "experts":
            continue
        p = params.get(path)
        if p is None:
            raise AdapterError(f"the base has no expert parameter {path}", path=ck.root, tensor=m.a_key)
        bind_experts(m, p, ck)
        transposed = transposed_reading(m, p.shape, layout, version, ck.root)
        sh = SharedFactors(ck, m)
        dtype = ck.info(m.a_key).dtype
        for e in range(p.experts):
            for part in layout.parts[p.param]:
                where = layout.part(p, e, part)
                mod, rows, sl = where.module, where.count, where.rows
                out.jobs += [
                    _tensor_job(
                        format_key(mod, Role.LORA_A), (m.rank, p.shape[1]), dtype, _piece(sh, e, transposed, None)
                    ),
                    _tensor_job(format_key(mod, Role.LORA_B), (rows, m.rank), dtype, _piece(sh, e, transposed, sl)),
                ]
                sh.users += 2
                out.settings[mod] = (m.rank, cfg.alpha_for(path))
        out.replaced.add(path)
    return out


def _piece(sh: SharedFactors, e: int, transposed: bool, rows: slice | None) -> Callable[[], torch.Tensor]:
    """Expert ``e``'s per-expert lora_A (rows None) or its lora_B rows, in nn.Linear's (out, in) view:
    ΔW = s·B_e·A_e, or s·A_eᵀ·B_eᵀ when PEFT read the parameter (E, in, out)."""

    def make() -> torch.Tensor:
        a, b = sh.get()
        a_e, b_e = lora_math.expert_pair(a, b, e, sh.m.experts, b_layout=sh.m.b_layout)
        lin_a, lin_b = (b_e.T, a_e.T) if transposed else (a_e, b_e)
        got = lin_a if rows is None else lin_b[rows]
        got = got.clone()
        sh.release()
        return got

    return make


# -- per expert -> fused -------------------------------------------------------------------------------------


def _to_fused(req: Request, modules: dict[str, LoraModule], layout: MoeLayout, params: dict[str, ExpertParam]) -> _Out:
    out, cfg, ck = _Out(), req.config, req.source
    assert cfg is not None
    groups: dict[str, dict[tuple[int, int], LoraModule]] = {}  # fused parameter -> (expert, part) -> module
    for path, m in modules.items():
        hit = moe_layouts.split_expert_module(path) if m.kind == "linear" else None
        if _router(m, layout):  # the v4 router linear becomes a target_parameters wrapper on its weight
            mem = layout.from_disk(path)
            _move_router(out, ck, m, mem, f"{mem}.weight", cfg.alpha_for(m.config_key))
        if hit is None:
            continue
        experts, e, part = hit
        for param, parts in layout.parts.items():
            if part in parts:
                groups.setdefault(f"{layout.from_disk(experts)}.{param}", {})[(e, parts.index(part))] = m
                out.replaced.add(path)
    nests = moe_layouts.wrapper_depths(groups)
    for path, got in sorted(groups.items()):
        p = params.get(path)
        if p is None:
            raise AdapterError(
                f"the base has no expert parameter {path}", path=ck.root, tensor=next(iter(got.values())).a_key
            )
        out.jobs += _fused_pair(req, p, got, layout, nests[path], out)
    return out


def _fused_pair(
    req: Request, p: ExpertParam, got: dict[tuple[int, int], LoraModule], layout: MoeLayout, nest: int, out: _Out
) -> list[Job]:
    """lora_A (E·R, in) and lora_B (out, E·R), rank-major, of one fused parameter from its per-expert modules."""
    cfg, ck = req.config, req.source
    assert cfg is not None
    n = len(layout.parts[p.param])
    rows = p.shape[0] // n
    for (e, _), m in got.items():
        if e >= p.experts or (m.out_features, m.in_features) != (rows, p.shape[1]):
            raise AdapterError(
                f"per-expert LoRA ({m.out_features}×{m.in_features}) does not fit expert {e} of {p.path} "
                f"({p.experts}×{rows}×{p.shape[1]} per part)",
                path=ck.root,
                tensor=m.a_key,
            )
    ranks = [max((m.rank for (e, j), m in got.items() if j == i), default=0) for i in range(n)]
    offsets = [sum(ranks[:i]) for i in range(n)]
    total = sum(ranks)
    scalings = {m.scaling for m in got.values()}
    fold = len(scalings) > 1
    s = 1.0 if fold else float(scalings.pop() or 1.0)
    alpha = s * (math.sqrt(total) if cfg.use_rslora else total)
    out.settings[p.path] = (total, alpha)
    dtypes = {ck.info(m.a_key).dtype for m in got.values()} | {ck.info(m.b_key).dtype for m in got.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 and not fold else torch.float32
    slices = moe_layouts.part_slices(layout, [rows] * n)
    wrapper = p.module + ".base_layer" * nest

    def make_a() -> torch.Tensor:
        a = torch.zeros(p.experts, total, p.shape[1], dtype=dtype)
        for (e, i), m in got.items():
            a[e, offsets[i] : offsets[i] + m.rank] = ck.read(m.a_key).to(dtype)
        return a.reshape(p.experts * total, p.shape[1])

    def make_b() -> torch.Tensor:
        b = torch.zeros(p.shape[0], total, p.experts, dtype=dtype)  # (out, rank, expert): rank-major columns
        for (e, i), m in got.items():
            part = ck.read(m.b_key).to(dtype)
            if fold:
                part = part * (float(m.scaling or 1.0) / s)
            b[slices[i], offsets[i] : offsets[i] + m.rank, e] = part
        return b.reshape(p.shape[0], total * p.experts)

    return [
        _tensor_job(format_key(wrapper, Role.LORA_A), (p.experts * total, p.shape[1]), dtype, make_a),
        _tensor_job(format_key(wrapper, Role.LORA_B), (p.shape[0], p.experts * total), dtype, make_b),
    ]


# -- adapter_config.json --------------------------------------------------------------------------------------


def _config(req: Request, modules: dict[str, LoraModule], out: _Out, layout: MoeLayout) -> dict[str, Any]:
    """The source's config with the expert targets, ranks and alphas of the other layout.

    ``r``/``lora_alpha`` are the most common ones — for per-expert output those of gate/up, which PEFT's
    conversion of per-expert adapters doubles for gate_up_proj; every module whose rank or alpha differs
    gets a pattern key matching it alone (per-expert modules: all experts of one layer and projection, and
    the fused parameter PEFT makes of them)."""
    cfg = req.config
    assert cfg is not None
    d = adapter_config_out(req)
    settings = {
        m.config_key: (m.rank, cfg.alpha_for(m.config_key)) for path, m in modules.items() if path not in out.replaced
    }
    settings.update(out.settings)
    gate_up = [v for k, v in out.settings.items() if _is_gate_up(k, layout)] if req.moe_layout == "per-expert" else []
    pool = gate_up or list(settings.values())
    r0, a0 = max(set(pool), key=pool.count)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for path, (r, a) in settings.items():
        key = _pattern_key(path, layout)
        if r != r0:
            rank_pattern[key] = r
        if a != a0:
            alpha_pattern[key] = a
    targets = _targets(req, modules, out, layout)
    d.update(
        r=r0,
        lora_alpha=int(a0) if float(a0).is_integer() else a0,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        **targets,
    )
    d.pop("lora_B_layout", None)  # the packing written is PEFT's (rank_major)
    d.pop("unsloth_fused_expert_lora", None)
    if req.moe_layout == "per-expert" and cfg.use_rslora:
        out.warnings.append(
            "use_rslora: PEFT 0.21 loads per-expert gate/up LoRA into the fused layout with √2 too large a "
            "scaling (it doubles r and alpha); engines that read per-expert modules are not affected"
        )
    return d


def _is_gate_up(path: str, layout: MoeLayout) -> bool:
    """A gate_up_proj parameter, or a per-expert gate or up module: PEFT's conversion of per-expert adapters
    gives these the config's r and lora_alpha (doubled)."""
    hit = moe_layouts.split_expert_module(path)
    return path.endswith(".gate_up_proj") or (hit is not None and hit[2] in layout.parts.get("gate_up_proj", ()))


def _pattern_key(path: str, layout: MoeLayout) -> str:
    """A rank/alpha pattern key for one module; per-expert modules: every expert of their layer and
    projection, and — for a projection that is a whole fused parameter (down) — the parameter PEFT's
    conversion makes of them (gate_up_proj gets PEFT's own doubled pattern)."""
    hit = moe_layouts.split_expert_module(path)
    if hit is None:
        return re.escape(path)
    experts, _, part = hit
    key = moe_layouts.per_expert_regex(experts, part)
    whole = [param for param, parts in layout.parts.items() if parts == (part,)]
    if whole:
        key = f"(?:{key}|{re.escape(layout.from_disk(experts))}\\.{whole[0]})"
    return key


def _targets(req: Request, modules: dict[str, LoraModule], out: _Out, layout: MoeLayout) -> dict[str, Any]:
    cfg = req.config
    assert cfg is not None
    kept = [
        p for p in modules if p not in out.replaced and modules[p].kind != "experts" and not _router(modules[p], layout)
    ]
    expert_names = {n for parts in layout.parts.values() for n in parts}
    router = layout.router.rpartition(".")[2]
    if req.moe_layout == "per-expert":
        new_names = {hit[2] for k in out.settings if (hit := moe_layouts.split_expert_module(k))}
        if any(_router(m, layout) for m in modules.values()):
            new_names.add(router)  # a router LoRA (target_parameters ...gate.weight) is a linear module per expert
        names = _module_targets(cfg.target_modules, kept, new_names)
        return {"target_modules": names, "target_parameters": None}
    fused = sorted(
        {f"{layout.experts}.{k.rpartition('.')[2]}" for k in out.settings if k.rpartition(".")[2] in EXPERT_PARAM_ORDER}
    )
    if any(_router(m, layout) for m in modules.values()):
        fused.append(f"{layout.router}.weight")
    collide = [p for p in kept if p.rpartition(".")[2] in expert_names | {router}]
    if collide:
        out.warnings.append(
            f"{len(collide)} plain module(s) share a per-expert projection's name (e.g. {collide[0]}): PEFT 0.21 "
            "re-targets such names onto the fused experts when it loads the adapter, and drops their LoRA"
        )
    return {
        "target_modules": _module_targets(cfg.target_modules, kept, set(), drop=expert_names | {router}),
        "target_parameters": fused,
    }


def _module_targets(given: Any, kept: list[str], add: set[str], drop: Collection[str] = frozenset()) -> Any:
    """target_modules for the converted adapter: a list stays a list (names removed/added); a regex becomes
    one that fullmatches exactly the modules kept, or the per-expert names added."""
    if isinstance(given, list) or given is None:
        names = [n for n in (given or []) if n not in drop]
        return sorted(set(names) | add)
    parts = [target_regex(kept)] if kept else []
    if add:
        parts.append(rf".*\.experts(?:\.\d+)?\.(?:{'|'.join(sorted(add - {'gate', 'router'}))})")
        parts += [rf".*\.{n}" for n in sorted(add & {"gate", "router"})]
    return "|".join(f"(?:{p})" for p in parts)
