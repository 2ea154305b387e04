"""How every result reads on a terminal: the text (and ``report --markdown``) form of what each command
returns.  ``cli.py`` parses and calls the API; it prints through here alone.

The results come from the API (``DetectResult``, ``costs.Report``, ``ConvertResult``, ``Verification``,
``PushResult``) and are read by their attributes only, so this module imports none of the layers that build
them: the CLI layer reaches everything through ``api``.  Torch-free: ``detect`` and ``report`` print through
here.  Every name printed comes from a file: it goes through :func:`~lora_convert.text.safe` (control
characters escaped, rich markup neutralised; :func:`~lora_convert.cli_output.table` does it for each cell).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import click
from rich.console import Console

from .cli_output import document, dumps, table
from .fmt import form_word, human_bytes, ranges
from .text import escape_controls, safe

# Emoji codes (":cake:") print as written.
out = Console(emoji=False)
err = Console(stderr=True, soft_wrap=True, emoji=False)  # one warning, one line (grep-able, like error:)


def json_document(kind: str, obj: dict[str, Any]) -> None:
    """``obj`` as the ``--json`` document of ``kind`` (``docs/json.md``), on stdout."""
    click.echo(dumps(document(kind, obj)))


def warnings(lines: Iterable[str]) -> None:
    for w in lines:
        err.print(f"[yellow]warning:[/yellow] {safe(w)}")


# -- detect -------------------------------------------------------------------------------------------------
def detection(res: Any) -> None:
    """``detect``: the form, the files, and a table per adapter (a ``DetectResult``)."""
    form = safe(form_word(res.form)) + (f" ({safe(res.dialect)})" if res.dialect != "peft" else "")
    if res.form == "plain":  # without --base: which of the three it is needs the base
        form += " (no LoRA tensors: a base, merged or fine-tuned model; --base BASE tells which)"
    out.print(f"[bold]form:[/bold] {form}")
    out.print(
        safe(
            f"files: {', '.join(res.files)} ({res.layout}); {res.tensors} tensors, {human_bytes(res.total_bytes)}; "
            + ", ".join(f"{k} {human_bytes(v)}" for k, v in res.dtypes.items())
        )
    )
    if res.dialect != "peft":
        out.print(safe(f"dialect: {res.dialect}"))
    if res.module_prefixes and res.module_prefixes != {"text decoder": "model."}:  # say it where it is not plain
        out.print(safe("modules under: " + ", ".join(f"{v!r} ({k})" for k, v in res.module_prefixes.items())))
    if res.quantization:
        q = res.quantization
        out.print(
            safe(
                f"quantized: {q['scheme']} ({q['method']}); {q['tensors']} weights, {human_bytes(q['stored_bytes'])} "
                f"on disk, {human_bytes(q['dequantized_bytes']['BF16'])} dequantized to bf16"
            )
        )
    for a in res.adapters:
        _adapter(a)
    if res.differs_from_base:
        shown = ", ".join(res.differs_from_base[:8])
        more = f" and {len(res.differs_from_base) - 8} more" if len(res.differs_from_base) > 8 else ""
        out.print(safe(f"differs from base: {shown}{more}"))
    if res.base_comparison and res.base_comparison.get("summary"):
        out.print(safe(res.base_comparison["summary"]))
    warnings(res.warnings)


#: What a rotation tuner's ``rank`` is (it has no alpha and no scaling): its block size, or HRA's reflections r.
_ROTATION_SIZE = {"oft": "block size", "boft": "block size", "diag-oft": "block size", "hra": "reflections r"}


def _adapter(a: Any) -> None:
    rotation = [bool(g.algorithms) and set(g.algorithms) <= _ROTATION_SIZE.keys() for g in a.modules]
    rows = [
        [
            g.name,
            str(g.count),
            ranges(g.layers) if g.layers else "-",
            ",".join(map(str, g.ranks)),
            "-" if rot else ",".join(f"{x:g}" for x in g.alphas) or "?",
            "-" if rot else ",".join(f"{x:g}" for x in g.scalings) or "?",
        ]
        for g, rot in zip(a.modules, rotation, strict=True)
    ]
    head = ["module", "count", "layers", "rank", "alpha", "scaling"]
    if any(rotation):  # OFT, BOFT, HRA, Diag-OFT: the rank column is their size, under its own name
        sizes = sorted({_ROTATION_SIZE[t] for g in a.modules for t in g.algorithms or () if t in _ROTATION_SIZE})
        head[3] = " / ".join(sizes if all(rotation) else ["rank", *sizes])
        if all(rotation):  # no alpha, no scaling to show
            head, rows = head[:4], [row[:4] for row in rows]
    if any(g.algorithms for g in a.modules):  # a LyCORIS file: which algorithm each group's modules use
        head.append("algorithm")
        for row, g in zip(rows, a.modules, strict=True):
            row.append(",".join(g.algorithms or ["lora"]))
    out.print(table(out, f"adapter '{a.name}'", head, rows))
    if a.experts:
        _experts(a.experts)
    if a.tuner:  # LoHa / LoKr
        out.print(f"  {a.tuner['peft_type']}: " + "; ".join(f"{k} {v}" for k, v in a.tuner.items() if k != "peft_type"))
    flags = [
        f"DoRA: {a.dora}",
        f"rsLoRA: {a.use_rslora}",
        f"lora_bias: {a.lora_bias}",
        f"LoRA params: {a.lora_parameters:,}",
    ]
    if a.modules_to_save:
        flags.append("modules_to_save: " + ", ".join(a.modules_to_save))
    if a.saved_layers:
        flags.append("saved whole: " + ", ".join(a.saved_layers))
    if a.trainable_tokens:
        flags.append("trainable tokens: " + ", ".join(f"{k} ({v})" for k, v in a.trainable_tokens.items()))
    if a.rank_pattern:
        flags.append(f"rank_pattern: {a.rank_pattern}")
    if a.alpha_pattern:
        flags.append(f"alpha_pattern: {a.alpha_pattern}")
    out.print(safe("; ".join(flags)))


def _experts(groups: list[Any]) -> None:
    """LoRA on routed experts: fused (PEFT target_parameters: one A/B pair for a layer's experts) or one
    pair per expert module."""
    rows = [
        [
            g.name,
            g.layout,
            str(g.count),
            ranges(g.layers) if g.layers else "-",
            ",".join(map(str, g.experts)),
            ",".join(map(str, g.ranks)),
            (g.b_layout + ("*" if g.b_layout_assumed else "")) if g.layout == "fused" else "-",
        ]
        for g in groups
    ]
    head = ["target", "layout", "count", "layers", "experts", "rank/expert", "B packing"]
    out.print(table(out, "expert LoRA", head, rows))
    if any(g.b_layout_assumed for g in groups):
        out.print("* assumed (PEFT's packing): adapter_config.json has no lora_B_layout")


# -- convert, merge, extract, combine ------------------------------------------------------------------------
def conversion(res: Any) -> None:
    """What a conversion wrote (a ``ConvertResult``): the route's report (``res.report``: its tables and summary
    above the ``wrote`` line, its notes under it), the ops, the config edits, what was left out."""
    rep = res.report
    if rep is not None:
        for t in rep.tables():
            out.print(table(out, t.title, t.head, t.rows))
        for line in rep.summary_lines(res.total_bytes):
            out.print(safe(line))
    out.print(
        "[green]wrote[/green] "
        + safe(
            f"{res.output} ({res.target_form}, from {form_word(res.source_form)}): {res.tensors} tensors, "
            f"{human_bytes(res.total_bytes)} in {res.seconds:.1f} s"
        )
    )
    if res.ops:
        out.print(safe("  " + ", ".join(f"{k}: {v}" for k, v in sorted(res.ops.items()))))
    for k, v in res.config_changes.items():
        out.print(safe(f"  config.json: {k} = {v}"))
    for line in rep.notes() if rep is not None else []:
        out.print(safe("  " + line))
    for d in res.dropped:
        out.print(safe(f"  dropped: {d['tensor']} ({d['reason']})"))
    warnings(res.warnings)
    if res.pushed is not None:
        pushed(res.output, res.pushed)


def dry_run(res: Any) -> None:
    """``--dry-run``: the plan (a ``DryRun``): modules with rank and scaling, the files, dtypes and bytes it would
    write, what it would read, the config edits and warnings; nothing was written."""
    if res.modules:
        rows = [
            [m["adapter"], m["module"], m["kind"], _num(m["rank"]), _num(m["scaling"]), f"{m['weight']:g}"]
            for m in res.modules
        ]
        out.print(table(out, "modules", ["adapter", "module", "kind", "rank", "scaling", "weight"], rows))
    about = "" if res.bytes_exact else "about "
    out.print(
        "[cyan]dry run[/cyan] "
        + safe(
            f"{res.output} ({res.target_form}, from {form_word(res.source_form)}): would write {res.tensors} tensors, "
            f"{about}{human_bytes(res.total_bytes)} in {', '.join(res.files)}; read {human_bytes(res.read_bytes)} in blocks, "
            f"{human_bytes(res.factor_bytes)} of LoRA factors"
        )
    )
    out.print(safe("  dtypes: " + ", ".join(f"{k}: {v}" for k, v in sorted(res.dtypes.items()))))
    if res.ops:
        out.print(safe("  " + ", ".join(f"{k}: {v}" for k, v in sorted(res.ops.items()))))
    for k, v in res.config_changes.items():
        out.print(safe(f"  config.json: {k} = {v}"))
    for line in res.assumptions:
        out.print(safe(f"  assumes: {line}"))
    if res.output_exists:
        out.print(safe("  the output exists: the real run needs --force"))
    out.print("  nothing written")
    warnings(res.warnings)


def _num(x: Any) -> str:
    return "?" if x is None else f"{x:g}"


def pushed(folder: Any, res: Any) -> None:
    """``push`` (or a conversion's ``--push-to``): where the commit went (a ``PushResult``)."""
    out.print(f"[green]pushed[/green] {safe(folder)} -> {safe(res.commit_url)}")


# -- verify ----------------------------------------------------------------------------------------------------
def verification(res: Any) -> None:
    """``verify``: the tensors that are not ok, then one line with the verdict (a ``Verification``)."""
    bad = [[c.tensor, c.status, c.detail] for c in res.checks if c.status != "ok"]
    if bad:
        out.print(table(out, "tensors that are not ok", ["tensor", "status", "detail"], bad))
    warnings(res.warnings)
    click.echo(("ok: " if res.ok else "not ok: ") + escape_controls(res.summary()))


# -- report ----------------------------------------------------------------------------------------------------
def report(rep: Any, path: str) -> None:
    """``report``: the forms transposed (one column per form fits a terminal), the LoRA modules, then what the
    numbers assume; the report's notes on stderr (a ``costs.Report``)."""
    head, rows = form_table(rep)
    cols = [[h, *(r[i] for r in rows)] for i, h in enumerate(head[1:], start=1)]
    right = tuple(range(1, len(rows) + 1))
    out.print(
        table(
            out, f"{path} ({form_word(rep.source_form)})", ["", *(r[0] for r in rows)], cols, name_col=None, right=right
        )
    )
    head, rows = module_table(rep)
    if rows:
        out.print(table(out, "LoRA modules", head, rows, name_col=None))
    for line in assumption_lines(rep):
        out.print(escape_controls(line), markup=False, highlight=False)
    for n in rep.notes:
        err.print(f"note: {safe(n)}")


def report_markdown_text(rep: Any) -> None:
    """``report --markdown``: :func:`report_markdown`, each line's control characters escaped."""
    click.echo("\n".join(escape_controls(ln) for ln in report_markdown(rep).split("\n")), nl=False)


def _n(x: int | float | None) -> str:
    if x is None:
        return "?"
    if isinstance(x, float):
        return f"{x:.3g}"
    return f"{x:,}"


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{x:.3g}%"


def form_table(rep: Any) -> tuple[list[str], list[list[str]]]:
    """One row per storage form, under the report's own column names (``Report.form_columns()``)."""
    rows = []
    for r in rep.rows:
        by_dtype = ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(r.bytes.items()))
        disk = f"{human_bytes(r.bytes_total)} ({by_dtype})" if by_dtype else "?"
        if r.bytes_total and not r.measured:
            disk += " est."
        rows.append(
            [
                form_word(r.form),
                _n(r.base_parameters),
                _n(r.lora_parameters),
                _n(r.total_parameters),
                _pct(r.added_percent),
                disk,
                human_bytes(r.load_bytes_total),
                _n(r.flops_base_matmul),
                _n(r.flops_lora),
                _n(r.flops_attention),
                _n(r.flops_total),
                _pct(r.overhead_percent),
                _n(r.merge_flops) if r.merge_flops is not None else "n/a",
            ]
        )
    return rep.form_columns(), rows


