"""The ``lora-convert`` command: parse arguments, call the API, print. Nothing else lives here."""

from __future__ import annotations

import gc
import json
import shlex
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from . import api
from .errors import LoraConvertError
from .fmt import human_bytes, ranges
from .text import escape_controls, safe

# Every name we print comes from a file: it goes through safe() (control characters escaped, rich
# markup neutralised); emoji codes (":cake:") are printed as written.
out = Console(emoji=False)
err = Console(stderr=True, soft_wrap=True, emoji=False)  # one warning, one line (grep-able, like error:)
BUG_HINT = "this is a bug in lora-convert: please report it with the command line; --debug shows the traceback"


def _command_line() -> str:
    return "lora-convert " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _fail(line: str, code: int = 1) -> None:
    click.echo("error: " + escape_controls(line), err=True)
    sys.exit(code)


def run_guarded(fn: Callable[[], Any], debug: bool) -> Any:
    """Turn every exception into one ``error:`` line: ours and the environment's (exit 1), Ctrl-C
    (exit 130), and anything else as a bug to report (exit 1).  ``--debug`` re-raises."""
    try:
        return fn()
    except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
        raise
    except LoraConvertError as exc:
        if debug:
            raise
        _fail(str(exc))
    except KeyboardInterrupt as exc:
        if debug:
            raise
        where = getattr(exc, "output_target", None)  # set by AtomicOutput on its way out
        _fail(f"{where + ': ' if where else ''}interrupted; nothing was written", 130)
    except MemoryError:
        if debug:
            raise
        _fail("out of memory", 1)
    except OSError as exc:  # the environment (permissions, a name too long, I/O errors), not a bug
        if debug:
            raise
        what = exc.strerror or type(exc).__name__
        _fail(f"{exc.filename}: {what}" if exc.filename else what)
    except Exception as exc:  # the last line of defence: one line, not a traceback
        if debug:
            raise
        text = " ".join(str(exc).split())[:300]
        _fail(f"internal error ({type(exc).__name__}{': ' + text if text else ''}); {BUG_HINT}")


class _GuardedGroup(click.Group):
    """Runs every command under :func:`run_guarded`, so that printing a result (a name rich cannot
    render, a terminal that cannot encode it) can no more print a traceback than the work itself."""

    def invoke(self, ctx: click.Context) -> Any:
        return run_guarded(lambda: super(_GuardedGroup, self).invoke(ctx), bool(ctx.params.get("debug")))


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group(cls=_GuardedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lora-convert")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Detect, convert, merge and extract LoRA checkpoints, tensor by tensor."""
    ctx.obj = {"debug": debug}
    # Everything imported so far (torch alone is ~10^6 objects) lives for the whole run: move it
    # out of the collector's sight, or every full collection re-walks it (~4% of a merge's CPU).
    gc.freeze()


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.obj and ctx.obj.get("debug"))


