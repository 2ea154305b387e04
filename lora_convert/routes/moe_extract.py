"""Extraction of expert LoRA: ΔP of every routed expert factored by SVD into one PEFT ``target_parameters``
pair per fused parameter (A (E·r, in), B (out, E·r), rank-major), as PEFT trains them.

Each expert is one job: its ΔP[e] (gate rows then up rows of ``gate_up_proj``, from per-expert tensors or
from slab e of a fused tensor) is formed in fp32 from row blocks of both checkpoints, factored, and
dropped; only the top singular triplets stay (``--rank``, or ``--max-rank`` for the energy and error
criteria).  PEFT gives all experts of one parameter the same rank, so that rank is the largest any expert
needs, and every expert is written with it.

PEFT reads a fused (E, d1, d2) parameter as (E, out, in) unless the experts module is ``is_transposed``
(gpt-oss): there ΔP[e] = (B_e·A_e)ᵀ, and the factored matrix is ΔP[e]ᵀ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import arch, lora_math, moe_layouts, svd
from ..dialects.peft_keys import PEFT_PREFIX
from ..errors import CheckpointError, RouteError
from ..io.reader import Checkpoint
from ..moe_layouts import ExpertParam, MoeLayout
from ..pipeline import Buffers, Job, Read
from .extract_options import parse_layers

FP32 = torch.float32


@dataclass
class ExpertExtraction:
    """What extraction of the experts produced: tensors to write, their parameters' ranks, the reports."""

    entries: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)  # fused parameter path -> rank per expert
    reports: list = field(default_factory=list)  # ModuleReport per expert


def expert_params(tk: Checkpoint, bk: Checkpoint) -> tuple[MoeLayout | None, dict[str, ExpertParam]]:
    """The fused expert parameters both checkpoints store alike (same tensors, same shapes)."""
    shapes = {k: tuple(tk.info(k).shape) for k in tk.tensors}
    layout = moe_layouts.layout_for(tk.config or bk.config, shapes)
    found = moe_layouts.find_expert_params(shapes, layout)
    same = {
        path: p
        for path, p in found.items()
        if all(k in bk.tensors and tuple(bk.info(k).shape) == shapes[k] for k in p.keys())
    }
    return layout, same


def _reads(ck: Checkpoint, p: ExpertParam, e: int, layout: MoeLayout | None) -> list[tuple[Read, int]]:
    """Row blocks of expert ``e``'s (d1, d2) matrix in ``ck``: (read, first row); per-expert parts where
    ``layout`` says they lie."""
    d1, d2 = p.shape
    step = lora_math.block_rows(d1, d2)
    if p.fused:
        base = e * d1 * d2
        return [
            (Read(ck, p.fused, base + s * d2, base + min(s + step, d1) * d2, flat=True), s) for s in range(0, d1, step)
        ]
    assert layout is not None  # (per-expert tensors are found by the layout's part names only)
    out = []
    for part in layout.parts[p.param]:
        where = layout.part(p, e, part)
        n, row = where.count, where.rows.start
        sub = max(1, min(step, n))
        out += [(Read(ck, where.tensor, s, min(s + sub, n)), row + s) for s in range(0, n, sub)]
    return out


def expert_difference_job(
    tk: Checkpoint,
    bk: Checkpoint,
    p: ExpertParam,
    e: int,
    done: Callable[[torch.Tensor | None], None],
    layout: MoeLayout | None = None,
) -> Job:
    """ΔP[e] in fp32 from read-ahead blocks of both checkpoints, handed to ``done`` (None: unchanged)."""
    tuned, base = _reads(tk, p, e, layout), _reads(bk, p, e, layout)
    d1, d2 = p.shape

    def reads() -> list[Read]:
        return [r for pair in zip(tuned, base, strict=True) for r, _ in pair]

    def run(buf: Buffers) -> Iterator[torch.Tensor]:
        delta = torch.empty(d1, d2, dtype=FP32)
        for (rt, row), (rb, _) in zip(tuned, base, strict=True):
            a, b = buf.read(rt), buf.read(rb)
            for ck, r, x in ((tk, rt, a), (bk, rb, b)):
                if not x.is_floating_point() or not lora_math.all_finite(x):
                    raise CheckpointError(
                        "holds NaN or Inf values, or is not a float tensor",
                        path=ck.root,
                        tensor=r.key,
                        hint="extract from the unquantized, finite tuned model and base",
                    )
            n = a.numel() // d2
            delta[row : row + n].copy_(a.view(n, d2)).sub_(b.view(n, d2))
            buf.give_back(a)
            buf.give_back(b)
        done(delta if bool(delta.any()) else None)
        return
        yield  # a generator that writes nothing

    return Job(f"{p.path}[{e}]", FP32, (), run, "factor", reads=reads, writes=False)


