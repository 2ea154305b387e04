"""merged + adapter -> base (unmerge): ``W = W_merged − Σ wᵢ·ΔWᵢ``, the merge run backwards.

The route is the merge planner with every weight negated: the same ops, the same fp32 tile, rounded
once.  What it cannot give back is what the merge's rounding took: ``W_merged`` holds ``W + ΔW``
rounded to its dtype, so the result is the base only up to half an ulp of the merged value, plus half
an ulp of its own rounding, plus the fp32 arithmetic of the two passes (:class:`Unmerge` reports that
bound per tensor).  A merge written by PEFT rounds once per adapter (and rounds an embedding's ΔW
before adding it), so unmerging one of those can be off by one more ulp per such rounding.

Refused, with the reason: DoRA (the merged rows have norm exactly ``m``, so every ``c·W_merged − ΔW``
re-merges to the same checkpoint: the base is underdetermined without the norms PEFT caches in
memory), and ``modules_to_save``, saved layers and trainable tokens (the merge replaced those base
values; the merged model no longer holds them).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .. import arch
from ..closeness import absmax, spacing
from ..errors import RouteError, UnsupportedError, option, spelled
from ..io.writer import PlannedTensor
from ..pipeline import execute
from ..stack import AdapterInput
from .merge_engine import MergeOps, merge_ops, tensor_job
from .plan import Plan, Request, output_dtype
from .report import TextTable

FP32_ARITH = 2.0**-23  # two fp32 passes (merge and unmerge), half an fp32 ulp each, per term summed


@dataclass
class _Seen:
    """The magnitudes one tensor's blocks showed: max |W_merged| and max |result|."""

    dtype_in: torch.dtype
    dtype_out: torch.dtype
    terms: int  # rank summed over the adapters: the fp32 sums per element
    merged: float = 0.0
    result: float = 0.0

    def bound(self) -> float:
        """Half an ulp of each rounding, and the fp32 sums of both passes on terms no larger than
        |W_merged| + |ΔW| ≤ 2·|W_merged| + |result|."""
        rounding = (spacing(self.merged, self.dtype_in) + spacing(self.result, self.dtype_out)) / 2
        return rounding + (self.terms + 2) * FP32_ARITH * (2 * self.merged + self.result)


@dataclass
class Unmerge:
    """How far the unmerged tensors may be from the true base: per tensor, ``|W_result − W_base| ≤ bound``
    element-wise, when MERGED was written by a merge that rounds once (lora-convert's)."""

    seen: dict[str, _Seen] = field(default_factory=dict)

    def observer(self, key: str, dtype_in: torch.dtype, dtype_out: torch.dtype, terms: int) -> Any:
        s = self.seen[key] = _Seen(dtype_in, dtype_out, terms)

        def see(w: torch.Tensor, out: torch.Tensor) -> None:
            s.merged = max(s.merged, absmax(w))
            s.result = max(s.result, absmax(out))

        return see

    def bounds(self) -> dict[str, float]:
        return {k: s.bound() for k, s in self.seen.items()}

    def worst(self) -> tuple[str | None, float]:
        b = self.bounds()
        if not b:
            return None, 0.0
        key = max(b, key=lambda k: b[k])
        return key, b[key]

    def to_dict(self) -> dict[str, Any]:
        key, worst = self.worst()
        return {"unmerged_tensors": len(self.seen), "worst_bound": worst, "worst_tensor": key, "bounds": self.bounds()}

    def tables(self) -> list[TextTable]:
        return []

    def summary_lines(self, total_bytes: int) -> list[str]:
        return []

    def notes(self) -> list[str]:
        """The bound, under the ``wrote`` line and in the model card."""
        key, worst = self.worst()
        return [
            f"{len(self.seen)} tensors unmerged; the result is the base only up to rounding: every element within "
            f"{worst:.3g} of it (worst tensor: {key}; half an ulp of the merged value + half an ulp of the result "
            "+ fp32 arithmetic, if MERGED was rounded once from fp32; a PEFT merge in half precision can add "
            "one ulp per adapter)"
        ]


def plan_unmerge(req: Request) -> Plan:
    """A plain (merged) source minus the weighted ΔW of its adapters; the other tensors copied."""
    if not req.stack:
        raise RouteError(
            "holds no LoRA tensors (a full model: base, merged or fine-tuned); nothing to convert to base",
            path=req.source.root,
            hint=f"to unmerge an adapter from it, pass {option('adapter', 'ADAPTER')}",
        )
    for inp in req.stack:
        _refuse(inp)
    minus = replace(req, stack=[replace(inp, weight=-inp.weight) for inp in req.stack])
    mo = merge_ops(minus)
    if mo.qbase is not None:
        raise UnsupportedError(
            "the merged model is quantized: its weights hold the quantization error besides ΔW",
            path=req.source.root,
            hint="unmerge from the unquantized merge",
        )
    _restore_saved_layers(mo, req.stack)
    _keep_tied(mo)
    dtype = output_dtype(req.dtype)
    _retie(mo, req, dtype)
    report = Unmerge()
    jobs = []
    for k in mo.keys:
        o = mo.ops[k]
        observe = None
        if o.loras:
            info = mo.base.ck.info(mo.base.map[k])
            out_dtype = dtype if dtype is not None else info.dtype
            observe = report.observer(k, info.dtype, out_dtype, sum(lo.module.rank for lo in o.loras))
        jobs.append(tensor_job(k, o, mo.base, dtype, mo.conv1d, observe))
    took = ", ".join(f"`{inp.label}` with weight {inp.weight:g}" for inp in req.stack)
    return Plan(
        "base",
        jobs,
        carry_from=req.source.root,
        config_changes=mo.config_changes,
        warnings=mo.warnings,
        card_lines=lambda total: [f"`{req.ref}` minus {took}", *report.notes(), *mo.warnings],
        report=report,
        op_counts={"unmerge": len(report.seen), "copy": len(jobs) - len(report.seen)},
    )


