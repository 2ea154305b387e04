"""LoRA on mixture-of-experts weights, for the routes: where each expert LoRA lands in the base
(whichever layout the base stores its experts in), which way PEFT read a fused parameter, and merge jobs
that stream a fused or per-expert tensor one expert — one row block — at a time.

Two kinds of adapters reach the experts:

* PEFT ``target_parameters`` (LoraModule kind ``experts``): one A/B pair for all E experts of a fused
  parameter.  On a fused base (gpt-oss, Llama 4, transformers' ``save_original_format=False``) expert e's
  ΔP[e] goes into slab e of the 3-D tensor; on a per-expert base (Qwen-MoE, Mixtral, DeepSeek) the rows of
  ΔP[e] are split between the expert's gate and up tensors (or go whole into its down tensor).
* per-expert ``target_modules`` (transformers-v4 names, ``experts.3.gate_proj``): plain linear modules,
  which the plain merge handles on a per-expert base; on a fused base each lands in its rows of slab e.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import arch, lora_math, moe_layouts
from ..config import AdapterConfig
from ..dialects.peft_keys import Role, format_key
from ..errors import AdapterError, UnsupportedError
from ..inventory import LoraModule
from ..io.reader import Checkpoint
from ..moe_layouts import ExpertParam, MoeLayout
from ..pipeline import Buffers, Job, Read
from .common import BaseView, check_finite, copy_job

FP32 = torch.float32


_VERSION = re.compile(r"\s*v?(\d{1,9})(?:\.(\d{1,9}))?(?:\.(\d{1,9}))?(?![\d])")


def peft_version(cfg: AdapterConfig | None) -> tuple[int, ...] | str | None:
    """``peft_version`` of adapter_config.json (PEFT 0.18+ records it) as numbers: ``0.19.1.dev0`` -> (0, 19, 1);
    None where it is absent, the text itself where it does not start with a version number (unparsable).
    Its length is capped by the config's schema."""
    text = str((cfg.raw.get("peft_version") if cfg else None) or "")
    if not text:
        return None
    m = _VERSION.match(text)
    return tuple(int(n) for n in m.groups() if n is not None) if m else text


def transposed_reading(
    m: LoraModule, shape: tuple[int, int], layout: MoeLayout | None, version: tuple[int, ...] | str | None, root: Any
) -> bool:
    """Whether PEFT applied ``(B_e·A_e)ᵀ`` to a fused (E, d1, d2) parameter rather than ``B_e·A_e``.

    Where d1 ≠ d2 the factors' shapes decide: A has ``in`` columns, B ``out`` rows, and PEFT's ΔP[e] fits
    the parameter either way round.  For square experts only PEFT's reading does: up to 0.18 it always
    took (E, in, out); 0.19.0 swapped when the experts module was ``is_transposed``; since 0.19.1 it swaps
    when it is not."""
    d1, d2 = shape
    plain, transposed = (m.in_features, m.out_features) == (d2, d1), (m.in_features, m.out_features) == (d1, d2)
    if not (plain or transposed):
        raise AdapterError(
            f"LoRA for (in, out) = ({m.in_features}, {m.out_features}) does not fit the expert parameter's "
            f"{d1}×{d2} matrices",
            path=root,
            tensor=m.module,
            hint="is this adapter for this base model?",
        )
    if plain != transposed:
        return transposed
    if version is None or isinstance(version, str) or (version >= (0, 19) and layout is None):
        if version is None:
            why = "adapter_config.json records no peft_version"
        elif isinstance(version, str):
            why = f"adapter_config.json's peft_version {version[:64]!r} is unparsable"
        else:
            why = "the architecture is not known"
        raise AdapterError(
            f"square {d1}×{d2} expert matrices: which way PEFT read them depends on its version and the "
            f"architecture, and {why}",
            path=root,
            tensor=m.module,
            hint='set "peft_version" to the version of the PEFT that trained it (e.g. "0.19.1") in adapter_config.json'
            if version is None or isinstance(version, str)
            else "give the base's config.json (model_type)",
        )
    if version < (0, 19):
        return True
    assert layout is not None
    return (not layout.peft_transposed) if version[:3] == (0, 19, 0) else layout.peft_transposed


