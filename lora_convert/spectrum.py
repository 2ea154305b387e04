"""``spectrum TUNED --base BASE``: the singular values of every changed module's ΔW, before choosing a rank.

Per module and per group (attention, MLP, embeddings, experts): the relative error ``‖ΔW − ΔW_k‖_F / ‖ΔW‖_F``
and the kept energy at ranks 1…max, the rank extraction's criterion would give (``svd.pick_rank``, the
same code ``extract`` runs, on the same tensors ``extract`` would factor), and the adapter size it makes.

Streamed as extraction is: one ΔW at a time, built in row blocks by :class:`~.difference.Difference`, its
singular values kept and the matrix dropped.  Exact (``torch.linalg.svdvals``) when the short side is at
most ``EXACT_SPECTRUM_DIM``; past it, the randomized range finder of :mod:`.svd` gives the top ``max``
values, and the errors come from the measured ``‖ΔW‖_F`` (each module says which it used).
Routed experts go through extraction's own per-expert jobs (:class:`~.routes.moe_extract.ExpertPass`), so
their spectra are ``svd.factorise``'s and each parameter's rank is the largest any of its experts needs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import arch, svd
from .difference import Difference, row_blocks
from .io.reader import Checkpoint
from .pipeline import Job, execute
from .progress import progress_bar
from .routes.extract_inputs import SKIP_REASONS, classify
from .routes.extract_options import ExtractOptions, check_layers
from .routes.moe_extract import ExpertPass

# exact singular values up to the short side where extraction goes exact too (svd.EXACT_MAX_DIM), so that
# `spectrum` runs at extraction's speed; --svd exact asks for them at any size
EXACT_SPECTRUM_DIM = svd.EXACT_MAX_DIM
GROUPS = ("attention", "mlp", "embeddings", "experts")
_ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "query", "key", "value"}
FACTOR_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def group_of(module: str, kind: str) -> str:
    """attention | mlp | embeddings | experts, from the tensor's kind and its module path."""
    if kind in ("embedding", "lm_head"):
        return "embeddings"
    rk = arch.report_kind(module)
    if rk == "experts":
        return "experts"
    parts = module.split(".")
    if rk in ("q_proj", "k_proj", "v_proj", "o_proj") or arch.short_name(module) in _ATTENTION:
        return "attention"
    if any(p in ("attn", "self_attn", "attention", "cross_attn") for p in parts[:-1]):
        return "attention"
    return "mlp"


@dataclass
class ModuleSpectrum:
    """One changed module: its singular values (the top ``max_rank``), and the curves they give."""

    module: str
    group: str
    kind: str  # linear | embedding | lm_head
    shape: list[int]  # (out, in) as PEFT's B·A sees it
    method: str  # exact | randomized
    singular_values: list[float]
    error: list[float]  # error[k-1]: ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F
    energy: list[float]  # energy[k-1]: Σ_{i≤k} σ_i² / ‖ΔW‖²_F
    rank: int  # what the criterion picks (as extract does)
    capped: bool
    parameters: int  # rank · (out + in)


@dataclass
class GroupSpectrum:
    """A group's curve at one rank for all its modules: ``sqrt(Σ residual / Σ ‖ΔW‖²)``."""

    group: str
    modules: int
    error: list[float]
    energy: list[float]
    parameters: int  # at the chosen ranks
    ranks: list[int]  # min, max of the chosen ranks


@dataclass
class Spectrum:
    modules: list[ModuleSpectrum]
    groups: list[GroupSpectrum]
    criterion: str
    max_rank: int
    adapter_parameters: int
    adapter_bytes: int  # the factors alone, in --factor-dtype
    skipped: list[dict[str, str]] = field(default_factory=list)
    plot: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _curves(f: svd.Factorisation, top: int) -> tuple[list[float], list[float]]:
    return [f.relative_error(k) for k in range(1, top + 1)], [f.energy_fraction(k) for k in range(1, top + 1)]


