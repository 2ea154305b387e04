"""``--dry-run``: a route's plan described instead of written.

A dry run opens the request and asks the route for its plan, exactly as the real run does, and stops there:
the plan already knows every output tensor (name, dtype, shape), the blocks each job will read, the config
edits, the adapter config and the warnings, so the files and bytes of the output are computed from it (the
safetensors headers are built as the sink will build them).  Nothing is written and no temporary folder is
made.  Only a one-file output with its own sink (GGUF) is counted by its tensor data alone (``bytes_exact``
false): its header is the sink's own business.

A plan that declares a pre-pass (extraction: which tensors changed, and the ranks an energy or error criterion
picks, are known only once its SVD pass has read them) is described by the pass's estimate, from headers alone:
``assumptions`` says what it takes for granted, ``bytes_exact`` is false where the ranks are upper bounds, and
each module's ``rank`` is None where only the pass can tell.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .io.safetensors_format import build_header
from .io.views import ScaledSource
from .io.writer import assign_shards, parse_size, shard_names
from .options import UNSHARDED, Output
from .pipeline import Job
from .routes.plan import Plan, Request


@dataclass
class DryRun:
    """What a conversion would write, and nothing written."""

    output: str
    route: str
    source_form: str
    target_form: str
    files: list[str]  # the weight files and adapter_config.json, as ConvertResult.files would list them
    tensors: int
    total_bytes: int  # bytes of ``files``, as ConvertResult.total_bytes would say
    bytes_exact: bool  # False: a one-file output (GGUF) counted by its tensor data alone
    read_bytes: int  # bytes of the row blocks the jobs declare they read (LoRA factors read whole not counted)
    factor_bytes: int  # bytes on disk of the listed modules' factors (A, B, lora bias, DoRA magnitude; every
    # factor of a LoHa/LoKr/full-diff module; VeRA's and AdaLoRA's stored tensors, not their views), each tensor once
    dtypes: dict[str, int]  # output tensors per dtype
    ops: dict[str, int]
    modules: list[dict[str, Any]]  # per adapter module touched: adapter, module, kind, rank, scaling, weight
    config_changes: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    output_exists: bool = False  # the real run needs force=True
    assumptions: list[str] = field(default_factory=list)  # what a plan with a pre-pass (extraction) takes for granted

    def to_dict(self) -> dict[str, Any]:
        return {"dry_run": True, **asdict(self)}


def describe(plan: Plan, req: Request, out: Output) -> DryRun:
    """``plan`` as the files and bytes :func:`~.assemble.write_output` would write for it, writing nothing."""
    from .io.safetensors_format import dtype_name

    assumptions: list[str] = []
    modules: list[dict[str, Any]] | None = None
    exact = plan.file_sink is None
    reading = list(plan.jobs)
    if plan.prepass is not None:  # what the pass would find is not read: the plan as far as headers tell
        estimate = plan.prepass.estimate()
        estimate.plan.warnings[:0] = plan.warnings
        reading = plan.prepass.jobs(lambda n: None) + estimate.plan.jobs  # the pass's jobs are built, never run
        plan, assumptions, modules, exact = estimate.plan, estimate.assumptions, estimate.modules, estimate.exact
    planned = [j.planned for j in plan.jobs if j.writes]
    output = Path(out.path)
    as_file = plan.one_file_suffix is not None and output.suffix == plan.one_file_suffix
    exact = exact and plan.file_sink is None
    if plan.file_sink is not None:
        files, total = [output.name], sum(p.nbytes for p in planned)
    else:
        stem = output.stem if as_file else plan.stem
        limit = UNSHARDED if as_file or not plan.sharded else parse_size(out.max_shard_size)
        metadata = {"format": "pt", **(plan.metadata or {})}
        shards = assign_shards(planned, limit)
        files = shard_names(len(shards), stem)
        total = 0
        for shard in shards:
            header, _ = build_header([(p.name, p.dtype, p.shape) for p in shard], metadata)
            total += len(header) + sum(p.nbytes for p in shard)
        if plan.adapter_config is not None and not as_file:
            files.append("adapter_config.json")
            total += len((json.dumps(plan.adapter_config, indent=2, sort_keys=False) + "\n").encode("utf-8"))
    dtypes: dict[str, int] = {}
    for p in planned:
        dtypes[dtype_name(p.dtype)] = dtypes.get(dtype_name(p.dtype), 0) + 1
    return DryRun(
        str(out.path),
        f"{req.inventory.form}->{plan.target_form}",
        req.inventory.form,
        plan.target_form,
        sorted(set(files)),
        len(planned),
        total,
        exact,
        _read_bytes(reading),
        _factor_bytes(req),
        dtypes,
        plan.ops(),
        _modules(req) if modules is None else modules,
        dict(plan.config_changes),
        list(plan.warnings),
        output.exists() or output.is_symlink(),
        assumptions,
    )


def _read_bytes(jobs: list[Job]) -> int:
    """Bytes of the blocks every job declares (``Job.reads``): rows of a tensor, or elements when flat."""
    total = 0
    for job in jobs:
        for r in job.reads():
            info = r.ck.info(r.key)
            if r.flat:
                per = info.nbytes // max(1, math.prod(info.shape))
            else:
                per = info.nbytes // max(1, info.shape[0] if info.shape else 1)
            total += (r.stop - r.start) * per
    return total


def _factor_bytes(req: Request) -> int:
    """Bytes of every listed module's factors as stored (what a merge or combine reads whole), each tensor once: a
    LoHa, LoKr or full-diff module's are all its factors (LoHa's four and Tucker cores, LoKr's w1/w2 or their
    halves and core, the diff and its bias), not the two that ``a_key``/``b_key`` name for messages; the alpha
    is read with the inventory, not by the merge.  A factor another tuner presents as a view (VeRA's
    ``λ_d ⊙ vera_A``, AdaLoRA's ``lora_A ⊙ lora_E``) counts the stored tensors it reads: the shared projections once."""
    total = 0
    for a in req.adapters_in():
        seen: set[str] = set()
        for m in a.inventory.modules(a.name).values():
            keys = [m.a_key, m.b_key] if m.tuner == "lora" else [k for r, k in m.factors.items() if r != "alpha"]
            for key in (*keys, m.bias_key, m.magnitude_key):
                if key is None or key not in a.ck.tensors:
                    continue
                info = a.ck.info(key)
                for t in info.source.reads(key) if isinstance(info.source, ScaledSource) else [info]:
                    if t.name not in seen:
                        seen.add(t.name)
                        total += t.nbytes
    return total


def _modules(req: Request) -> list[dict[str, Any]]:
    """Every LoRA module of the adapters applied, with its rank and scaling as ``detect`` reports them."""
    rows: list[dict[str, Any]] = []
    for a in req.adapters_in():
        for _, m in sorted(a.inventory.modules(a.name).items()):
            rows.append(
                {
                    "adapter": a.ref,
                    "module": m.module,
                    "kind": m.kind,
                    "rank": m.rank,
                    "scaling": m.scaling,
                    "weight": a.weight,
                }
            )
    return rows