def module_table(rep: Any) -> tuple[list[str], list[list[str]]]:
    rows = [
        [
            k.kind,
            str(k.count),
            ",".join(map(str, k.ranks)) or "-",
            ",".join(f"{s:g}" for s in k.scalings) or ("?" if k.count else "-"),
            _n(k.lora_parameters),
            _n(k.extra_flops),
            _n(k.merge_flops),
        ]
        for k in rep.modules
    ]
    return rep.module_columns(), rows


def assumption_lines(rep: Any, bullet: str = "") -> list[str]:
    """The base used, each form's run-time assumption and each column's meaning: the lines every output
    form prints (text as they are, Markdown with ``bullet="- "``)."""
    sub = " " * len(bullet) + (bullet or "  ")
    lines = [bullet + rep.base_used(), bullet + "forms:"]
    lines += [f"{sub}{form_word(r.form)}: {r.assumes}" for r in rep.rows]
    lines += [bullet + "columns:"]
    shown = set(rep.form_columns()) | (set(rep.module_columns()) if rep.modules else set())
    lines += [f"{sub}{h}: {n}" for h, n in rep.column_notes().items() if h in shown]
    return lines + [bullet + rep.conventions[0]]


def _md(head: list[str], rows: list[list[str]]) -> list[str]:
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"] + [
        "| " + " | ".join(r) + " |" for r in esc
    ]


