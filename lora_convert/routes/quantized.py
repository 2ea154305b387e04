"""Merging into a quantized base: the base read through its dequantized view, and what the output
needs besides — the dtype the dequantized weights are written in, ``quantization_config`` removed, the
model card's note — or, with ``--requantize``, the jobs that write the merged weights back in the
base's own scheme while untouched quantized weights are copied byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import UnsupportedError
from ..io.quantized import (
    QUANTIZED_SUFFIXES,
    QuantizedTensor,
    QuantLayout,
    check_scales,
    dequantized,
    find_layout,
    refuse_orphans,
)
from ..io.reader import Checkpoint
from ..pipeline import Job
from .common import BaseView
from .plan import Plan, Request, output_dtype

DeltaNorm = Callable[[str], Callable[[], float | None]]  # weight -> ‖ΔW‖ of its plain LoRA, read when needed

if TYPE_CHECKING:
    from .requantize import Requantization


@dataclass
class QuantizedBase:
    """A quantized base being merged into."""

    raw: Checkpoint  # the checkpoint as stored
    layout: QuantLayout
    view: Checkpoint  # the same, dequantized
    requantize: bool
    report: Requantization | None = None
    scale_warnings: list[str] = field(default_factory=list)  # fp8 scales of 0, by tensor

    def dtypes(self, asked: str) -> dict[str, torch.dtype]:
        """Output dtype of each dequantized weight: fp32 on its way to re-quantization; else ``--dtype``,
        bf16 when it is ``auto`` (a quantized weight has no float dtype of its own to keep)."""
        dtype = torch.float32 if self.requantize else (output_dtype(asked) or torch.bfloat16)
        return {name: dtype for name in self.layout.tensors}

    def jobs(self, jobs: list[Job], delta_norm: DeltaNorm) -> list[Job]:
        """With ``--requantize``: each quantized weight's job replaced by the jobs of its stored tensors
        (``delta_norm``: the merge engine's :meth:`~.merge_engine.MergeOps.delta_norm`, for the report)."""
        if not self.requantize:
            return jobs
        from .requantize import Requantization, raw_jobs, requantize_jobs  # (only --requantize needs them)

        self.report = Requantization(self.layout.scheme)
        out: list[Job] = []
        for job in jobs:
            t = self.layout.tensors.get(job.name)
            if t is None:
                out.append(job)
            elif job.op == "copy":
                out += raw_jobs(t, self.raw)
                self.report.copied += 1
            else:
                self._check(job, t)
                out += requantize_jobs(job, t, self.raw, self.layout.config, self.report, delta_norm(job.name))
        return out

    def _check(self, job: Job, t: QuantizedTensor) -> None:
        """What the scheme cannot hold is refused before anything is written."""
        if tuple(job.shape) != tuple(t.shape):
            raise UnsupportedError(
                f"merged weight of shape {list(job.shape)} cannot be re-quantized into the base's "
                f"{t.scheme} layout of shape {list(t.shape)}",
                path=self.raw.root,
                tensor=t.module,
                hint="merge without --requantize",
            )
        if t.scheme.startswith("bnb-"):
            from ..quant.bnb import functional

            functional()  # bitsandbytes must be there: its own quantizer writes the bytes

    def annotate(self, plan: Plan) -> None:
        """Config edits and the model card's account of what happened to the quantization."""
        plan.warnings.extend(self.scale_warnings)
        if self.requantize:
            assert self.report is not None
            plan.report = self.report
            plan.warnings.append(
                f"the base is quantized ({self.layout.scheme}): merged weights re-quantized in its scheme, "
                f"the {self.report.copied} untouched ones copied as they were"
            )
            plan.card_tables.append(self.report.markdown())
            return
        plan.config_changes["quantization_config"] = None
        plan.warnings.append(
            f"the base is quantized ({self.layout.scheme}): its {len(self.layout.tensors)} quantized weights "
            "were dequantized and the merged model is not quantized (quantization_config removed)"
        )


def quantized_base(req: Request, base: BaseView) -> QuantizedBase | None:
    """The quantized base of a merge, or None for a plain one (refusing what cannot be dequantized)."""
    requantize = bool(getattr(req, "requantize", False))
    if req.base is None:
        cfg: dict[str, Any] = req.source.config or {}
        if cfg.get("quantization_config") or any(k.endswith(QUANTIZED_SUFFIXES) for k in base.map.values()):
            raise UnsupportedError(
                "an unmerged checkpoint on a quantized base",
                path=req.source.root,
                hint="split out the adapter (convert --to adapter) and merge it with --base QUANTIZED_BASE",
            )
        if requantize:
            raise UnsupportedError("--requantize needs a quantized base", path=req.source.root)
        return None
    layout = find_layout(req.base)
    if layout is None:
        if requantize:
            raise UnsupportedError("--requantize: the base is not quantized", path=req.base.root)
        return None
    refuse_orphans(req.base, layout)
    scale_warnings = check_scales(req.base, layout)  # before anything is written: NaN, Inf or negative scales
    return QuantizedBase(req.base, layout, dequantized(req.base, layout), requantize, scale_warnings=scale_warnings)
