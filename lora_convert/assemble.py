"""One output-folder assembly for every route: the plan's tensors through the pipeline into a
safetensors sink, then carried files, config edits, the adapter config and the model card — all in a
temporary folder that is renamed into place only when complete (:class:`~.io.output.AtomicOutput`).
A plan whose output is one file (a GGUF adapter) brings its own sink; that file alone is moved into place.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .card import render_card
from .fmt import form_word
from .folder import carry_files, read_json, update_config, write_json
from .io.hub import PushResult, hub_repo_id
from .io.output import AtomicOutput, stale_note
from .io.writer import SafetensorsSink, TensorSink
from .options import UNSHARDED, Output
from .pipeline import execute
from .progress import progress_bar
from .routes.plan import Plan, Prepass, Request

if TYPE_CHECKING:
    from .io.reader import Checkpoint
    from .routes.report import RouteReport


@dataclass
class ConvertResult:
    """What a conversion wrote.  ``report`` is the route's own account (the extraction's per-module report, an
    unmerge's rounding bounds, ``--requantize``'s error per module; None elsewhere): ``routes/report.py``."""

    output: str
    route: str
    source_form: str
    target_form: str
    files: list[str]
    tensors: int
    total_bytes: int
    ops: dict[str, int]
    config_changes: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    report: RouteReport | None = None
    pushed: PushResult | None = None  # set when the output was pushed to the Hub (push_to=)
    dropped: list[dict[str, str]] = field(default_factory=list)  # source tensors left out (--drop-norms)

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-able dict; the report's fields sit beside the common ones."""
        d = {k: v for k, v in asdict(self).items() if k not in ("report", "pushed")}
        if self.report is not None:
            d.update(self.report.to_dict())
        d["pushed"] = asdict(self.pushed) if self.pushed is not None else None
        return d


#: Writes a plan's tensors into the temporary folder some other way than ``execute`` here (``merge --ray``: one task
#: per output shard): given the plan, the temporary folder and the sink it would have used; returns the files.
TensorRun = Callable[[Plan, Path, SafetensorsSink], list[str]]


#: Runs a plan's pre-pass some other way than :func:`run_prepass` (``extract --ray``: its jobs split into groups, a
#: Ray task each, their outcomes gathered into the pass): given the pass and whether to show progress.
PrepassRun = Callable[[Prepass, bool], None]


def run_prepass(pre: Prepass, progress: bool) -> None:
    """Run a route's declared pre-pass (jobs that read and compute, writing nothing), with its progress bar."""
    with progress_bar(progress, pre.size(), pre.label, unit=pre.unit) as advance:
        execute(pre.jobs(advance), None, threads=pre.threads(), finish=getattr(pre, "finish", None))


def write_output(
    plan: Plan, req: Request, out: Output, run: TensorRun | None = None, prepass: PrepassRun | None = None
) -> ConvertResult:
    """Write ``plan`` into ``out.path`` atomically and say what was written (the tensors by ``run`` when given: the
    side files, card and rename stay here); a plan that declares a pre-pass (extraction's SVDs) has it run first
    (by ``prepass`` when given), and its outcome is what is written."""
    output, force, progress = out.path, out.force, out.progress
    inputs = _input_paths(req.source) + (_input_paths(req.base) if req.base is not None else [])
    for inp in req.stack:
        inputs += _input_paths(inp.ck)
    if req.base is None and req.base_ref is not None and os.path.lexists(req.base_ref):
        inputs.append(Path(req.base_ref))  # a base read for its config.json alone (gguf, mlx)
    as_file = plan.one_file_suffix is not None and Path(output).suffix == plan.one_file_suffix
    single = plan.file_sink is not None or as_file  # one file (GGUF, kohya's): no side files, no card
    atomic = AtomicOutput(output, force=force, inputs=inputs, file=single)
    with atomic as tmp:  # taken before a pre-pass: an output that is there (or racing) is refused before the work
        if plan.prepass is not None:
            (prepass or run_prepass)(plan.prepass, progress)
            plan = plan.settled()
        if plan.file_sink is not None:
            sink: TensorSink = plan.file_sink(tmp / Path(output).name)
        elif as_file:  # the temp folder holds the file alone, named as -o: it is moved into place
            sink = SafetensorsSink(tmp, max_shard_size=UNSHARDED, stem=Path(output).stem, metadata=plan.metadata)
        else:
            sink = SafetensorsSink(
                tmp,
                max_shard_size=out.max_shard_size if plan.sharded else UNSHARDED,
                stem=plan.stem,
                metadata=plan.metadata,
            )
        planned = sum(j.planned.nbytes for j in plan.jobs if j.writes)
        if run is not None and isinstance(sink, SafetensorsSink):
            files = run(plan, tmp, sink)
        else:
            with progress_bar(progress, planned, "writing") as advance:
                files = execute(plan.jobs, sink, progress=advance)
        if not single:
            files += _side_files(tmp, plan)
        total = sum((tmp / f).stat().st_size for f in files)
        if not single:
            _write_card(tmp, plan, req, out.command, total)
        n_tensors = sum(1 for j in plan.jobs if j.writes)
        result = ConvertResult(
            str(output),
            f"{req.inventory.form}->{plan.target_form}",
            req.inventory.form,
            plan.target_form,
            sorted(set(files)),
            n_tensors,
            total,
            plan.ops(),
            plan.config_changes,
            list(plan.warnings),
            report=plan.report,
            dropped=list(plan.dropped),
        )
    if atomic.stale_removed:
        result.warnings.append(stale_note(atomic.stale_removed))
    result.seconds = round(time.perf_counter() - out.started, 3)
    return result


