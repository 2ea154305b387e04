"""The ``lora-convert`` command: parse arguments, call the API, print. Nothing else lives here."""

from __future__ import annotations

import gc
import shlex
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, NoReturn

import click
from rich.console import Console

from . import api
from .bounds import MAX_SEED, MAX_SEQ_LEN
from .cli_output import document, dumps, error_document, fit_console, table
from .errors import LoraConvertError, OptionError
from .fmt import form_word, human_bytes, ranges
from .text import escape_controls, safe

# Every name we print comes from a file: it goes through safe() (control characters escaped, rich
# markup neutralised; cli_output.table does it for every cell); emoji codes (":cake:") print as written.
out = Console(emoji=False)
err = Console(stderr=True, soft_wrap=True, emoji=False)  # one warning, one line (grep-able, like error:)
BUG_HINT = "this is a bug in lora-convert: please report it with the command line; --debug shows the traceback"
JSON_KEY = "lora_convert.json"  # ctx.meta: the command line asked for --json


def _command_line() -> str:
    """The command line for the model card, with a --token value blanked out."""
    args, hide = [], False
    for a in sys.argv[1:]:
        args.append("***" if hide else ("--token=***" if a.startswith("--token=") else a))
        hide = a == "--token"
    return "lora-convert " + " ".join(shlex.quote(a) for a in args)


def run_guarded(fn: Callable[[], Any], debug: bool | Callable[[], bool], as_json: bool = False) -> Any:
    """Turn every exception into one ``error:`` line (under --json, an error document on stdout too): ours and
    the environment's (exit 1; an option's bad value, :class:`OptionError`, exit 2 as a usage error), Ctrl-C (exit 130), anything else as a bug to report (exit 1).  ``--debug``
    (``debug``: a flag, or a function asked when something failed) re-raises."""
    try:
        return fn()
    except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
        raise
    except (LoraConvertError, KeyboardInterrupt, MemoryError, Exception) as exc:
        if debug() if callable(debug) else debug:
            raise
        _fail_on(exc, as_json)


def _fail_on(exc: BaseException, as_json: bool) -> NoReturn:
    if isinstance(exc, LoraConvertError):
        _fail(exc, 2 if isinstance(exc, OptionError) else 1, exc.for_cli(), as_json)
    if isinstance(exc, KeyboardInterrupt):
        where = getattr(exc, "output_target", None)  # set by AtomicOutput on its way out
        _fail(exc, 130, f"{where + ': ' if where else ''}interrupted; nothing was written", as_json, "Interrupted")
    if isinstance(exc, MemoryError):
        _fail(exc, 1, "out of memory", as_json)
    if isinstance(exc, OSError):  # the environment (permissions, a name too long, I/O errors), not a bug
        what = exc.strerror or type(exc).__name__
        _fail(exc, 1, f"{exc.filename}: {what}" if exc.filename else what, as_json)
    text = " ".join(str(exc).split())[:300]  # the last line of defence: one line, not a traceback
    _fail(exc, 1, f"internal error ({type(exc).__name__}{': ' + text if text else ''}); {BUG_HINT}", as_json)


def _fail(exc: BaseException, code: int, text: str, as_json: bool, type_name: str | None = None) -> NoReturn:
    text = escape_controls(text)
    if as_json:
        click.echo(dumps(error_document(exc, code, message=text, type_name=type_name)))
    click.echo(f"error: {text}", err=True)
    sys.exit(code)


def _print_json(kind: str, obj: dict[str, Any]) -> None:
    click.echo(dumps(document(kind, obj)))