def module_spectrum(delta: torch.Tensor, total: float, opts: ExtractOptions) -> svd.Factorisation:
    """The top singular values of one ΔW (2-D, fp32) as a :class:`~.svd.Factorisation` (no vectors): exact up to
    a short side of ``EXACT_SPECTRUM_DIM`` under ``--svd auto`` (always with ``exact``), else the randomized range
    finder's top ``max_rank`` (``--svd randomized``: several times faster on 1024-wide matrices)."""
    top = max(1, min(opts.max_rank, min(delta.shape)))
    d, empty = delta.to(torch.device(opts.device), torch.float32), torch.empty(0)
    if opts.svd == "exact" or (opts.svd == "auto" and min(delta.shape) <= EXACT_SPECTRUM_DIM):
        return svd.Factorisation(empty, torch.linalg.svdvals(d).cpu(), empty, total, "exact", True)
    f = svd.randomized_svd(d, top, seed=opts.seed, total=total)
    return svd.Factorisation(empty, f.S.cpu(), empty, total, "randomized", False)


def spectrum(tk: Checkpoint, bk: Checkpoint, opts: ExtractOptions, *, progress: bool = False) -> Spectrum:
    """Every changed module that ``extract`` with ``opts`` would factor: its spectrum and chosen rank."""
    check_layers(opts.layers, tk)
    experts = ExpertPass(tk, bk, opts, None)
    inputs = classify(tk, bk, opts, experts.keys)
    conv1d = arch.stores_conv1d(tk.config or bk.config)
    mods: list[ModuleSpectrum] = []
    totals: dict[str, float] = {}
    residuals: dict[str, list[float]] = {}
    skipped = list(inputs.skipped)

    def add(m: ModuleSpectrum, f: svd.Factorisation) -> None:
        mods.append(m)
        totals[m.group] = totals.get(m.group, 0.0) + f.total_energy
        res = residuals.setdefault(m.group, [0.0] * opts.max_rank)
        for k in range(opts.max_rank):  # past a module's own size its residual is 0
            res[k] += f.residual_energy(k + 1) if k < len(m.error) else 0.0

    with progress_bar(progress, len(inputs.tasks) + experts.count, "spectrum", unit="modules") as advance:
        # routed experts: extract's own jobs and SVD (svd.factorise), and its rank: the largest any expert of
        # a parameter needs (PEFT gives all experts of one parameter one rank)
        # a parameter's experts at a time, their singular vectors dropped once done: memory stays one parameter's
        by_param: dict[str, list[Job]] = {}
        for job in experts.jobs(advance):
            by_param.setdefault(job.name.rsplit("[", 1)[0], []).append(job)
        transposed = bool(experts.layout and experts.layout.peft_transposed)
        for path, jobs in by_param.items():
            execute(jobs, None, threads=torch.get_num_threads())
            got = experts.got.pop(path, {})
            if not got:
                continue
            p = experts.params[path]
            r = max(x.rank for x in got.values())
            shape = [p.shape[1], p.shape[0]] if transposed else list(p.shape)
            for e, x in sorted(got.items()):
                top = max(1, min(opts.max_rank, min(shape), int(x.f.S.numel())))
                err, energy = _curves(x.f, top)
                values = [float(v) for v in x.f.S[:top]]
                m = ModuleSpectrum(
                    f"{path}[{e}]",
                    "experts",
                    "experts",
                    shape,
                    x.f.method,
                    values,
                    err,
                    energy,
                    r,
                    x.capped or r > x.rank,
                    r * (shape[0] + shape[1]),
                )
                add(m, x.f)
        for task in inputs.tasks:
            advance(1)
            factor = task.kind not in SKIP_REASONS and task.kind != "full"
            d = Difference(tk.rows_of(task.name), bk.rows_of(task.name), keep=factor)
            for s, e in row_blocks(tuple(tk.info(task.name).shape)):
                d.add(s, tk.rows_of(task.name).rows(s, e), bk.rows_of(task.name).rows(s, e))
            delta = d.result()
            if delta is None:
                continue
            if not factor:
                skipped.append({"tensor": task.name, "reason": SKIP_REASONS.get(task.kind, "--embeddings full")})
                continue
            total = float(d.total or 0.0)
            if conv1d and task.kind == "linear":
                delta = delta.T
            f = module_spectrum(delta, total, opts)
            top = max(1, min(opts.max_rank, min(delta.shape)))
            r, capped = svd.pick_rank(
                f, rank=opts.rank, energy=opts.energy, max_error=opts.max_error, max_rank=opts.max_rank
            )
            err, energy = _curves(f, top)
            group = group_of(task.module, task.kind)
            shape = [int(delta.shape[0]), int(delta.shape[1])]
            add(
                ModuleSpectrum(
                    task.module,
                    group,
                    task.kind,
                    shape,
                    f.method,
                    [float(x) for x in f.S[:top]],
                    err,
                    energy,
                    r,
                    capped,
                    r * (shape[0] + shape[1]),
                ),
                f,
            )
    groups = []
    for g in GROUPS:
        members = [m for m in mods if m.group == g]
        if not members:
            continue
        top = max(len(m.error) for m in members)
        tot = totals[g]
        err = [0.0 if tot == 0 else math.sqrt(residuals[g][k] / tot) for k in range(top)]
        groups.append(
            GroupSpectrum(
                g,
                len(members),
                err,
                [1.0 if tot == 0 else max(0.0, 1 - residuals[g][k] / tot) for k in range(top)],
                sum(m.parameters for m in members),
                [min(m.rank for m in members), max(m.rank for m in members)],
            )
        )
    params = sum(m.parameters for m in mods)
    return Spectrum(mods, groups, opts.criterion(), opts.max_rank, params, params * FACTOR_BYTES[opts.dtype], skipped)