def _input_paths(ck: Checkpoint) -> list[Path]:
    """What an output may never replace nor lie inside: the checkpoint's folder, and each file read from
    it (a link into a Hugging Face cache's blobs resolves elsewhere than the folder).  A checkpoint given as
    one file is that file (with the config files read beside it), not its folder: a new output folder beside
    it replaces nothing it reads."""
    paths = ([] if ck.single_file else [ck.root]) + [*ck.files]
    if ck.config_path is not None:
        paths.append(ck.config_path)
    return paths + ([ck.adapter_config_path] if ck.adapter_config_path is not None else [])


def _side_files(tmp: Path, plan: Plan) -> list[str]:
    """Carried config/tokenizer files, config edits and the adapter config; returns the names counted as
    the output's files (the adapter config; carried files are not counted)."""
    carry_files(plan.carry_from, tmp)
    for folder in plan.tokenizer_from:
        carry_files(folder, tmp, only_tokenizer=True)  # a resized vocab ships its tokenizer
    update_config(tmp, plan.config_changes)
    if plan.adapter_config is None:
        return []
    write_json(tmp / "adapter_config.json", plan.adapter_config)
    return ["adapter_config.json"]


def _write_card(tmp: Path, plan: Plan, req: Request, command: str | None, total: int) -> None:
    if plan.card_lines is not None:
        summary = plan.card_lines(total)
    else:
        n = sum(1 for j in plan.jobs if j.writes)
        form = req.inventory.form
        said = form_word(form) if form_word(form) != form else f"{form} form"  # (a full model, the adapter form)
        summary = [f"source: `{req.ref}` ({said})", f"{n} tensors written"]
        summary += [f"{k}: {v}" for k, v in sorted(plan.ops().items())] + plan.warnings
    config_base = req.config.base_model_name_or_path if req.config else None
    named = plan.base_model or req.base_ref or config_base
    card = render_card(
        form=plan.target_form,
        base_model=_hub_base(plan, req, config_base),
        base_named=named,
        model_config=read_json(tmp / "config.json") or plan.card_config or req.model_config,
        command=command,
        summary=summary,
        tables=plan.card_tables,
    )
    (tmp / "README.md").write_text(card, encoding="utf-8")


def _hub_base(plan: Plan, req: Request, config_base: str | None) -> str | None:
    """The card's ``base_model``: only what the Hub can link.  Where a base was given or opened, the base used
    decides (a Hub repo id, or a folder in the Hub cache; a local folder gives None), never the adapter config's
    string: ``fixtures/base`` run from another folder looks like a repo id and links nowhere.  Only where no base
    was used does the config's string name it, when it reads as a repo id and is no local path."""
    refs: tuple[str | None, ...] = (plan.base_model, config_base)
    if req.base is not None or req.base_ref is not None:  # (--base of a GGUF/MLX output: its config.json alone)
        refs = (plan.base_model, req.base_ref, str(req.base.root) if req.base is not None else None)
    return next((r for r in map(hub_repo_id, refs) if r), None)