class _Main(click.Group):
    """The command group.  Under ``--json`` a usage error is an error document on stdout too (exit 2)."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        wants = "--json" in args
        try:
            ctx = super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            _usage_error(exc, wants)
        ctx.meta[JSON_KEY] = wants
        return ctx

    def invoke(self, ctx: click.Context) -> Any:
        """Every command runs guarded, so that printing a result (a name rich cannot render, a terminal that
        cannot encode it) can no more print a traceback than the work itself."""

        def go() -> Any:
            try:
                return super(_Main, self).invoke(ctx)
            except click.UsageError as exc:
                _usage_error(exc, ctx.meta.get(JSON_KEY, False))

        return run_guarded(go, lambda: _debug(ctx), ctx.meta.get(JSON_KEY, False))


def _usage_error(exc: click.UsageError, as_json: bool) -> NoReturn:
    if not as_json:
        raise exc
    click.echo(dumps(error_document(exc, exc.exit_code, message=exc.format_message(), type_name="UsageError")))
    exc.show()
    raise click.exceptions.Exit(exc.exit_code)


def _debug_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--debug`` after the command too (``detect X --debug``), where users look for it."""

    def turn_on(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value:
            ctx.ensure_object(dict)["debug"] = True

    return click.option(
        "--debug",
        is_flag=True,
        expose_value=False,
        callback=turn_on,
        help="Show tracebacks instead of one-line errors.",
    )(f)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lora-convert")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Detect, convert, merge and extract LoRA checkpoints, tensor by tensor."""
    ctx.obj = {"debug": debug}
    fit_console(out)
    fit_console(err, soft_wrap=True)
    # Everything imported so far (torch alone is ~10^6 objects) lives for the whole run: move it
    # out of the collector's sight, or every full collection re-walks it (~4% of a merge's CPU).
    gc.freeze()


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.obj and ctx.obj.get("debug"))


@main.command()
@click.argument("path")
@click.option("--base", help="Compare a full model (no LoRA tensors) with this base (reads tensor data).")
@click.option("--adapter", help="Adapter name, for folders with several.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (docs/json.md).")
@_debug_option
@click.pass_context
def detect(ctx: click.Context, path: str, base: str | None, adapter: str | None, as_json: bool) -> None:
    """Say which form PATH is in (adapter, unmerged, or a full model: with --base, base / merged / fine-tuned)."""
    res = run_guarded(lambda: api.detect(path, base=base, adapter=adapter), _debug(ctx), as_json)
    if as_json:
        _print_json("detect", res.to_dict())
        return
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
        rows = [
            [
                g.name,
                str(g.count),
                ranges(g.layers) if g.layers else "-",
                ",".join(map(str, g.ranks)),
                ",".join(f"{x:g}" for x in g.alphas) or "?",
                ",".join(f"{x:g}" for x in g.scalings) or "?",
            ]
            for g in a.modules
        ]
        head = ["module", "count", "layers", "rank", "alpha", "scaling"]
        out.print(table(out, f"adapter '{a.name}'", head, rows))
        if a.experts:
            _print_experts(a.experts)
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


def _print_experts(groups: list[Any]) -> None:
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


_push_options = [
    click.option(
        "--push-to",
        help="Push the output folder to this Hub repo id once written (token and write access checked first).",
    ),
    click.option("--private", is_flag=True, help="With --push-to: create the repo private."),
    click.option("--token", help="Hub token for the push (default: HF_TOKEN or `hf auth login`); never printed."),
]


def _conversion_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options: list[Callable[[Any], Any]] = [
        click.option("-o", "--output", required=True, help="Output folder (created atomically)."),
        click.option("--base", help="Base model folder or Hub repo id."),
        click.option(
            "--adapter",
            "adapters",
            multiple=True,
            help="Adapter name, for checkpoints with several; or REF[:WEIGHT], repeatable: adapters (folders, "
            "Hub ids, names inside SOURCE) whose weighted ΔW is merged in one pass, or subtracted with "
            "--to base (unmerge).",
        ),
        click.option(
            "--dtype",
            type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
            default="auto",
            show_default=True,
            help="Output dtype of floating tensors (auto: the base's).",
        ),
        click.option("--max-shard-size", default="5GB", show_default=True, help="Shard limit, decimal units."),
        click.option("--force", is_flag=True, help="Replace an existing output folder."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON document (docs/json.md)."),
        *_push_options,
        _debug_option,
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _adapter_args(adapters: tuple[str, ...]) -> dict[str, Any]:
    """One --adapter is a name or a REF[:WEIGHT] (the API tells which); several are a stack."""
    if len(adapters) == 1:
        return {"adapter": adapters[0]}
    return {"adapters": list(adapters)} if adapters else {}


def _report_conversion(res: Any, as_json: bool) -> None:
    if as_json:
        _print_json("conversion", res.to_dict())
        return
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
    if res.unmerge is not None:
        for line in res.unmerge.summary_lines():
            out.print(safe("  " + line))
    for d in res.dropped:
        out.print(safe(f"  dropped: {d['tensor']} ({d['reason']})"))
    for w in res.warnings:
        err.print(f"[yellow]warning:[/yellow] {safe(w)}")
    if res.pushed is not None:
        out.print(f"[green]pushed[/green] {safe(res.output)} -> {safe(res.pushed.commit_url)}")


SEED = click.IntRange(0, MAX_SEED)  # torch's generators take 64-bit seeds: beyond, a usage error (exit 2)


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
            click.option("--seed", type=SEED, help="Seed of the randomized SVD.  [default: 0]"),
            click.option(
                "--factor-dtype",
                type=click.Choice(["fp32", "bf16", "fp16"]),
                help="dtype of the written LoRA factors (the error is measured on them).  [default: fp32]",
            ),
        ]
    ):
        f = opt(f)
    return f