# -- the picture ------------------------------------------------------------------------------------

_COLOURS = {"attention": "#1f77b4", "mlp": "#d62728", "embeddings": "#2ca02c", "experts": "#9467bd"}


def svg(spec: Spectrum) -> str:
    """A self-contained SVG chart: relative error vs rank per group (log-scaled error), each group's
    chosen rank (its largest, where ranks differ) marked with a circle.  No plotting library needed."""
    w, h, left, right, top_m, bottom = 640, 400, 60, 130, 30, 45
    pw, ph = w - left - right, h - top_m - bottom
    xmax = max([len(g.error) for g in spec.groups] + [2])
    floor = 1e-4
    vals = [max(e, floor) for g in spec.groups for e in g.error] or [1.0]
    lo = math.floor(math.log10(min(vals)))

    def x(k: float) -> float:
        return left + pw * (k - 1) / max(1, xmax - 1)

    def y(e: float) -> float:
        return top_m + ph * (-math.log10(max(e, floor))) / max(1e-9, -lo)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">',
        f'<rect x="0" y="0" width="{w}" height="{h}" fill="white"/>',
        f'<text x="{w / 2:.0f}" y="18" text-anchor="middle" font-size="14">'
        f"relative error vs rank ({_esc(spec.criterion)})</text>",
        f'<line x1="{left}" y1="{top_m + ph}" x2="{left + pw}" y2="{top_m + ph}" stroke="black"/>',
        f'<line x1="{left}" y1="{top_m}" x2="{left}" y2="{top_m + ph}" stroke="black"/>',
        f'<text x="{left + pw / 2:.0f}" y="{h - 8}" text-anchor="middle" font-size="12">rank</text>',
    ]
    for p in range(lo, 1):
        yy = y(10.0**p)
        out.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end" font-size="10">1e{p}</text>')
        out.append(f'<line x1="{left}" y1="{yy:.1f}" x2="{left + pw}" y2="{yy:.1f}" stroke="#ddd"/>')
    for k in sorted({1, xmax, *range(0, xmax + 1, max(1, xmax // 8))} - {0}):
        out.append(f'<text x="{x(k):.1f}" y="{top_m + ph + 15}" text-anchor="middle" font-size="10">{k}</text>')
    for i, g in enumerate(spec.groups):
        c = _COLOURS.get(g.group, "black")
        pts = " ".join(f"{x(k + 1):.1f},{y(e):.1f}" for k, e in enumerate(g.error))
        out.append(f'<polyline class="group" data-group="{g.group}" fill="none" stroke="{c}" points="{pts}"/>')
        r = min(g.ranks[1], len(g.error))
        out.append(
            f'<circle class="chosen" data-group="{g.group}" data-rank="{r}" cx="{x(r):.1f}" '
            f'cy="{y(g.error[r - 1]):.1f}" r="4" fill="{c}"/>'
        )
        out.append(
            f'<text x="{left + pw + 8}" y="{top_m + 14 + 16 * i}" font-size="12" fill="{c}">'
            f"{g.group} (r={g.ranks[0]}{'' if g.ranks[0] == g.ranks[1] else f'–{g.ranks[1]}'})</text>"
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