def report_markdown(rep: Any) -> str:
    """The report as Markdown tables, ready for a model card's README.md."""
    lines = ["## Cost by storage form", ""]
    lines += _md(*form_table(rep))
    if rep.modules:
        lines += ["", "### LoRA modules", ""]
        lines += _md(*module_table(rep))
    lines += ["", "### What the numbers assume", ""] + assumption_lines(rep, "- ")
    if rep.notes:
        lines += [""] + [f"- {n}" for n in rep.notes]
    return "\n".join(lines) + "\n"


# -- spectrum ------------------------------------------------------------------------------------------------
def _at_ranks(top: int) -> list[int]:
    """The ranks a spectrum table shows: powers of two up to ``top``."""
    return [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if k <= top]


def spectrum(res: Any) -> None:
    """``spectrum``: per group and per module the relative error at a few ranks and the rank the criterion
    picks (a ``Spectrum``); then the adapter that rank gives, and where the chart went."""
    top = max((len(g.error) for g in res.groups), default=1)
    ks = _at_ranks(top)
    head = ["group", "modules", "rank"] + [f"err@{k}" for k in ks]
    rows = []
    for g in res.groups:
        r = str(g.ranks[0]) if g.ranks[0] == g.ranks[1] else f"{g.ranks[0]}-{g.ranks[1]}"
        rows.append([g.group, str(g.modules), r] + [f"{g.error[k - 1]:.2e}" if k <= len(g.error) else "" for k in ks])
    out.print(table(out, f"relative error by group ({res.criterion})", head, rows))
    head = ["module", "shape", "svd", "rank", "energy", "error"] + [f"err@{k}" for k in ks]
    rows = [
        [m.module, f"{m.shape[0]}x{m.shape[1]}", m.method, f"{m.rank}{'*' if m.capped else ''}"]
        + [f"{m.energy[m.rank - 1]:.6f}", f"{m.error[m.rank - 1]:.3e}"]
        + [f"{m.error[k - 1]:.2e}" if k <= len(m.error) else "" for k in ks]
        for m in res.modules
    ]
    out.print(table(out, "modules", head, rows))
    out.print(
        safe(
            f"{len(res.modules)} modules at {res.criterion} (max rank {res.max_rank}): adapter parameters "
            f"{res.adapter_parameters:,}, factors {human_bytes(res.adapter_bytes)}"
        )
    )
    if any(m.capped for m in res.modules):
        out.print(safe("  *: --max-rank (or the matrix size) stopped short of the criterion"))
    if res.skipped:
        out.print(safe(f"  {len(res.skipped)} changed tensor(s) not analysed (see --json: skipped)"))
    if res.plot is not None:
        out.print("[green]wrote[/green] " + safe(f"{res.plot} (relative error vs rank per group, SVG)"))