def _moe_layout_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--moe-layout",
        type=click.Choice(["per-expert", "fused"]),
        help="Expert LoRA in the adapter written: one module per expert, or fused (PEFT target_parameters).",
    )(f)


def _given(**opts: Any) -> dict[str, Any]:
    """The extraction options the user actually gave (click passes None / () for the others), as the
    API takes them: --factor-dtype is extract(dtype=...), repeated options are lists.  extract()
    supplies the defaults of the rest."""
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items() if v is not None and v != ()}
    if "factor_dtype" in out:
        out["dtype"] = out.pop("factor_dtype")
    return out


def _print_extract(res: Any, as_json: bool) -> None:
    if as_json:
        _report_conversion(res, True)
        return
    rows = [
        [m.label, f"{m.shape[0]}x{m.shape[1]}", f"{m.rank}{'*' if m.capped else ''}"]
        + [f"{m.energy:.6f}", f"{m.error:.3e}", m.method]
        for m in res.extraction.modules
    ]
    head = ["module", "shape", "rank", "energy kept", "rel. error", "svd"]
    out.print(table(out, "extracted modules", head, rows))
    for line in res.extraction.summary_lines(res.total_bytes):
        out.print(safe(line))
    _report_conversion(res, False)


@main.command()
@click.argument("source")
@click.option(
    "--to",
    "to",
    required=True,
    type=click.Choice(["merged", "adapter", "unmerged", "base", "gguf", "mlx", "kohya", "diffusers"]),
    help="Target form; gguf: a llama.cpp LoRA file, mlx: an mlx-lm adapter folder, kohya: an sd-scripts/ComfyUI "
    "LoRA file (-o NAME.safetensors: that one file), diffusers: diffusers' LoRA file.",
)
@_conversion_options
@click.option(
    "--outtype",
    type=click.Choice(["f32", "f16", "bf16", "q8_0"]),
    help="With --to gguf: the tensor type (q8_0 falls back to f16 where rows are not a multiple of 32).  [default: f32]",
)
@click.option(
    "--drop-norms",
    is_flag=True,
    help="With --to gguf: leave out the norm weights an adapter saves whole (mergekit writes them; GGUF LoRA "
    "cannot carry them and llama.cpp ignores them) and list them; without it such an adapter is refused.",
)
@_extraction_options
@_moe_layout_option
@click.pass_context
def convert(
    ctx: click.Context,
    source: str,
    to: str,
    output: str,
    base: str | None,
    adapters: tuple[str, ...],
    dtype: str,
    max_shard_size: str,
    force: bool,
    as_json: bool,
    push_to: str | None,
    private: bool,
    token: str | None,
    outtype: str | None,
    drop_norms: bool,
    moe_layout: str | None,
    **svd_opts: Any,
) -> None:
    """Convert SOURCE to another storage form.

    A plain (merged or fine-tuned) SOURCE with --to adapter --base BASE is extracted by SVD and
    takes the extraction options (--rank, --energy, ...); they are refused on every other route.
    --to gguf (with --base, whose config.json alone is read) writes one llama.cpp adapter file;
    --to mlx an mlx-lm adapter folder; an mlx-lm adapter --to adapter becomes a PEFT adapter.
    A PEFT adapter SOURCE with --to adapter --moe-layout per-expert|fused gets its expert LoRA in the
    other layout (PEFT target_parameters <-> one LoRA module per expert).
    """
    given = _given(**svd_opts)
    if push_to and to == "gguf":
        raise click.UsageError("--push-to uploads a folder; upload the .gguf file with `hf upload REPO FILE`")
    res = run_guarded(
        lambda: api.convert(
            source,
            to,
            output=output,
            base=base,
            **_adapter_args(adapters),
            dtype=dtype,
            max_shard_size=max_shard_size,
            force=force,
            progress=not as_json and err.is_terminal,
            command=_command_line(),
            extract_options=given or None,
            outtype=outtype,
            drop_norms=drop_norms,
            moe_layout=moe_layout,
            push_to=push_to,
            private=private,
            token=token,
        ),
        _debug(ctx),
        as_json,
    )
    if res.extraction is not None:  # the SVD route
        _print_extract(res, as_json)
    else:
        _report_conversion(res, as_json)


