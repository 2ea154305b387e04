"""adapter + base -> merged, and unmerged -> merged: every base tensor, with ``s·B·A`` folded in, DoRA
rescaled, replacements (``modules_to_save``, resized embeddings) and trainable tokens applied.

Each LoRA target is one job that streams the base weight in row blocks through
:func:`lora_math.merge_rows` (fp32, rounded once); everything else is a copy.  What each output tensor is and
how its rows are computed is the merge engine's (:mod:`.merge_engine`, shared with unmerge, verify and the
quantized merge); this module is the route: the jobs, the tokenizer, the model card.
"""

from __future__ import annotations

from pathlib import Path

from .merge_engine import merge_ops
from .plan import Plan, Request, dtype_config_changes, output_dtype


def plan_merge(req: Request) -> Plan:
    """Jobs that write the merged model: base tensors, with LoRA folded in and replacements applied."""
    mo = merge_ops(req)
    mo.device = req.device
    qbase = mo.qbase
    dtype = output_dtype(req.dtype)
    dtypes = qbase.dtypes(req.dtype) if qbase is not None else {}
    jobs = [mo.job(k, dtypes.get(k, dtype)) for k in mo.keys]
    if qbase is not None:
        jobs = qbase.jobs(jobs, mo.delta_norm)
    # Dequantized weights are written in --dtype, bf16 for auto: the config must say what is stored.
    written = "bf16" if qbase is not None and not qbase.requantize and req.dtype == "auto" else req.dtype
    mo.config_changes.update(dtype_config_changes(written, req.model_config))
    plan = Plan(
        "merged",
        jobs,
        stem=mo.base.ck.stem,
        carry_from=(req.base or req.source).root,
        tokenizer_from=_tokenizer_sources(req),
        config_changes=mo.config_changes,
        warnings=mo.warnings,
    )
    if req.stack:
        plan.card_lines = lambda total: stack_card_lines(req, plan)
    if qbase is not None:
        qbase.annotate(plan)
    return plan


def _tokenizer_sources(req: Request) -> list[Path]:
    """Tokenizer files come from the adapters (a resized vocabulary ships its tokenizer)."""
    if not req.stack:
        return [req.source.root] if req.base is not None else []
    base_root = (req.base or req.source).root
    roots = [inp.ck.root for inp in req.stack if inp.ck.root != base_root]
    return list(dict.fromkeys(roots))


def stack_card_lines(req: Request, plan: Plan) -> list[str]:
    """The model card's summary for several adapters: each with its weight."""
    n = sum(1 for j in plan.jobs if j.writes)
    lines = [f"base: `{req.base_ref or req.ref}`"]
    lines += [f"adapter `{inp.ref or inp.name}` with weight {inp.weight:g}" for inp in req.stack]
    lines += [f"{n} tensors written"] + [f"{k}: {v}" for k, v in sorted(plan.ops().items())] + plan.warnings
    return lines
