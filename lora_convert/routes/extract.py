"""plain (tuned or merged) + base -> adapter: a PEFT LoRA adapter with ``ΔW ≈ B·A`` by SVD.

Two passes through the pipeline.  The planner reads headers only and declares the first
(:class:`ExtractionPass`, on ``Plan.prepass``), which the assembly runs: one job per changed tensor, its row
blocks read ahead from both files (the reader stage), ΔW formed in fp32 (:mod:`..difference`), factored
(:mod:`..svd`) and dropped, keeping only the thin factors.  The second writes the adapter the first put
together: the factors, and tensors saved whole, streamed from the tuned checkpoint.  ``--dry-run`` runs
neither: it describes :meth:`ExtractionPass.estimate`, the adapter as far as headers tell.

GPT-2-style ``Conv1D`` weights are stored (in, out): their ΔW is factored in the (out, in) view that
PEFT's ``B·A`` describes, and ``fan_in_fan_out`` is set.

Adapter layout (what ``PeftModel.from_pretrained(base, OUT)`` loads with no missing or unexpected keys):

* ``target_modules`` is one regex that fullmatches exactly the modules we factored;
* ``lora_alpha == r`` for every module (``alpha_pattern`` mirrors ``rank_pattern``), so scaling is 1;
* ``rank_pattern`` keys are escaped full module paths, matching one module each under PEFT's
  ``re.match(rf"(.*\\.)?({key})$", name)``;
* input embeddings get ``lora_embedding_A`` (r, vocab) / ``lora_embedding_B`` (dim, r) with
  ``ΔW = (B·A)ᵀ``; ``lm_head`` an ordinary ``lora_A``/``lora_B``; ``--embeddings full`` and a
  resized vocabulary save the tuned matrix whole through ``modules_to_save``;
* with tied embeddings (no ``lm_head.weight`` stored), ``ensure_weight_tying`` makes PEFT apply the
  embedding's delta to the output head too, as in the tuned model;
* when the bias of a factored module changed, ``bias="lora_only"`` and ``<module>.base_layer.bias`` for
  every factored module that has a bias (what PEFT itself saves in that mode).
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import arch, moe_layouts, svd
from ..config import AdapterConfig
from ..dialects.peft_keys import PEFT_PREFIX, Role, format_key
from ..difference import Difference, row_blocks
from ..errors import RouteError, option
from ..io.reader import Checkpoint
from ..pipeline import Buffers, Job, Read
from .common import copy_job
from .extract_inputs import SKIP_REASONS, Inputs, Task, classify
from .extract_options import ExtractOptions, check_layers, option_names
from .extract_options import parse_layers as parse_layers  # (re-exported: older imports)
from .factoring import Factoring, plan_threads
from .moe_extract import ExpertExtraction, ExpertPass
from .plan import Estimate, Plan, Request
from .report import TextTable

FP32 = torch.float32
FACTOR_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # ExtractOptions.dtype


# -- the report -----------------------------------------------------------------------------------


@dataclass
class ModuleReport:
    module: str
    kind: str  # linear | embedding | lm_head
    shape: list[int]
    rank: int
    energy: float  # fraction of ‖ΔW‖²_F kept
    error: float  # ‖ΔW − B·A‖_F / ‖ΔW‖_F, measured on the factors written
    method: str  # exact | randomized
    capped: bool = False  # --max-rank (or the matrix size) stopped short of the target
    seconds: float = 0.0
    expert: int | None = None  # kind "experts": which expert of the fused parameter ``module``

    @property
    def label(self) -> str:
        return self.module if self.expert is None else f"{self.module}[{self.expert}]"


@dataclass
class Extraction:
    """What the SVD route did, module by module."""

    modules: list[ModuleReport]
    skipped: list[dict[str, str]]  # {"tensor":..., "reason":...}: changed but not in the adapter
    saved_whole: list[dict[str, str]]  # {"module":..., "reason":...}: in modules_to_save
    adapter_parameters: int
    worst_error: float
    mean_error: float
    options: dict[str, Any]
    carried_biases: list[str] = field(default_factory=list)  # <module>.bias saved as base_layer.bias (lora_only)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown_table(self) -> str:
        rows = ["| module | shape | rank | energy kept | rel. error | method |", "|---|---|---|---|---|---|"]
        for m in self.modules:
            rows.append(
                f"| `{m.label}` | {m.shape[0]}×{m.shape[1]} | {m.rank}{' (capped)' if m.capped else ''} | "
                f"{m.energy:.6f} | {m.error:.3e} | {m.method} |"
            )
        for s in self.saved_whole:
            rows.append(f"| `{s['module']}` | whole | – | 1 | 0 | modules_to_save: {s['reason']} |")
        for b in self.carried_biases:
            rows.append(f"| `{b}` | whole | – | 1 | 0 | bias of a LoRA module (bias=lora_only) |")
        for s in self.skipped:
            rows.append(f"| `{s['tensor']}` | – | – | 0 | 1 | skipped: {s['reason']} |")
        return "\n".join(rows)

    def tables(self) -> list[TextTable]:
        """The terminal's table: one row per factored module (``*``: its rank was capped)."""
        rows = [
            [m.label, f"{m.shape[0]}x{m.shape[1]}", f"{m.rank}{'*' if m.capped else ''}"]
            + [f"{m.energy:.6f}", f"{m.error:.3e}", m.method]
            for m in self.modules
        ]
        head = ["module", "shape", "rank", "energy kept", "rel. error", "svd"]
        return [TextTable("extracted modules", head, rows)]

    def notes(self) -> list[str]:
        return []

    def summary_lines(self, total_bytes: int) -> list[str]:
        """The totals, printed under the table and in the model card."""
        lines = [
            f"{len(self.modules)} modules factored; adapter parameters: {self.adapter_parameters:,}; "
            f"size on disk: {total_bytes:,} bytes",
            f"relative Frobenius error: worst {self.worst_error:.3e}, mean {self.mean_error:.3e}",
        ]
        if self.saved_whole:
            lines.append("saved whole (modules_to_save): " + ", ".join(s["module"] for s in self.saved_whole))
        if self.carried_biases:
            lines.append(
                f"{len(self.carried_biases)} bias(es) of LoRA modules saved whole (bias='lora_only'), "
                "since some changed"
            )
        if self.skipped:
            lines.append(
                f"{len(self.skipped)} changed tensor(s) not in the adapter: "
                + "; ".join(f"{s['tensor']} ({s['reason']})" for s in self.skipped[:12])
                + (" …" if len(self.skipped) > 12 else "")
            )
        return lines