@main.command()
@click.argument("source")
@_conversion_options
@click.option(
    "--requantize",
    is_flag=True,
    help="Quantized base: write the merged weights back in its scheme (default: dequantized, --dtype).",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Where the fp32 merge tiles are computed: cpu or cuda[:N] (blocks still stream from and to the disk).",
)
@click.pass_context
def merge(
    ctx: click.Context,
    source: str,
    output: str,
    base: str | None,
    adapters: tuple[str, ...],
    dtype: str,
    max_shard_size: str,
    force: bool,
    as_json: bool,
    push_to: str | None,
    private: bool,
    token: str | None,
    requantize: bool,
    device: str,
) -> None:
    """Fold LoRA into the base weights (SOURCE: an adapter with --base, or an unmerged checkpoint).

    Several adapters: merge BASE --adapter A --adapter B:0.5 folds the weighted sum of their deltas
    in one fp32 pass, rounded once (PEFT: the adapters loaded and active together, set_scale for the
    weights).  SOURCE may also be an adapter (with --base): it comes first, with weight 1.

    A quantized base (fp8, compressed-tensors fp8, bitsandbytes 4/8-bit, MXFP4) is dequantized block by
    block; with --requantize the merged weights are quantized again in its scheme."""
    res = run_guarded(
        lambda: api.merge(
            source,
            output=output,
            base=base,
            **_adapter_args(adapters),
            dtype=dtype,
            max_shard_size=max_shard_size,
            force=force,
            progress=not as_json and err.is_terminal,
            command=_command_line(),
            push_to=push_to,
            private=private,
            token=token,
            requantize=requantize,
            device=device,
        ),
        _debug(ctx),
        as_json,
    )
    if res.requantization is not None and not as_json:
        _print_requantization(res.requantization)
    _report_conversion(res, as_json)


def _print_requantization(rq: Any) -> None:
    head, rows = rq.table()
    title = f"re-quantized ({rq.scheme}); {rq.copied} untouched quantized weights copied"
    out.print(table(out, title, head, rows))


