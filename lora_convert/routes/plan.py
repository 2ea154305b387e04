"""What a route is given (:class:`Request`) and what it returns (:class:`Plan`): the jobs that write
the output tensors, and everything else the output folder needs (carried files, config edits, an
adapter config, the model card's lines).  One folder assembly (:mod:`lora_convert.folder`) turns any
plan into an output; the planners never write files themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..config import AdapterConfig
from ..folder import DTYPE_KEYS
from ..inventory import Inventory
from ..io.reader import Checkpoint
from ..stack import AdapterInput
from .route_options import FORMATS, FORMS, OUTPUT_DTYPES, RouteOptions, output_dtype

__all__ = [
    "FORMATS",
    "FORMS",
    "OUTPUT_DTYPES",
    "Plan",
    "Request",
    "RouteOptions",
    "dtype_config_changes",
    "output_dtype",
]

if TYPE_CHECKING:
    from ..io.writer import TensorSink
    from ..pipeline import Job
    from .extract_options import ExtractOptions
    from .report import RouteReport


def dtype_config_changes(name: str, model_config: dict[str, Any] | None) -> dict[str, Any]:
    """config.json edits for an output whose floating tensors are all stored as ``--dtype name``.

    transformers' ``from_pretrained(dtype="auto")`` (and vLLM, TGI) load in the config's dtype, not the
    tensors': a config left saying ``float32`` over fp16 tensors loads them upcast, and one saying
    ``bfloat16`` over fp32 tensors silently drops the precision asked for.  Every key the config (or a
    sub-config such as ``text_config``) already has is set; ``dtype`` is added when it has neither."""
    attr = OUTPUT_DTYPES.get(name)
    if attr is None or model_config is None:
        return {}
    subs = [v for v in model_config.values() if isinstance(v, dict)]
    keys = [k for k in DTYPE_KEYS if k in model_config or any(k in c for c in subs)] or [DTYPE_KEYS[0]]
    changes: dict[str, Any] = {}
    for k in keys:
        if k not in model_config or any(c.get(k, attr) != attr for c in subs) or model_config[k] != attr:
            changes[k] = attr
    return changes


@dataclass
class Request:
    """The inputs of one conversion, opened and sorted."""

    source: Checkpoint  # what is converted: an adapter, an unmerged or a tuned (plain) checkpoint
    ref: str  # the source as the user named it (model card)
    inventory: Inventory
    adapter: str  # the adapter converted ("default" where the source has none)
    base: Checkpoint | None = None  # the base model, for routes that need one
    base_ref: str | None = None  # the base as the user named it (adapter configs, model card)
    options: RouteOptions = field(default_factory=RouteOptions)  # the route options, as the API built them
    extract: ExtractOptions | None = None  # the SVD route's options, validated (options.extract as given)
    base_config: dict[str, Any] | None = None  # the base's config.json, for routes that need no base weights
    stack: list[AdapterInput] = field(default_factory=list)  # several adapters (or one from elsewhere) at once

    # The route options, read where the routes read them (the record is carried, not copied field by field).
    @property
    def dtype(self) -> str:
        """--dtype"""
        return self.options.dtype

    @property
    def outtype(self) -> str | None:
        """--outtype of a GGUF output"""
        return self.options.outtype

    @property
    def requantize(self) -> bool:
        """merge into a quantized base: write the base's own scheme back"""
        return self.options.requantize

    @property
    def device(self) -> str:
        """--device: where a merge computes its fp32 tiles, or extraction its SVDs"""
        return self.options.device

    @property
    def moe_layout(self) -> str | None:
        """--moe-layout: expert LoRA written per-expert or fused (adapter outputs)"""
        return self.options.moe_layout

    @property
    def drop_norms(self) -> bool:
        """--drop-norms: a GGUF output leaves out norm weights saved whole (listed)"""
        return self.options.drop_norms

    def adapters_in(self) -> list[AdapterInput]:
        """The adapters the route applies: the stack, or the source's own adapter with weight 1."""
        return self.stack or [AdapterInput(self.source, self.inventory, self.adapter, 1.0, self.ref)]

    @property
    def config(self) -> AdapterConfig | None:
        return self.inventory.config(self.adapter)

    @property
    def model_config(self) -> dict[str, Any] | None:
        """config.json of the model the output is made from."""
        if self.base is not None:
            return self.base.config
        return self.base_config if self.base_config is not None else self.source.config