@dataclass
class _Part:
    """One LoRA contribution to one slab (one expert's 2-D matrix) of a base tensor."""

    module: LoraModule
    expert: int | None  # index into the module's packed factors (None: a plain linear module)
    transposed: bool
    sub: slice | None = None  # rows of the module's ΔW that land here (gate or up of gate_up_proj)
    rows: slice | None = None  # rows of the slab it covers (None: all of them)


class SharedFactors:
    """A and B of one LoRA module, read once for all the jobs that use them, dropped after the last."""

    def __init__(self, ck: Checkpoint, m: LoraModule) -> None:
        self.ck, self.m, self.users = ck, m, 0
        self.ab: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ab is None:
            a = check_finite(self.ck.read(self.m.a_key), self.ck, self.m.a_key)
            b = check_finite(self.ck.read(self.m.b_key), self.ck, self.m.b_key)
            self.ab = (a, b)
        return self.ab

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self.ab = None


@dataclass
class ExpertPlan:
    """Which base tensors expert LoRA lands on, slab by slab, and what the plain merge must skip."""

    ck: Checkpoint  # the adapter
    targets: dict[str, dict[int, list[_Part]]] = field(default_factory=dict)  # base key -> slab -> parts
    handled: set[str] = field(default_factory=set)  # adapter modules merged here
    renames: dict[str, str] = field(default_factory=dict)  # in-memory module -> its on-disk name
    shared: dict[str, SharedFactors] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def add(self, key: str, slab: int, part: _Part) -> None:
        self.targets.setdefault(key, {}).setdefault(slab, []).append(part)
        self.handled.add(part.module.module)
        self.shared.setdefault(part.module.module, SharedFactors(self.ck, part.module))

    def job(self, key: str, base: BaseView, dtype: torch.dtype | None) -> Job:
        ck, src = base.where(key)
        info = ck.info(src)
        out_dtype = dtype if (dtype is not None and info.is_float) else info.dtype
        slabs = self.targets[key]
        users = [self.shared[u] for u in sorted({p.module.module for parts in slabs.values() for p in parts})]
        for u in users:
            u.users += 1  # A and B stay in memory until the last job that uses them is done
        return slab_merge_job(key, ck, src, out_dtype, lambda s: self._delta(slabs.get(s), info.shape), users)

    def slab_delta(self, key: str, slab: int, shape: tuple[int, ...]) -> lora_math.DeltaFactors | None:
        """The ΔW factors of slab ``slab`` of ``key``, as its merge job adds them (verify bounds their error)."""
        return self._delta(self.targets[key].get(slab), shape)

    def _delta(self, parts: list[_Part] | None, shape: tuple[int, ...]) -> lora_math.DeltaFactors | None:
        if not parts:
            return None
        got = []
        for p in parts:
            a, b = self.shared[p.module.module].get()
            assert p.module.scaling is not None
            if p.expert is None:
                d = lora_math.linear_factors(a, b, p.module.scaling, transposed=False)
            else:
                d = lora_math.expert_factors(
                    a,
                    b,
                    p.expert,
                    p.module.experts,
                    p.module.scaling,
                    transposed=p.transposed,
                    b_layout=p.module.b_layout,
                )
            if p.sub is not None:
                d = lora_math.DeltaFactors(d.left[p.sub], d.right, d.scaling)
            got.append((d, p.rows))
        return lora_math.stack_factors(got, shape[-2])