@main.command("combine")
@click.argument("adapters", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="Output adapter folder (created atomically).")
@click.option(
    "--method",
    required=True,
    help="cat (exact: dW = sum of w*dW_i; rank = sum of ranks), linear, ties, dare_linear, dare_ties, "
    "magnitude_prune (on the factors A and B separately: equal ranks needed, dW gets cross terms), or svd, "
    "ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd (on each dW_i, then truncated by SVD).",
)
@click.option("--weights", multiple=True, help="One weight per adapter: 0.7,-0.4 (or repeat the option).")
@click.option("--density", type=float, help="Fraction kept by ties, dare_* and magnitude_prune, in (0, 1].")
@click.option("--rank", type=int, help="Rank of the svd methods' result.  [default: the largest source rank]")
@click.option(
    "--seed",
    type=SEED,
    default=0,
    show_default=True,
    help="dare's random masks: the same as torch.manual_seed(SEED) just before PEFT's add_weighted_adapter.",
)
@click.option("--svd-clamp", type=float, help="PEFT's svd_clamp: clamp both factors at this quantile.")
@click.option(
    "--majority-sign",
    type=click.Choice(["total", "frequency"]),
    default="total",
    show_default=True,
    help="ties' sign election.",
)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (docs/json.md).")
@_debug_option
@click.pass_context
def combine_cmd(
    ctx: click.Context,
    adapters: tuple[str, ...],
    output: str,
    method: str,
    weights: tuple[str, ...],
    density: float | None,
    rank: int | None,
    seed: int,
    svd_clamp: float | None,
    majority_sign: str,
    force: bool,
    as_json: bool,
) -> None:
    """Combine ADAPTERS (each REF[:WEIGHT]) into one adapter, as PEFT's add_weighted_adapter does.

    The result is bit-identical to PEFT's (fp32 factors, r = lora_alpha = the new rank, the union of the
    targets) and is built one module at a time.  What PEFT gets wrong is refused with the reason: DoRA,
    modules_to_save and lora_bias adapters; rsLoRA sources are written with use_rslora false.
    """
    res = run_guarded(
        lambda: api.combine(
            list(adapters),
            output=output,
            method=method,
            weights=list(weights),
            density=density,
            rank=rank,
            seed=seed,
            svd_clamp=svd_clamp,
            majority_sign=majority_sign,
            force=force,
            progress=not as_json and err.is_terminal,
            command=_command_line(),
        ),
        _debug(ctx),
        as_json,
    )
    _report_conversion(res, as_json)


SLACK_HELP = (
    "Tolerance, as a multiple of each element's error bound: the most two correct computations of the merge "
    "may differ by, from the magnitudes of BASE's weight and of each s*|B|*|A| term (fp32 dot products in any "
    "order), DoRA's norm, and the rounding to MERGED's dtype, PEFT's roundings of dW and after each adapter "
    "included (README: verify).  Every correct merge is within 1; a wrong one is off by many.  0 to 1e6."
)
ULPS_HELP = (
    "Ulps of MERGED's dtype allowed beyond the bound (an ulp: the gap between neighbouring numbers at the "
    "element's magnitude; bf16 2^-8 to 2^-7 of it).  0 to 1e6.  Neither option widens an element's tolerance "
    "beyond 1/16 of its magnitude."
)


@main.command("verify")
@click.argument("merged")
@click.option("--base", required=True, help="The base model the merge started from (folder or Hub repo id).")
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    required=True,
    help="The adapter merged, REF[:WEIGHT]; repeat it for several adapters merged together.",
)
@click.option(
    "--slack",
    type=click.FloatRange(0, api.VERIFY_TOLERANCE_MAX),
    default=1.0,
    show_default=True,
    metavar="K",
    help=SLACK_HELP,
)
@click.option(
    "--ulps",
    type=click.FloatRange(0, api.VERIFY_TOLERANCE_MAX),
    default=0.0,
    show_default=True,
    metavar="N",
    help=ULPS_HELP,
)
@click.option(
    "--logits",
    is_flag=True,
    help="Also compare MERGED's logits with PEFT's unmerged model on a few tokens (needs transformers "
    "and peft, and memory for two fp32 copies of the model; skipped otherwise).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document, every tensor (docs/json.md).")