# -- pass 1: differences and factors ---------------------------------------------------------------


@dataclass
class _Factored:
    """The outcome of one task: None (unchanged), or changed; factors when it was factored."""

    factors: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, A) as written
    report: ModuleReport | None = None


def _difference_job(
    tk: Checkpoint, bk: Checkpoint, name: str, keep: bool, done: Any, factoring: Factoring | None = None
) -> Job:
    """A job that forms ΔW of ``name`` from read-ahead blocks and hands it, with ‖ΔW‖²_F when it was kept, to
    ``done`` (None: unchanged).  A kept ΔW is formed in one of ``factoring``'s buffers (reused from task to task),
    which ``done`` hands on to be factored."""
    blocks_ = row_blocks(tuple(tk.info(name).shape))

    def reads() -> list[Read]:
        return [r for s, e in blocks_ for r in (Read(tk, name, s, e), Read(bk, name, s, e))]

    def run(buf: Buffers) -> Iterator[torch.Tensor]:
        info = tk.info(name)
        rows = info.shape[0] if info.shape else 1
        shape = (rows, max(1, info.numel // max(1, rows)))
        taken: list[torch.Tensor] = []

        def out() -> torch.Tensor:
            if factoring is None:
                return buf.scratch("delta", shape, FP32)
            taken.append(factoring.delta(shape))
            return taken[-1]

        d = Difference(tk.rows_of(name), bk.rows_of(name), keep=keep, out=out)
        for s, e in blocks_:
            a = buf.read(Read(tk, name, s, e))
            b = buf.read(Read(bk, name, s, e))
            d.add(s, a, b)
            buf.give_back(a)
            buf.give_back(b)
        delta = d.result()
        if delta is None and factoring is not None:
            for t in taken:  # differing bits, equal values (-0.0 against 0.0): nothing to factor
                factoring.give_back(t)
        done(delta, d.total)
        return
        yield  # a generator that writes nothing

    return Job(name, FP32, (), run, "factor", reads=reads, writes=False)


def _factor(
    delta: torch.Tensor,
    task: Task,
    opts: ExtractOptions,
    conv1d: bool,
    total: float | None,
    where: tuple[Path | str | None, str],
) -> _Factored:
    t1 = time.perf_counter()
    if conv1d:  # GPT-2 Conv1D stores (in, out): factor the (out, in) view PEFT's B·A describes
        delta, total = delta.T, None  # its norm is summed over the transposed view's own blocks
    delta = delta.to(torch.device(opts.device))
    k = min(opts.rank if opts.rank is not None else opts.max_rank, opts.max_rank)
    f = svd.factorise(delta, k, svd=opts.svd, seed=opts.seed, total=total)
    r, capped = svd.pick_rank(f, rank=opts.rank, energy=opts.energy, max_error=opts.max_error, max_rank=opts.max_rank)
    B, A = f.factors(r)
    if FACTOR_TORCH_DTYPES[opts.dtype] != FP32:  # measure what is written: rounded factors
        B, A = B.to(FACTOR_TORCH_DTYPES[opts.dtype]), A.to(FACTOR_TORCH_DTYPES[opts.dtype])
    svd.check_factors(B, A, where, opts.dtype)
    err = _residual_error(delta, B.to(FP32), A.to(FP32), f.total_energy)
    rep = ModuleReport(task.module, task.kind, list(delta.shape), r, f.energy_fraction(r), err, f.method, capped)
    rep.seconds = round(time.perf_counter() - t1, 4)
    return _Factored((B.cpu(), A.cpu()), rep)


def _residual_error(delta: torch.Tensor, B: torch.Tensor, A: torch.Tensor, total: float) -> float:
    """‖ΔW − B·A‖_F / ‖ΔW‖_F, in row blocks (measured, not estimated)."""
    if total == 0:
        return 0.0
    acc = 0.0
    step = max(1, (1 << 20) // max(1, delta.shape[1]))
    r = torch.empty((min(step, delta.shape[0]), delta.shape[1]), dtype=FP32, device=delta.device)  # reused
    for i in range(0, delta.shape[0], step):
        ri = torch.addmm(delta[i : i + step], B[i : i + step], A, alpha=-1, out=r[: min(step, delta.shape[0] - i)])
        acc += float(torch.sum(ri.mul_(ri)))  # fp32 cascade sum per block, fp64 across blocks (svd.frobenius_sq)
    return (acc / total) ** 0.5


def _planned_rank(shape: list[int], opts: ExtractOptions) -> tuple[int, bool]:
    """The rank the SVD pass will keep for a matrix of ``shape`` as far as headers tell: ``--rank`` (capped by
    ``--max-rank`` and the matrix) exactly; for the energy and error criteria the most it can be."""
    cap = max(1, min(opts.max_rank, *shape))
    if opts.rank is not None:
        return min(opts.rank, cap), opts.rank > cap
    return cap, False


class ExtractionPass:
    """The first pass, declared on the plan and run by the assembly: one job per changed tensor (and expert)
    forms ΔW from read-ahead blocks and factors it; :meth:`plan` then puts the adapter together from what
    changed.  :meth:`estimate` is the same adapter from headers alone (``--dry-run``)."""

    label, unit = "extracting", "items"

    def __init__(self, req: Request, opts: ExtractOptions, inputs: Inputs, experts: ExpertPass) -> None:
        assert req.base is not None
        self.req, self.opts, self.inputs, self.experts = req, opts, inputs, experts
        workers, self._threads = plan_threads()
        self.factoring = Factoring(workers)  # the SVDs, beside the pipeline's worker (routes/factoring.py)
        self.tk, self.bk = req.source, req.base
        self.outcomes: dict[int, _Factored] = {}  # task index -> outcome (changed tasks only)
        self.others: dict[int, bool] = {}  # index in inputs.others -> changed

    def size(self) -> int:
        return len(self.inputs.tasks) + len(self.inputs.others) + self.experts.count

    def threads(self) -> int | None:
        """Each factorisation's intra-op threads: the cores shared among the factorising threads."""
        return self._threads

    def finish(self) -> None:
        """Wait for the factorisations still running (the pipeline calls this once every job ran, while its
        thread count still holds: the factors depend on it)."""
        self.factoring.finish()

    def jobs(self, advance: Callable[[int], None]) -> list[Job]:
        tk, bk, opts, inputs = self.tk, self.bk, self.opts, self.inputs
        conv1d_model = arch.stores_conv1d(tk.config or bk.config)
        jobs = self.experts.jobs(advance, self.factoring.submit)
        for i, task in enumerate(inputs.tasks):
            factor = task.kind not in SKIP_REASONS and task.kind != "full"

            def done(
                delta: torch.Tensor | None, total: float | None, i: int = i, task: Task = task, factor: bool = factor
            ) -> None:
                advance(1)
                if delta is None:
                    return
                if not factor:
                    self.outcomes[i] = _Factored()
                    return
                conv1d = task.kind == "linear" and conv1d_model
                where = (tk.info(task.name).file, task.name)

                def factor_it(delta: torch.Tensor = delta) -> None:
                    self.outcomes[i] = _factor(delta, task, opts, conv1d, total, where)

                self.factoring.submit(delta, factor_it)

            jobs.append(_difference_job(tk, bk, task.name, factor, done, self.factoring if factor else None))
        for i, name in enumerate(inputs.others):
            if tk.info(name).shape != bk.info(name).shape:
                self.others[i] = True
                advance(1)
                continue

            def other_done(delta: torch.Tensor | None, total: float | None, i: int = i) -> None:
                advance(1)
                self.others[i] = delta is not None

            jobs.append(_difference_job(tk, bk, name, False, other_done))
        return jobs

    def weights(self, jobs: list[Job]) -> list[int]:
        """Each job's matrix size in elements (what its SVD and reads cost), in the order of ``jobs``: for
        ``extract --ray``, which splits the jobs into groups of about equal size."""
        sizes = {
            f"{path}[{e}]": p.shape[0] * p.shape[1] for path, p in self.experts.params.items() for e in range(p.experts)
        }
        return [sizes[j.name] if j.name in sizes else self.tk.info(j.name).numel for j in jobs]

    def outcome(self) -> dict[str, Any]:
        """What the jobs run so far found (factors and reports): a Ray task of ``extract --ray`` runs a group of the
        jobs and returns this to the driver, whose :meth:`absorb` gathers every group's."""
        self.finish()
        return {"outcomes": self.outcomes, "others": self.others, "experts": self.experts.got}

    def absorb(self, got: dict[str, Any]) -> None:
        """Add a group's :meth:`outcome` (indices are the same on every node: the same inputs, planned alike)."""
        self.outcomes.update(got["outcomes"])
        self.others.update(got["others"])
        for path, experts in got["experts"].items():
            self.experts.got.setdefault(path, {}).update(experts)

    def plan(self) -> Plan:
        """The adapter of what the pass found changed."""
        self.finish()
        out = _collect(self.tk, self.inputs, self.outcomes)
        moe = self.experts.collect(_expert_report)
        changed_others = [name for i, name in enumerate(self.inputs.others) if self.others.get(i)]
        return _adapter_plan(self.req, self.opts, self.inputs, out, moe, changed_others)

    def estimate(self) -> Estimate:
        """The adapter if every tensor to factor or save whole changed and nothing else did, at the ranks
        :func:`_planned_rank` gives: factors as meta tensors (shape and dtype, no data)."""
        opts, dtype = self.opts, FACTOR_TORCH_DTYPES[self.opts.dtype]
        conv1d_model = arch.stores_conv1d(self.tk.config or self.bk.config)
        outcomes: dict[int, _Factored] = {}
        for i, task in enumerate(self.inputs.tasks):
            if task.kind in SKIP_REASONS:
                continue  # left out whether it changed or not: a warning only the pass can give
            if task.kind == "full":
                outcomes[i] = _Factored()
                continue
            info = self.tk.info(task.name)
            shape = [info.shape[1], info.shape[0]] if task.kind == "linear" and conv1d_model else list(info.shape)
            r, capped = _planned_rank(shape, opts)
            B = torch.empty(shape[0], r, dtype=dtype, device="meta")
            A = torch.empty(r, shape[1], dtype=dtype, device="meta")
            method = svd.choose_method((shape[0], shape[1]), min(opts.rank or opts.max_rank, opts.max_rank), opts.svd)
            rep = ModuleReport(task.module, task.kind, shape, r, math.nan, math.nan, method, capped)
            outcomes[i] = _Factored((B, A), rep)
        out = _collect(self.tk, self.inputs, outcomes)
        moe = self.experts.estimate(_expert_report, lambda shape: _planned_rank(shape, opts))
        plan = _adapter_plan(self.req, opts, self.inputs, out, moe, [])
        modules = [
            {
                "adapter": self.req.ref,
                "module": m.label,
                "kind": m.kind,
                "rank": m.rank if opts.rank is not None else None,
                "scaling": 1.0,
                "weight": 1.0,
            }
            for m in out.reports + moe.reports
        ]
        return Estimate(plan, self._assumptions(len(out.reports) + len(moe.reports)), modules, opts.rank is not None)

    def _assumptions(self, factored: int) -> list[str]:
        opts = self.opts
        said = [
            "sizes come from the plan, before the SVD pass (the only step that reads the tensors): every one of "
            f"the {factored} matrices to factor (and each module to save whole) is counted as changed; the real "
            "run leaves out those equal to the base"
        ]
        if self.inputs.others:
            said.append(
                f"{len(self.inputs.others)} tensor(s) a LoRA cannot carry (biases, norms) are counted as unchanged: "
                "a changed bias of a factored module adds base_layer.bias tensors"
                + (", and --save-other saves changed modules whole" if opts.save_other else "")
            )
        if opts.rank is None:
            said.append(
                f"ranks are unknown until the SVD pass runs: the {opts.criterion()} criterion picks each one; "
                f"bytes are counted at the most it can pick (--max-rank {opts.max_rank}, or the matrix's size)"
            )
        return said


def _expert_report(
    path: str, e: int, shape: list[int], rank: int, energy: float, error: float, method: str, capped: bool
) -> ModuleReport:
    return ModuleReport(path, "experts", shape, rank, energy, error, method, capped, expert=e)


# -- pass 2: the adapter ------------------------------------------------------------------------------


@dataclass
class _Adapter:
    """The adapter being put together: output tensors in order (factors in memory, or tensors of the
    tuned checkpoint copied whole), and what the config and the report say about them."""

    tk: Checkpoint
    entries: list[tuple[str, torch.Tensor | str]] = field(default_factory=list)
    reports: list[ModuleReport] = field(default_factory=list)
    lora_modules: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    saved_whole: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    carried: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    embed_lora: bool = False
    expert_ranks: dict[str, int] = field(default_factory=dict)  # target_parameters path -> rank per expert

    def save_whole(self, module: str, reason: str, keys: list[str]) -> None:
        self.modules_to_save.append(module)
        self.saved_whole.append({"module": module, "reason": reason})
        self.entries += [(f"{PEFT_PREFIX}{k}", k) for k in keys]

    def add_factors(self, task: Task, got: _Factored, tied: bool) -> None:
        assert got.factors is not None and got.report is not None
        B, A = got.factors
        if task.kind == "embedding":  # ΔW (vocab, dim) = (B_e·A_e)ᵀ: B_e = Aᵀ (dim, r), A_e = Bᵀ (r, vocab)
            self.entries += [
                (format_key(task.module, Role.EMBED_A), B.T.contiguous()),
                (format_key(task.module, Role.EMBED_B), A.T.contiguous()),
            ]
            token_table = not arch.is_position_embedding(task.module)
            self.embed_lora = self.embed_lora or token_table
            if tied and token_table:  # the head shares the weight, so it shares the delta: lora_A = A, lora_B = B
                self.entries += [(format_key("lm_head", Role.LORA_A), A), (format_key("lm_head", Role.LORA_B), B)]
        else:
            self.entries += [(format_key(task.module, Role.LORA_A), A), (format_key(task.module, Role.LORA_B), B)]
        self.lora_modules.append(task.module)
        self.reports.append(got.report)

    def parameters(self) -> int:
        return sum(v.numel() if isinstance(v, torch.Tensor) else self.tk.info(v).numel for _, v in self.entries)

    def jobs(self) -> list[Job]:
        return [
            copy_job(self.tk, v, name, op="save") if isinstance(v, str) else _tensor_job(name, v)
            for name, v in self.entries
        ]


def _tensor_job(name: str, t: torch.Tensor) -> Job:
    def blocks(buf: Buffers) -> Iterator[torch.Tensor]:
        yield t

    return Job(name, t.dtype, tuple(t.shape), blocks, "lora")


def _collect(tk: Checkpoint, inputs: Inputs, outcomes: dict[int, _Factored]) -> _Adapter:
    out = _Adapter(tk, skipped=list(inputs.skipped))
    for module, reason in inputs.whole:
        out.save_whole(module, reason, [f"{module}.weight"])
        if inputs.tied:
            out.warnings.append("tied embeddings with a resized vocabulary: the output head follows the embedding")
    for i, task in enumerate(inputs.tasks):
        got = outcomes.get(i)
        if got is None:
            continue
        if task.kind in SKIP_REASONS:
            out.skipped.append({"tensor": task.name, "reason": SKIP_REASONS[task.kind]})
        elif task.kind == "full":
            out.save_whole(task.module, "--embeddings full", [task.name])
        else:
            out.add_factors(task, got, inputs.tied)
    return out


def _others(out: _Adapter, changed: list[str], save_other: bool) -> None:
    """Changed tensors a LoRA cannot carry.  A changed bias of a factored module travels the way PEFT
    saves it with bias="lora_only": ``<module>.base_layer.bias`` for every LoRA module that has a bias."""
    lora_set = set(out.lora_modules)
    carry_bias = any(n.endswith(".bias") and arch.module_of(n) in lora_set for n in changed)
    if carry_bias:
        for module in out.lora_modules:
            if f"{module}.bias" in out.tk.tensors:
                out.entries.append((f"{PEFT_PREFIX}{module}.base_layer.bias", f"{module}.bias"))
                out.carried.append(f"{module}.bias")
    for name in changed:
        module = arch.module_of(name)
        if carry_bias and name.endswith(".bias") and module in lora_set:
            continue
        if save_other and module not in lora_set and module not in out.modules_to_save:
            out.save_whole(
                module,
                "changed tensor a LoRA cannot carry (--save-other)",
                [k for k in out.tk.tensors if arch.module_of(k) == module],
            )
        elif not (save_other and module in out.modules_to_save):
            out.skipped.append(
                {
                    "tensor": name,
                    "reason": "a LoRA cannot carry it (1-D/norm/bias); pass --save-other to save its module whole",
                }
            )


def _adapter_config(out: _Adapter, tied: bool, base_ref: str, model_config: dict[str, Any] | None) -> dict[str, Any]:
    ensure_tying = tied and (
        out.embed_lora
        or any(s["module"] in out.modules_to_save for s in out.saved_whole if s["reason"] == "--embeddings full")
    )
    if ensure_tying:
        out.warnings.append("tied embeddings: ensure_weight_tying is set so the output head gets the same change")
    ranks = Counter(r.rank for r in out.reports)
    r0 = sorted(ranks.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    rank_pattern = {re.escape(r.module): r.rank for r in out.reports if r.rank != r0}  # experts: <module>.<param>
    targets = list(out.lora_modules)
    if tied and out.embed_lora:  # PEFT ties the head's adapter to the embedding's when both are targeted
        targets.append("lm_head")
    raw: dict[str, Any] = {"lora_dropout": 0.0, "inference_mode": True, "ensure_weight_tying": bool(ensure_tying)}
    if out.expert_ranks:
        raw["target_parameters"] = sorted(out.expert_ranks)  # full paths: each matches its parameter alone
    return AdapterConfig(
        r=r0,
        lora_alpha=r0,
        rank_pattern=rank_pattern,
        alpha_pattern=dict(rank_pattern),
        target_modules=_target_modules(targets),
        modules_to_save=out.modules_to_save or None,
        fan_in_fan_out=arch.stores_conv1d(model_config) and any(r.kind == "linear" for r in out.reports),
        bias="lora_only" if out.carried else "none",
        base_model_name_or_path=base_ref,
        task_type=arch.task_type(model_config),
        raw=raw,
    ).to_dict()


def _target_modules(modules: list[str]) -> str | list[str]:
    """target_modules for the modules factored: per-expert modules by a pattern per layer and projection
    that PEFT's conversion of per-expert adapters recognises, the rest by :func:`target_regex`."""
    experts = sorted(
        {moe_layouts.per_expert_regex(h[0], h[2]) for m in modules if (h := moe_layouts.split_expert_module(m))}
    )
    plain = [m for m in modules if moe_layouts.split_expert_module(m) is None]
    if not experts:
        return target_regex(plain) if plain else []
    return "|".join(([f"(?:{target_regex(plain)})"] if plain else []) + [f"(?:^(?:{'|'.join(experts)})$)"])


def target_regex(modules: list[str]) -> str:
    """One regex fullmatching exactly ``modules``: paths grouped by their layer-index template."""
    groups: dict[tuple[str, str], list[int]] = {}
    plain: list[str] = []
    for m in modules:
        mm = arch.LAYER_INDEX.search(f".{m}.")
        if mm is None:
            plain.append(re.escape(m))
            continue
        start, end = mm.start(1) - 1, mm.end(1) - 1  # positions in m (we prefixed a dot)
        groups.setdefault((m[:start], m[end:]), []).append(int(m[start:end]))
    parts = []
    for (pre, post), idx in groups.items():
        alts = "|".join(str(i) for i in sorted(set(idx)))
        parts.append(f"{re.escape(pre)}(?:{alts}){re.escape(post)}")
    parts += plain
    return "^(?:" + "|".join(parts) + ")$" if len(parts) > 1 else "^" + parts[0] + "$"


def plan_extract(req: Request) -> Plan:
    """Sort the tuned checkpoint's tensors from the headers and declare the SVD pass (:class:`ExtractionPass`):
    the assembly runs it, and writes the PEFT adapter it puts together."""
    tk, bk, opts = req.source, req.base, req.extract
    assert bk is not None and opts is not None and req.base_ref is not None
    check_layers(opts.layers, tk)
    experts = ExpertPass(tk, bk, opts, req.moe_layout)
    inputs = classify(tk, bk, opts, experts.keys)
    return Plan("adapter", [], prepass=ExtractionPass(req, opts, inputs, experts))


def _adapter_plan(
    req: Request, opts: ExtractOptions, inputs: Inputs, out: _Adapter, moe: ExpertExtraction, changed_others: list[str]
) -> Plan:
    """The adapter's plan: factors, tensors saved whole, config, report and card."""
    tk = req.source
    out.entries += moe.entries
    out.reports += moe.reports
    out.expert_ranks = moe.ranks
    _others(out, changed_others, opts.save_other)
    if not out.lora_modules and not out.modules_to_save and not out.expert_ranks:
        raise RouteError(
            "no changed tensor went into the adapter"
            if out.skipped
            else "the tuned checkpoint equals the base: nothing to extract",
            path=tk.root,
            hint="see the skipped tensors with --json" if out.skipped else None,
        )
    if not out.lora_modules and not out.expert_ranks:
        raise RouteError(
            "no tensor was factored (only whole modules to save): PEFT needs at least one LoRA module",
            path=tk.root,
            hint=f"widen {option_names('include', 'layers')} or use {option('embeddings', 'lora')}",
        )
    model_config = tk.config or (req.base.config if req.base is not None else None)
    config = _adapter_config(out, inputs.tied, str(req.base_ref), model_config)
    for reason, n in Counter(s["reason"] for s in out.skipped).items():
        out.warnings.append(f"{n} changed tensor(s) left out: {reason}")
    errors = [r.error for r in out.reports]
    report = Extraction(
        out.reports,
        out.skipped,
        out.saved_whole,
        out.parameters(),
        max(errors),
        sum(errors) / len(errors),
        asdict(opts),
        out.carried,
    )
    ops = {
        "lora": len(out.reports) - len(moe.reports),
        **({"experts": len(moe.reports)} if moe.reports else {}),
        "modules_to_save": len(out.modules_to_save),
        "skipped": len(out.skipped),
        **({"lora_biases": len(out.carried)} if out.carried else {}),
    }
    head = (
        f"extracted from `{req.ref}` minus base `{req.base_ref}` by SVD "
        f"({opts.criterion()}, max rank {opts.max_rank}, svd {opts.svd})"
    )
    return Plan(
        "adapter",
        out.jobs(),
        stem="adapter_model",
        sharded=False,
        tokenizer_from=[tk.root],
        adapter_config=config,
        warnings=out.warnings,
        base_model=str(req.base_ref),
        card_lines=lambda total: [head, *report.summary_lines(total)],
        card_tables=[report.markdown_table()],
        card_config=tk.config,
        report=report,
        op_counts=ops,
    )