@dataclass
class _Expert:
    f: svd.Factorisation  # trimmed to the triplets any rank can keep
    rank: int  # what the criterion asks for this expert alone
    capped: bool
    error: float  # measured on the factors written at ``rank``


def factor_expert(
    delta: torch.Tensor, transposed: bool, opts, dtype: torch.dtype, where: tuple[Path | str | None, str] = (None, "")
) -> _Expert:
    """The SVD of one expert's ΔP (its transpose when PEFT reads the parameter (E, in, out)), trimmed."""
    m = (delta.T if transposed else delta).to(torch.device(opts.device))
    k = min(opts.rank if opts.rank is not None else opts.max_rank, opts.max_rank)
    f = svd.factorise(m, k, svd=opts.svd, seed=opts.seed)
    r, capped = svd.pick_rank(f, rank=opts.rank, energy=opts.energy, max_error=opts.max_error, max_rank=opts.max_rank)
    B, A = f.factors(r)
    svd.check_factors(B.to(dtype), A.to(dtype), where, opts.dtype)
    err = _error(m, B.to(dtype).to(FP32), A.to(dtype).to(FP32), f.total_energy)
    keep = min(k, f.S.numel())
    trimmed = svd.Factorisation(
        f.U[:, :keep].cpu().clone(), f.S.cpu().clone(), f.Vh[:keep].cpu().clone(), f.total_energy, f.method, f.complete
    )
    return _Expert(trimmed, r, capped, err)