@_debug_option
@click.pass_context
def verify_cmd(
    ctx: click.Context,
    merged: str,
    base: str,
    adapters: tuple[str, ...],
    slack: float,
    ulps: float,
    logits: bool,
    as_json: bool,
) -> None:
    """Check that MERGED is BASE with the adapter merged in, tensor by tensor (exit 0: all ok, 1: not).

    Each tensor is ok (every element within its error bound), not applied (equals the base), wrong scale
    (equals base + c*dW with c measurably not 1, printed with its uncertainty: sqrt(r) means alpha/sqrt(r)
    was used for alpha/r), changed outside the adapter, mismatch, not finite (NaN or Inf in MERGED), shape
    mismatch, missing or unexpected.  The three checkpoints are streamed: memory stays flat.
    """
    res = run_guarded(
        lambda: api.verify(
            merged,
            base=base,
            adapters=list(adapters),
            slack=slack,
            ulps=ulps,
            logits=logits,
            progress=not as_json and err.is_terminal,
        ),
        _debug(ctx),
        as_json,
    )
    if as_json:
        _print_json("verify", res.to_dict())
    else:
        bad = [[c.tensor, c.status, c.detail] for c in res.checks if c.status != "ok"]
        if bad:
            out.print(table(out, "tensors that are not ok", ["tensor", "status", "detail"], bad))
        for w in res.warnings:
            err.print(f"[yellow]warning:[/yellow] {safe(w)}")
        click.echo(("ok: " if res.ok else "not ok: ") + escape_controls(res.summary()))
    sys.exit(0 if res.ok else 1)


@main.command("report")
@click.argument("path")
@click.option("--base", help="Base model (folder with weights, or only config.json) for an adapter.")
@click.option("--adapter", help="Adapter name, for checkpoints with several.")
@click.option(
    "--seq-len",
    type=click.IntRange(1, MAX_SEQ_LEN),
    default=2048,
    show_default=True,
    help="Context length for the attention FLOPs.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (docs/json.md).")
@click.option("--markdown", is_flag=True, help="Print Markdown tables for a model card.")
@_debug_option
@click.pass_context
def report_cmd(
    ctx: click.Context, path: str, base: str | None, adapter: str | None, seq_len: int, as_json: bool, markdown: bool
) -> None:
    """Parameters, bytes on disk and FLOPs per token of PATH in every form (headers only)."""
    from .costs import assumption_lines, form_table, module_table, report_markdown

    if as_json and markdown:
        raise click.UsageError("--json and --markdown are exclusive")
    rep = run_guarded(lambda: api.report(path, base=base, seq_len=seq_len, adapter=adapter), _debug(ctx), as_json)
    if as_json:
        _print_json("report", rep.to_dict())
        return
    if markdown:
        click.echo("\n".join(escape_controls(ln) for ln in report_markdown(rep).split("\n")), nl=False)
        return
    head, rows = form_table(rep)  # transposed: one column per form fits a terminal
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


@main.command()
@click.argument("tuned")
@click.option("--base", required=True, help="Base model folder or Hub repo id.")
@click.option("-o", "--output", required=True, help="Output adapter folder (created atomically).")
@_extraction_options
@_moe_layout_option
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (docs/json.md).")
@_push_options[0]
@_push_options[1]
@_push_options[2]
@_debug_option
@click.pass_context
def extract(
    ctx: click.Context,
    tuned: str,
    base: str,
    output: str,
    moe_layout: str | None,
    force: bool,
    as_json: bool,
    push_to: str | None,
    private: bool,
    token: str | None,
    **svd_opts: Any,
) -> None:
    """Extract a LoRA adapter from TUNED minus BASE by SVD of every changed weight."""
    res = run_guarded(
        lambda: api.extract(
            tuned,
            base=base,
            output=output,
            force=force,
            progress=not as_json and err.is_terminal,
            command=_command_line(),
            moe_layout=moe_layout,
            push_to=push_to,
            private=private,
            token=token,
            **_given(**svd_opts),
        ),
        _debug(ctx),
        as_json,
    )
    _print_extract(res, as_json)


@main.command()
@click.argument("folder")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", help="Branch to push to (created from main if missing).")
@click.option("--message", help="Commit message.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of pushing to the branch.")
@click.option("--force", is_flag=True, help="Push even a folder that does not look like a complete output.")
@click.option("--token", help="Hub token (default: HF_TOKEN or `hf auth login`); never printed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (docs/json.md).")
@_debug_option
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
    token: str | None,
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
            progress=not as_json and err.is_terminal,
            token=token,
        ),
        _debug(ctx),
        as_json,
    )
    if as_json:
        _print_json("push", asdict(res))
    else:
        out.print(f"[green]pushed[/green] {safe(folder)} -> {safe(res.commit_url)}")


if __name__ == "__main__":  # pragma: no cover
    main()