def _restore_saved_layers(mo: MergeOps, stack: list[AdapterInput]) -> None:
    """An embedding PEFT saved whole beside its LoRA (``save_embedding_layers``) *is* the base layer the
    merge started from: the unmerged tensor is that copy, exactly, with nothing subtracted."""
    saved = {(str(inp.ck.root), inp.inventory.replace[inp.name][k]) for inp in stack for k in _saved(inp)}
    for o in mo.ops.values():
        if o.replaced and (str(o.source[0].root), o.source[1]) in saved:
            o.loras.clear()
            o.bias_adds.clear()


def _saved(inp: AdapterInput) -> set[str]:
    return inp.inventory.saved_layers.get(inp.name, set()) & set(inp.inventory.replace.get(inp.name, {}))


def _keep_tied(mo: MergeOps) -> None:
    """A merged model that still ties its head to the embedding had the embedding's ΔW written into the
    shared tensor (PEFT's merge does that): taking it out of the embedding takes it out of the head too,
    so the result stays tied rather than being untied as a merge would."""
    if mo.tied is None or "tie_word_embeddings" not in mo.config_changes:
        return
    del mo.config_changes["tie_word_embeddings"]
    head = mo.tied[1]
    if head not in mo.base.keys():
        mo.keys.remove(head)
    mo.warnings = [w for w in mo.warnings if "tied in the base" not in w]
    mo.warnings.append("the merged model ties lm_head to the embedding; the unmerged one keeps them tied")


def _retie(mo: MergeOps, req: Request, dtype: torch.dtype | None) -> None:
    """A merge into a tied base whose embedding had LoRA unties the two (it writes the head, unchanged, and
    ``tie_word_embeddings: false``).  Unmerged, the embedding is the base's again: when it comes out
    bit-identical to the head, the base's own tied form is written back (the head left out, the flag true), as
    ``save_pretrained`` wrote the base.  Deciding it costs one extra pass over the two tensors (their jobs run
    into a hashing sink, memory flat), and only where an adapter touched one of them in an untied model."""
    emb, head = arch.input_embedding_key(mo.keys), arch.HEAD_KEY
    config = req.source.config or {}
    if mo.tied is not None or emb is None or head not in mo.keys or config.get("tie_word_embeddings") is not False:
        return
    if mo.experts is not None and {emb, head} & set(mo.experts.targets):
        return
    if not any(mo.ops[k].loras or mo.ops[k].tokens is not None or mo.ops[k].replaced for k in (emb, head)):
        return
    if mo.base.ck.info(mo.base.map[emb]).shape != mo.base.ck.info(mo.base.map[head]).shape:
        return
    sink = _Digests()
    execute([tensor_job(k, mo.ops[k], mo.base, dtype, mo.conv1d) for k in (emb, head)], sink)
    if sink.digests[emb] != sink.digests[head]:
        return
    mo.keys.remove(head)
    mo.config_changes["tie_word_embeddings"] = True
    mo.warnings.append(
        f"{head} equals {emb} once the adapters are taken out: written tied (tie_word_embeddings true), "
        "as the base was before the merge untied them"
    )


class _Digests:
    """A tensor sink that keeps only each tensor's dtype, shape and a SHA-256 of its bytes."""

    def __init__(self) -> None:
        self.digests: dict[str, str] = {}
        self._hash: dict[str, Any] = {}

    def open(self, plan: list[PlannedTensor]) -> None:
        for t in plan:
            self._hash[t.name] = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())

    def write(self, name: str, data: torch.Tensor) -> None:
        self._hash[name].update(data.contiguous().view(-1).view(torch.uint8).numpy())

    def close(self) -> list[str]:
        self.digests = {k: h.hexdigest() for k, h in self._hash.items()}
        return []

    def abort(self) -> None:
        return None


def _refuse(inp: AdapterInput) -> None:
    """What cannot be taken back out of a merged model, with the reason."""
    inv, name = inp.inventory, inp.name
    dora = [m.module for m in inv.modules(name).values() if m.magnitude_key]
    if dora:
        raise UnsupportedError(
            f"DoRA ({dora[0]} and {len(dora) - 1} more) cannot be unmerged from a merged checkpoint: its rows "
            "were rescaled to the magnitude m, and every c·W_merged − ΔW (one c > 0 per row) merges back to the "
            "same weights, so the base is not determined by the files",
            path=inp.ck.root,
            hint="keep the base model, or convert the unmerged checkpoint to the base ("
            + spelled("--to base", 'to="base"')
            + ")",
        )
    replaced = sorted(set(inv.replace.get(name, {})) - _saved(inp)) + sorted(inv.tokens.get(name, {}))
    if replaced:
        raise UnsupportedError(
            f"the adapter replaces {replaced[0]} (modules_to_save or trainable tokens): the merge overwrote "
            "those base values, and the merged model no longer holds them",
            path=inp.ck.root,
            hint="keep the base model to get them back",
        )