@dataclass
class Plan:
    """A route's output, before anything is written."""

    target_form: str
    jobs: list[Job]
    stem: str = "model"  # output file stem: model.safetensors / adapter_model.safetensors
    sharded: bool = True  # False: one file whatever its size (adapters, as PEFT writes them)
    carry_from: Path | None = None  # config, generation config and tokenizer files come from here
    tokenizer_from: list[Path] = field(default_factory=list)  # only tokenizer files from these
    config_changes: dict[str, Any] = field(default_factory=dict)
    adapter_config: dict[str, Any] | None = None  # adapter_config.json, when the output has one
    warnings: list[str] = field(default_factory=list)
    base_model: str | None = None  # the model card's base_model
    card_lines: Callable[[int], list[str]] | None = None  # bytes written -> the card's lines (None: the default)
    card_tables: list[str] = field(default_factory=list)
    card_config: dict[str, Any] | None = None  # config for the card's pipeline tag when none is written
    report: RouteReport | None = None  # the route's own account (routes/report.py; filled while its jobs run)
    op_counts: dict[str, int] | None = None  # what the result reports as done (None: the jobs' ops counted)
    prepass: PlanPass | None = None  # work to run before writing; its outcome is the plan written (extraction)
    file_sink: Callable[[Path], TensorSink] | None = None  # the output is this one file (GGUF), no folder
    one_file_suffix: str | None = None  # an -o ending in it is written as the tensor file alone (kohya's .safetensors)
    metadata: dict[str, str] | None = None  # the safetensors header's metadata (kohya's ss_*, diffusers' config)
    dropped: list[dict[str, str]] = field(default_factory=list)  # tensors of the source left out ({tensor, reason})

    def settled(self) -> Plan:
        """The plan to write once :attr:`prepass` ran (this plan when it declares none); the warnings already
        on this plan (the request's) come first."""
        if self.prepass is None:
            return self
        final = self.prepass.plan()
        final.warnings[:0] = self.warnings
        return final

    def ops(self) -> dict[str, int]:
        if self.op_counts is not None:
            return dict(self.op_counts)
        out: dict[str, int] = {}
        for j in self.jobs:
            out[j.op] = out.get(j.op, 0) + 1
        return out


class Prepass(Protocol):
    """Read-only work that needs tensor data (extraction's differences and SVDs, verify's recomputation):
    declared by the route, run by the assembly (:func:`~lora_convert.assemble.run_prepass`), so that planning
    reads headers only.  Its jobs write nothing (``writes=False``); what they find stays with the pass."""

    label: str  # the progress bar's
    unit: str

    def size(self) -> int:
        """Items the progress bar counts (``advance`` is called once per item)."""
        ...

    def jobs(self, advance: Callable[[int], None]) -> list[Job]: ...

    def threads(self) -> int | None:
        """torch's thread count for the jobs' kernels (None: the pipeline's default).  A pass whose jobs hand work
        to threads of its own also has ``finish()``, which waits for it (called once every job ran)."""
        ...


class PlanPass(Prepass, Protocol):
    """A pre-pass whose outcome decides the output (which tensors, which ranks): :meth:`plan` is the plan to
    write once the jobs ran, :meth:`estimate` the plan as far as headers tell (``--dry-run``)."""

    def plan(self) -> Plan: ...

    def estimate(self) -> Estimate: ...


@dataclass
class Estimate:
    """A plan before its pre-pass ran, for ``--dry-run``: the output as far as headers tell, what that assumes
    about the data not read, and the modules it would write (``rank`` None where only the pass can tell)."""

    plan: Plan
    assumptions: list[str]
    modules: list[dict[str, Any]]
    exact: bool  # the sizes are the real run's whenever the assumptions hold