@main.command()
@click.argument("path")
@click.option("--base", help="Compare a plain checkpoint with this base (reads tensor data).")
@click.option("--adapter", help="Adapter name, for folders with several.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def detect(ctx: click.Context, path: str, base: str | None, adapter: str | None, as_json: bool) -> None:
    """Say which form PATH is in (adapter, unmerged, plain / base / merged) and why."""
    res = run_guarded(lambda: api.detect(path, base=base, adapter=adapter), _debug(ctx))
    if as_json:
        _print_json(res.to_dict())
        return
    out.print(f"[bold]form:[/bold] {safe(res.form)}" + (f" ({safe(res.dialect)})" if res.dialect != "peft" else ""))
    out.print(
        safe(
            f"files: {', '.join(res.files)} ({res.layout}); {res.tensors} tensors, {human_bytes(res.total_bytes)}; "
            + ", ".join(f"{k} {human_bytes(v)}" for k, v in res.dtypes.items())
        )
    )
    for a in res.adapters:
        t = Table(title=safe(f"adapter '{a.name}'"), show_lines=False)
        for col in ("module", "count", "layers", "rank", "alpha", "scaling"):
            t.add_column(col)
        for g in a.modules:
            layers = ranges(g.layers) if g.layers else "-"
            t.add_row(
                *_cells(
                    g.name,
                    g.count,
                    layers,
                    ",".join(map(str, g.ranks)),
                    ",".join(f"{x:g}" for x in g.alphas) or "?",
                    ",".join(f"{x:g}" for x in g.scalings) or "?",
                )
            )
        out.print(t)
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
    if res.differs_from_base:
        shown = ", ".join(res.differs_from_base[:8])
        more = f" and {len(res.differs_from_base) - 8} more" if len(res.differs_from_base) > 8 else ""
        out.print(safe(f"differs from base: {shown}{more}"))
    if res.base_comparison and res.base_comparison.get("summary"):
        out.print(safe(res.base_comparison["summary"]))
    for w in res.warnings:
        err.print(f"[yellow]warning:[/yellow] {safe(w)}")


def _cells(*values: Any) -> list[str]:
    """Table cells: rich renders markup in cells, so every value is made safe."""
    return [safe(v) for v in values]


def _conversion_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(
        [
            click.option("-o", "--output", required=True, help="Output folder (created atomically)."),
            click.option("--base", help="Base model folder or Hub repo id."),
            click.option("--adapter", help="Adapter name, for checkpoints with several."),
            click.option(
                "--dtype",
                type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
                default="auto",
                show_default=True,
                help="Output dtype of floating tensors (auto: the base's).",
            ),
            click.option("--max-shard-size", default="5GB", show_default=True, help="Shard limit, decimal units."),
            click.option("--force", is_flag=True, help="Replace an existing output folder."),
            click.option("--json", "as_json", is_flag=True, help="Print a JSON summary."),
            click.option("--push-to", help="Push the output folder to this Hub repo id afterwards."),
            click.option("--private", is_flag=True, help="With --push-to: create the repo private."),
        ]
    ):
        f = opt(f)
    return f


def _report_conversion(res: Any, as_json: bool, pushed: Any = None) -> None:
    if as_json:
        d = res.to_dict()
        if pushed is not None:
            d["pushed"] = pushed.__dict__ if hasattr(pushed, "__dict__") else pushed
        _print_json(d)
        return
    out.print(
        "[green]wrote[/green] "
        + safe(
            f"{res.output} ({res.target_form}, from {res.source_form}): {res.tensors} tensors, "
            f"{human_bytes(res.total_bytes)} in {res.seconds:.1f} s"
        )
    )
    if res.ops:
        out.print(safe("  " + ", ".join(f"{k}: {v}" for k, v in sorted(res.ops.items()))))
    for k, v in res.config_changes.items():
        out.print(safe(f"  config.json: {k} = {v}"))
    for w in res.warnings:
        err.print(f"[yellow]warning:[/yellow] {safe(w)}")
    if pushed is not None:
        out.print(f"[green]pushed[/green] {safe(getattr(pushed, 'commit_url', pushed))}")


def _maybe_push(folder: str, push_to: str | None, private: bool) -> Any:
    if not push_to:
        return None
    return api.push(folder, push_to, private=private, progress=False)


def _extraction_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The SVD options, shared by ``extract`` and ``convert --to adapter`` (defaults applied by the API)."""
    for opt in reversed(
        [
            click.option(
                "--rank", type=int, help="Fixed rank per module (default 16 when no other criterion is given)."
            ),
            click.option("--energy", type=float, help="Smallest rank keeping this fraction of ||dW||_F^2, e.g. 0.95."),
            click.option("--max-error", type=float, help="Smallest rank with relative Frobenius error at most this."),
            click.option("--max-rank", type=int, help="Cap on every module's rank.  [default: 128]"),
            click.option("--include", multiple=True, help="Only modules whose path matches this regex (repeatable)."),
            click.option(
                "--exclude", multiple=True, help="Leave out modules whose path matches this regex (repeatable)."
            ),
            click.option("--layers", help="Only these decoder layers, e.g. 0-15,20."),
            click.option(
                "--embeddings",
                type=click.Choice(["lora", "full", "skip"]),
                help="Embeddings and lm_head: factor, save whole (modules_to_save), or leave out.  [default: lora]",
            ),
            click.option(
                "--save-other",
                is_flag=True,
                default=None,
                help="Save modules whose norms/biases changed whole (modules_to_save).",
            ),
            click.option("--svd", type=click.Choice(["auto", "exact", "randomized"]), help="[default: auto]"),
            click.option("--device", help="cpu or cuda.  [default: cpu]"),
            click.option("--seed", type=int, help="Seed of the randomized SVD.  [default: 0]"),
            click.option(
                "--factor-dtype",
                type=click.Choice(["fp32", "bf16", "fp16"]),
                help="dtype of the written LoRA factors (the error is measured on them).  [default: fp32]",
            ),
        ]
    ):
        f = opt(f)
    return f


def _given(**opts: Any) -> dict[str, Any]:
    """The extraction options the user actually gave (click passes None / () for the others), as the
    API takes them: --factor-dtype is extract(dtype=...), repeated options are lists.  extract()
    supplies the defaults of the rest."""
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items() if v is not None and v != ()}
    if "factor_dtype" in out:
        out["dtype"] = out.pop("factor_dtype")
    return out


def _print_extract(res: Any, as_json: bool, pushed: Any) -> None:
    if as_json:
        _report_conversion(res, True, pushed)
        return
    t = Table(title="extracted modules")
    for col in ("module", "shape", "rank", "energy kept", "rel. error", "svd"):
        t.add_column(col)
    for m in res.extraction.modules:
        t.add_row(
            *_cells(
                m.module,
                f"{m.shape[0]}x{m.shape[1]}",
                f"{m.rank}{'*' if m.capped else ''}",
                f"{m.energy:.6f}",
                f"{m.error:.3e}",
                m.method,
            )
        )
    out.print(t)
    for line in res.extraction.summary_lines(res.total_bytes):
        out.print(safe(line))
    _report_conversion(res, False, pushed)


@main.command()
@click.argument("source")
@click.option(
    "--to",
    "to",
    required=True,
    type=click.Choice(["merged", "adapter", "unmerged", "base", "gguf", "mlx"]),
    help="Target form; gguf: a llama.cpp LoRA file, mlx: an mlx-lm adapter folder.",
)
@_conversion_options
@click.option(
    "--outtype",
    type=click.Choice(["f32", "f16", "bf16", "q8_0"]),
    help="With --to gguf: the tensor type (q8_0 falls back to f16 where rows are not a multiple of 32).  [default: f32]",
)
@_extraction_options
@click.pass_context
def convert(
    ctx: click.Context,
    source: str,
    to: str,
    output: str,
    base: str | None,
    adapter: str | None,
    dtype: str,
    max_shard_size: str,
    force: bool,
    as_json: bool,
    push_to: str | None,
    private: bool,
    outtype: str | None,
    **svd_opts: Any,
) -> None:
    """Convert SOURCE to another storage form.

    A plain (merged or fine-tuned) SOURCE with --to adapter --base BASE is extracted by SVD and
    takes the extraction options (--rank, --energy, ...); they are refused on every other route.
    --to gguf (with --base, whose config.json alone is read) writes one llama.cpp adapter file;
    --to mlx an mlx-lm adapter folder; an mlx-lm adapter --to adapter becomes a PEFT adapter.
    """
    given = _given(**svd_opts)
    if push_to and to == "gguf":
        raise click.UsageError("--push-to uploads a folder; upload the .gguf file with `hf upload REPO FILE`")

    def go() -> Any:
        res = api.convert(
            source,
            to,
            output=output,
            base=base,
            adapter=adapter,
            dtype=dtype,
            max_shard_size=max_shard_size,
            force=force,
            progress=not as_json and err.is_terminal,
            command=_command_line(),
            extract_options=given or None,
            outtype=outtype,
        )
        return res, _maybe_push(output, push_to, private)

    res, pushed = run_guarded(go, _debug(ctx))
    if res.extraction is not None:  # the SVD route
        _print_extract(res, as_json, pushed)
    else:
        _report_conversion(res, as_json, pushed)


@main.command()
@click.argument("source")
@_conversion_options
@click.pass_context
def merge(
    ctx: click.Context,
    source: str,
    output: str,
    base: str | None,
    adapter: str | None,
    dtype: str,
    max_shard_size: str,
    force: bool,
    as_json: bool,
    push_to: str | None,
    private: bool,
) -> None:
    """Fold LoRA into the base weights (SOURCE: an adapter with --base, or an unmerged checkpoint)."""

    def go() -> Any:
        res = api.merge(
            source,
            output=output,
            base=base,
            adapter=adapter,
            dtype=dtype,
            max_shard_size=max_shard_size,
            force=force,
            progress=not as_json and err.is_terminal,
            command=_command_line(),
        )
        return res, _maybe_push(output, push_to, private)

    res, pushed = run_guarded(go, _debug(ctx))
    _report_conversion(res, as_json, pushed)


@main.command("report")
@click.argument("path")
@click.option("--base", help="Base model (folder with weights, or only config.json) for an adapter.")
@click.option("--adapter", help="Adapter name, for checkpoints with several.")
@click.option(
    "--seq-len",
    type=click.IntRange(min=1),
    default=2048,
    show_default=True,
    help="Context length for the attention FLOPs.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--markdown", is_flag=True, help="Print Markdown tables for a model card.")
@click.pass_context
def report_cmd(
    ctx: click.Context, path: str, base: str | None, adapter: str | None, seq_len: int, as_json: bool, markdown: bool
) -> None:
    """Parameters, bytes on disk and FLOPs per token of PATH in every form (headers only)."""
    from .costs import form_table, module_table, report_markdown

    if as_json and markdown:
        raise click.UsageError("--json and --markdown are exclusive")
    rep = run_guarded(lambda: api.report(path, base=base, seq_len=seq_len, adapter=adapter), _debug(ctx))
    if as_json:
        _print_json(rep.to_dict())
        return
    if markdown:
        click.echo("\n".join(escape_controls(ln) for ln in report_markdown(rep).split("\n")), nl=False)
        return
    head, rows = form_table(rep)
    t = Table(title=safe(f"{path} ({rep.source_form})"))  # transposed: one column per form fits a terminal
    t.add_column("")
    for r in rows:
        t.add_column(safe(r[0]), justify="right")
    for i, h in enumerate(head[1:], start=1):
        t.add_row(*_cells(h, *(r[i] for r in rows)))
    out.print(t)
    head, rows = module_table(rep)
    if rows:
        t = Table(title="LoRA modules")
        for h in head:
            t.add_column(safe(h))
        for r in rows:
            t.add_row(*_cells(*r))
        out.print(t)
    for n in rep.notes:
        err.print(f"note: {safe(n)}")


@main.command()
@click.argument("tuned")
@click.option("--base", required=True, help="Base model folder or Hub repo id.")
@click.option("-o", "--output", required=True, help="Output adapter folder (created atomically).")
@_extraction_options
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@click.option("--push-to", help="Push the output folder to this Hub repo id afterwards.")
@click.option("--private", is_flag=True, help="With --push-to: create the repo private.")
@click.pass_context
def extract(
    ctx: click.Context,
    tuned: str,
    base: str,
    output: str,
    force: bool,
    as_json: bool,
    push_to: str | None,
    private: bool,
    **svd_opts: Any,
) -> None:
    """Extract a LoRA adapter from TUNED minus BASE by SVD of every changed weight."""

    def go() -> Any:
        res = api.extract(
            tuned,
            base=base,
            output=output,
            force=force,
            progress=not as_json and err.is_terminal,
            command=_command_line(),
            **_given(**svd_opts),
        )
        return res, _maybe_push(output, push_to, private)

    res, pushed = run_guarded(go, _debug(ctx))
    _print_extract(res, as_json, pushed)


@main.command()
@click.argument("folder")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", help="Branch to push to (created from main if missing).")
@click.option("--message", help="Commit message.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of pushing to the branch.")
@click.option("--force", is_flag=True, help="Push even a folder that does not look like a complete output.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@click.pass_context
def push(
    ctx: click.Context,
    folder: str,
    repo_id: str,
    private: bool,
    revision: str | None,
    message: str | None,
    create_pr: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Push FOLDER (an output of ours) to the Hub as REPO_ID in one commit."""
    res = run_guarded(
        lambda: api.push(
            folder,
            repo_id,
            private=private,
            revision=revision,
            message=message,
            create_pr=create_pr,
            force=force,
            progress=not as_json,
        ),
        _debug(ctx),
    )
    if as_json:
        _print_json(res.__dict__)
    else:
        out.print(f"[green]pushed[/green] {safe(folder)} -> {safe(res.commit_url)}")


if __name__ == "__main__":  # pragma: no cover
    main()