def _error(m: torch.Tensor, B: torch.Tensor, A: torch.Tensor, total: float) -> float:
    if total == 0:
        return 0.0
    acc = 0.0
    step = max(1, (1 << 20) // max(1, m.shape[1]))
    for i in range(0, m.shape[0], step):
        r = torch.addmm(m[i : i + step], B[i : i + step].to(m.device), A.to(m.device), alpha=-1)
        acc += float(torch.sum(r * r))
    return (acc / total) ** 0.5


def pack(
    p: ExpertParam, got: dict[int, _Expert], transposed: bool, dtype: torch.dtype
) -> tuple[int, torch.Tensor, torch.Tensor, dict[int, float]]:
    """(rank, lora_A (E·r, in), lora_B (out, E·r) rank-major, error per expert) at the largest rank any
    expert needs; unchanged experts get zero factors."""
    r = max(x.rank for x in got.values())
    out_dim, in_dim = (p.shape[1], p.shape[0]) if transposed else p.shape
    A = torch.zeros(p.experts, r, in_dim, dtype=dtype)
    B = torch.zeros(out_dim, r, p.experts, dtype=dtype)
    errors = {}
    for e, x in got.items():
        b, a = x.f.factors(min(r, x.f.U.shape[1]))
        A[e, : a.shape[0]] = a.to(dtype)
        B[:, : b.shape[1], e] = b.to(dtype)
        errors[e] = x.error if r == x.rank else x.f.relative_error(r)
    return r, A.reshape(p.experts * r, in_dim), B.reshape(out_dim, r * p.experts), errors


def lora_keys(p: ExpertParam, nest: int) -> tuple[str, str]:
    wrapper = p.module + ".base_layer" * nest
    return f"{PEFT_PREFIX}{wrapper}.lora_A.weight", f"{PEFT_PREFIX}{wrapper}.lora_B.weight"


def refuse_per_expert(layout: MoeLayout | None, params: dict[str, ExpertParam]) -> None:
    """``--moe-layout per-expert`` factors each stored per-expert tensor as a linear; fused stores have none."""
    fused = [p for p in params.values() if p.fused]
    if fused:
        raise RouteError(
            f"--moe-layout per-expert: the checkpoints store the experts fused ({fused[0].fused})",
            hint="extract the default target_parameters adapter, then convert it with --moe-layout per-expert"
            if layout is not None and layout.parts
            else "this architecture has no per-expert layout",
        )


class ExpertPass:
    """The experts' part of extraction: one difference-and-SVD job per expert, run with the other jobs of
    the first pass, then packed per fused parameter."""

    def __init__(self, tk: Checkpoint, bk: Checkpoint, opts, moe_layout: str | None) -> None:
        self.tk, self.bk, self.opts = tk, bk, opts
        self.layout, params = expert_params(tk, bk)
        if moe_layout == "per-expert":
            refuse_per_expert(self.layout, params)
            params = {}  # per-expert tensors are linears: the plain extraction factors them
        # parameters left out (--include/--exclude/--layers, unknown architectures) go the plain way: skipped
        self.params = {path: p for path, p in params.items() if self._wanted(p)}
        self.keys = {k for p in self.params.values() for k in p.keys()}
        self.got: dict[str, dict[int, _Expert]] = {}
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[opts.dtype]

    def _wanted(self, p: ExpertParam) -> bool:
        inc, exc = self.opts.patterns()
        layers = parse_layers(self.opts.layers)
        if self.layout is None:
            return False  # fused experts of an unknown architecture: how PEFT reads them is not known
        if layers is not None and (li := arch.layer_index(p.module)) is not None and li not in layers:
            return False
        return (not inc or any(x.search(p.path) for x in inc)) and not any(x.search(p.path) for x in exc)

    @property
    def count(self) -> int:
        return sum(p.experts for p in self.params.values())

    def jobs(
        self, advance: Callable[[int], None], submit: Callable[[torch.Tensor, Callable[[], None]], None] | None = None
    ) -> list[Job]:
        """One job per expert of every changed parameter; each ΔP[e] is factored by ``submit(ΔP, factor)`` (the
        extraction's pool of factorising threads, routes/factoring.py), or where it was formed without one."""
        out = []
        transposed = bool(self.layout and self.layout.peft_transposed)
        for path, p in self.params.items():
            for e in range(p.experts):

                def done(delta: torch.Tensor | None, path: str = path, e: int = e) -> None:
                    advance(1)
                    if delta is None:
                        return

                    def factor(delta: torch.Tensor = delta) -> None:
                        self.got.setdefault(path, {})[e] = factor_expert(
                            delta, transposed, self.opts, self.dtype, (self.tk.root, f"{path}[{e}]")
                        )

                    if submit is None:
                        factor()
                    else:
                        submit(delta, factor)

                out.append(expert_difference_job(self.tk, self.bk, p, e, done, self.layout))
        return out

    def estimate(
        self, report: Callable[..., object], rank_of: Callable[[list[int]], tuple[int, bool]]
    ) -> ExpertExtraction:
        """What :meth:`collect` gives when every expert changed, at ``rank_of(shape)``, from headers alone: the
        packed factors as meta tensors (shape and dtype, no data) and reports without energy or error."""
        res = ExpertExtraction()
        transposed = bool(self.layout and self.layout.peft_transposed)
        nest = moe_layouts.wrapper_depths(self.params)
        for path, p in sorted(self.params.items()):
            shape = [p.shape[1], p.shape[0]] if transposed else list(p.shape)
            r, capped = rank_of(shape)
            A = torch.empty(p.experts * r, shape[1], dtype=self.dtype, device="meta")
            B = torch.empty(shape[0], r * p.experts, dtype=self.dtype, device="meta")
            res.entries += list(zip(lora_keys(p, nest[path]), (A, B), strict=True))
            res.ranks[path] = r
            k = min(self.opts.rank or self.opts.max_rank, self.opts.max_rank)
            method = svd.choose_method((shape[0], shape[1]), k, self.opts.svd)
            res.reports += [report(path, e, shape, r, math.nan, math.nan, method, capped) for e in range(p.experts)]
        return res

    def collect(self, report: Callable[..., object]) -> ExpertExtraction:
        """The factors of every changed parameter, packed, and one report per changed expert
        (``report(path, e, shape, rank, energy, error, method, capped)``)."""
        res = ExpertExtraction()
        transposed = bool(self.layout and self.layout.peft_transposed)
        nest = moe_layouts.wrapper_depths(self.got)
        for path, got in sorted(self.got.items()):
            p = self.params[path]
            r, A, B, errors = pack(p, got, transposed, self.dtype)
            a_key, b_key = lora_keys(p, nest[path])
            res.entries += [(a_key, A), (b_key, B)]
            res.ranks[path] = r
            for e, x in sorted(got.items()):
                shape = [p.shape[1], p.shape[0]] if transposed else list(p.shape)
                res.reports.append(
                    report(path, e, shape, r, x.f.energy_fraction(r), errors[e], x.f.method, x.capped or r > x.rank)
                )
        return res