def plan_expert_lora(
    modules: dict[str, LoraModule],
    adapter: Checkpoint,
    base: BaseView,
    model_config: dict[str, Any] | None,
    cfg: AdapterConfig | None,
) -> ExpertPlan:
    """Where every expert LoRA of ``modules`` lands in ``base``; modules it does not concern are left
    to the plain merge (``handled`` says which it took)."""
    plan = ExpertPlan(adapter)
    keys = base.keys()
    layout = moe_layouts.layout_for(model_config, keys)
    shapes = {k: tuple(base.ck.info(base.map[k]).shape) for k in keys}
    params = moe_layouts.find_expert_params(shapes, layout)
    version = peft_version(cfg)
    for mod, m in modules.items():
        if m.kind == "experts":
            p = params.get(m.module)
            if p is None:
                raise AdapterError(
                    f"LoRA on expert parameter {m.module}, which the base does not have "
                    f"({'fused or per expert' if layout and layout.parts else 'fused'})",
                    path=adapter.root,
                    tensor=m.a_key,
                    hint="is this adapter for this base model?",
                )
            bind_experts(m, p, adapter)
            _place_experts(plan, m, p, transposed_reading(m, p.shape, layout, version, adapter.root), layout)
        elif f"{mod}.weight" not in shapes and layout is not None:
            disk = layout.to_disk(mod)
            if disk != mod and f"{disk}.weight" in shapes:
                plan.renames[mod] = disk  # Mixtral's router: mlp.gate in memory, block_sparse_moe.gate on disk
            else:
                _place_per_expert(plan, m, params, layout, adapter)
    assumed = sorted(
        {m.module.rpartition(".")[2] for m in modules.values() if m.kind == "experts" and m.b_layout_assumed}
    )
    if assumed:
        plan.warnings.append(
            f"expert LoRA ({', '.join(assumed)}): lora_B packed rank-major (PEFT's layout) assumed, as "
            "adapter_config.json has no lora_B_layout; legacy Unsloth adapters pack it grouped_by_expert "
            '(add "lora_B_layout": "grouped_by_expert" for those)'
        )
    return plan


def bind_experts(m: LoraModule, p: ExpertParam, adapter: Checkpoint) -> None:
    """The adapter must be for the base's expert count: PEFT cannot load it otherwise (the factors'
    shapes do not fit), and the rank per expert — so the scaling — would be another one."""
    if m.experts != p.experts:
        raise AdapterError(
            f"LoRA for {m.experts} experts of rank {m.rank} (lora_A has {m.stored_rank} rows), but the base's "
            f"{p.path} has {p.experts} experts",
            path=adapter.root,
            tensor=m.a_key,
            hint="is this adapter for this base model?",
        )


def _place_experts(plan: ExpertPlan, m: LoraModule, p: ExpertParam, transposed: bool, layout: MoeLayout | None) -> None:
    if p.fused:
        for e in range(p.experts):
            plan.add(p.fused, e, _Part(m, e, transposed))
        return
    assert layout is not None  # (per-expert tensors are found by the layout's part names only)
    for e in range(p.experts):
        for part in layout.parts[p.param]:
            where = layout.part(p, e, part)
            plan.add(where.tensor, 0, _Part(m, e, transposed, sub=where.rows))


def _place_per_expert(
    plan: ExpertPlan, m: LoraModule, params: dict[str, ExpertParam], layout: MoeLayout, adapter: Checkpoint
) -> None:
    """A per-expert linear LoRA (``experts.3.gate_proj``) on a base that stores the experts fused."""
    hit = moe_layouts.split_expert_module(m.module)
    if hit is None:
        return
    experts, e, part = hit
    for param, parts in layout.parts.items():
        p = params.get(f"{layout.from_disk(experts)}.{param}")
        if part not in parts or p is None or not p.fused:
            continue
        if layout.stored_in_out:
            raise UnsupportedError(
                f"per-expert LoRA on {m.module}, but the base stores its experts (E, in, out)",
                path=adapter.root,
                tensor=m.a_key,
            )
        where = layout.part(p, e, part)
        if (m.out_features, m.in_features) != (where.count, p.shape[1]) or e >= p.experts:
            raise AdapterError(
                f"per-expert LoRA ({m.out_features}×{m.in_features}) does not fit expert {e} of {p.fused} "
                f"({p.experts}×{p.shape[0]}×{p.shape[1]})",
                path=adapter.root,
                tensor=m.a_key,
            )
        plan.add(where.tensor, e, _Part(m, None, False, rows=where.rows))


def memory_view(ck: Checkpoint, model_config: dict[str, Any] | None) -> dict[str, list[str]]:
    """``ck``'s tensors under transformers' in-memory names -> the stored tensors each is made of."""
    shapes = {k: tuple(ck.info(k).shape) for k in ck.tensors}
    return moe_layouts.memory_names(shapes, moe_layouts.layout_for(model_config, shapes))


def expert_wrappers(modules: dict[str, LoraModule]) -> dict[str, int]:
    """Experts module -> how many PEFT ParamWrappers nest around it (its parameters sit under as many
    ``base_layer``), from the expert LoRA modules keyed by their parameter's path in the base."""
    out: dict[str, int] = {}
    for path, m in modules.items():
        mod = path.rpartition(".")[0]
        out[mod] = max(out.get(mod, 0), m.nest + 1)
    return out