# -- batch -----------------------------------------------------------------------------------------------------
def batch_rows(jobs: list[Any]) -> list[list[str]]:
    """One row per job (an ``Outcome``): name, command, status, seconds, output, and its error line if it failed."""
    rows = []
    for j in jobs:
        secs = "" if j.seconds is None else f"{j.seconds:.1f}"
        rows.append([j.name, j.command, j.status, secs, j.output or "", j.error or ""])
    return rows


BATCH_HEAD = ["job", "command", "status", "s", "output", "error"]


class BatchLive:
    """The live table of a batch on a terminal (stderr, redrawn as jobs change, gone when it ends: the final table
    is printed by :func:`batch`).  Off a terminal, or with ``--json``, it does nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._live: Any = None

    def __enter__(self) -> BatchLive:
        if self.enabled:
            from rich.live import Live

            self._live = Live(console=err, transient=True, refresh_per_second=4)
            self._live.__enter__()
        return self

    def update(self, jobs: list[Any]) -> None:
        if self._live is not None:
            counts: dict[str, int] = {}
            for j in jobs:
                counts[j.status] = counts.get(j.status, 0) + 1
            title = "batch: " + ", ".join(f"{n} {s}" for s, n in counts.items())
            self._live.update(table(err, title, BATCH_HEAD, batch_rows(jobs)))

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)


def batch(res: Any) -> None:
    """``batch``: every job's status in one table, then each failure as its own ``error:`` line (grep-able, as the
    single command prints it), then the counts."""
    rows = [r[:5] for r in batch_rows(res.jobs)]
    out.print(table(out, f"batch ({res.runner}, {res.workers} at once)", BATCH_HEAD[:5], rows))
    batch_errors(res)
    counts = ", ".join(f"{n} {s}" for s, n in res.counts().items())
    click.echo(f"{'ok' if res.ok else 'not ok'}: {len(res.jobs)} jobs: {counts} in {res.seconds:.1f} s")


def batch_errors(res: Any) -> None:
    """Each failed (or blocked) job as its own ``error: job NAME: ...`` line on stderr, also under ``--json``."""
    for j in res.jobs:
        if j.error:
            click.echo(escape_controls(f"error: job {j.name}: {j.error}"), err=True)