def attach_expert_jobs(
    key: str,
    sources: list[str],
    src: tuple[Checkpoint, str],
    m: LoraModule | None,
    depth: int,
    adapter_ck: Checkpoint,
    adapter: str,
    dtype: torch.dtype | None = None,
) -> list[Job]:
    """An expert parameter in PEFT's in-model layout: under its wrappers' ``base_layer``s (fused from the
    base's per-expert tensors where it stores them so), and the LoRA of the wrapper that targets it."""
    mod, _, param = key.rpartition(".")
    name = format_key(mod, Role.BASE, param=param, base_layer=depth)
    jobs = [fuse_job(src[0], sources, name, dtype) if len(sources) > 1 else copy_job(*src, name, dtype)]
    if m is not None:
        for role, k in ((Role.LORA_A, m.a_key), (Role.LORA_B, m.b_key)):
            jobs.append(copy_job(adapter_ck, k, format_key(m.wrapped, role, adapter=adapter), dtype, op="lora"))
    return jobs


def _expert_index(ck: Checkpoint, key: str) -> int:
    found = moe_layouts.split_expert_module(arch.module_of(key))
    if found is None:  # the layout listed it among the experts' tensors
        raise AdapterError("not a per-expert tensor", path=ck.root, tensor=key)
    return found[1]


def fuse_job(ck: Checkpoint, keys: list[str], name: str, dtype: torch.dtype | None = None) -> Job:
    """One fused expert parameter (E, d1, d2) from its per-expert tensors, bytes untouched: each stored
    tensor's bytes in turn (gate rows then up rows, expert after expert)."""
    parts = [copy_job(ck, k, name, dtype) for k in keys]
    first = ck.info(keys[0])
    experts = len({_expert_index(ck, k) for k in keys})
    per = keys[: len(keys) // experts]
    shape = (experts, sum(ck.info(k).shape[0] for k in per), *first.shape[1:])
    if any(ck.info(k).dtype_name != first.dtype_name for k in keys):
        raise AdapterError("per-expert tensors of one parameter differ in dtype", path=ck.root, tensor=keys[0])

    def blocks(buf: Buffers) -> Iterator[torch.Tensor]:
        for p in parts:
            yield from p.blocks(buf)

    return Job(name, parts[0].dtype, shape, blocks, "fuse", reads=lambda: [r for p in parts for r in p.reads()])


def slab_merge_job(
    name: str,
    ck: Checkpoint,
    key: str,
    out_dtype: torch.dtype,
    delta_for: Any,
    shared: list[SharedFactors],
) -> Job:
    """``key`` with ``delta_for(slab)`` added to each slab (one expert's matrix of a 3-D tensor; a 2-D
    tensor is one slab), in row blocks read as flat ranges: fp32, rounded once, never a whole slab."""
    info = ck.info(key)
    shape = tuple(info.shape)
    slabs, (d1, d2) = (shape[0], shape[1:]) if len(shape) == 3 else (1, shape)
    step = lora_math.block_rows(d1, d2, elem_bytes=max(info.itemsize, out_dtype.itemsize))
    plan = [
        Read(ck, key, (e * d1 + s) * d2, (e * d1 + min(s + step, d1)) * d2, flat=True)
        for e in range(slabs)
        for s in range(0, d1, step)
    ]

    def blocks(buf: Buffers) -> Iterator[torch.Tensor]:
        reads = iter(plan)
        for e in range(slabs):
            delta = delta_for(e)
            for s in range(0, d1, step):
                w = buf.read(next(reads))
                n = w.numel() // d2
                w = w.view(n, d2)
                out = buf.out((n, d2), out_dtype)
                if delta is not None:
                    lora_math.merge_rows(w, delta, s, out, acc=buf.scratch("acc", (n, d2), FP32))
                else:
                    out.copy_(w)
                buf.give_back(w)
                if not lora_math.all_finite(out):
                    raise AdapterError("merged weight holds NaN or Inf", path=ck.root, tensor=name)
                yield out
        for sh in shared:
            sh.release()

    return Job(name, out_dtype, shape, blocks, "merge", reads=lambda: plan)
