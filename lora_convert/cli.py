"""The ``lora-convert`` command: parse arguments, call the API, print the result (``render``).  Nothing else
lives here: how a failure prints is ``cli_output``'s, how a result reads is ``render``'s."""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import click

from . import api, cli_args, render
from .bounds import MAX_SEQ_LEN
from .cli_output import fit_console, run_guarded, usage_error
from .render import err, out

JSON_KEY = "lora_convert.json"  # ctx.meta: the command line asked for --json


class _Main(click.Group):
    """The command group.  Under ``--json`` a usage error is an error document on stdout too (exit 2)."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        wants = "--json" in args
        try:
            ctx = super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            usage_error(exc, wants)
        ctx.meta[JSON_KEY] = wants
        return ctx

    def invoke(self, ctx: click.Context) -> Any:
        """Every command runs guarded, so that printing a result (a name rich cannot render, a terminal that
        cannot encode it) can no more print a traceback than the work itself."""

        def go() -> Any:
            try:
                return super(_Main, self).invoke(ctx)
            except click.UsageError as exc:
                usage_error(exc, ctx.meta.get(JSON_KEY, False))

        return run_guarded(go, lambda: _debug(ctx), ctx.meta.get(JSON_KEY, False))


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


@main.command("detect")
@click.argument("path")
@click.option(
    "--base",
    help="Compare a full model (no LoRA tensors) with this base: reads both checkpoints whole and computes an "
    "effective rank (a truncated SVD) of every changed weight: slower than a merge (a progress bar on a terminal).",
)
@click.option("--adapter", help="Adapter name, for folders with several.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (docs/json.md).")
@_debug_option
@click.pass_context
def detect_cmd(ctx: click.Context, path: str, base: str | None, adapter: str | None, as_json: bool) -> None:
    """Say which form PATH is in (adapter, unmerged, or a full model: with --base, base / merged / fine-tuned)."""
    progress = not as_json and err.is_terminal
    res = run_guarded(lambda: api.detect(path, base=base, adapter=adapter, progress=progress), _debug(ctx), as_json)
    if as_json:
        render.json_document("detect", res.to_dict())
    else:
        render.detection(res)


_dry_run_option = click.option(
    "--dry-run",
    is_flag=True,
    help="Print the plan (modules, ranks, output files, dtypes, bytes, config changes, warnings); write nothing.",
)

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
        _dry_run_option,
        *_push_options,
        _debug_option,
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _print_conversion(res: Any, as_json: bool) -> None:
    if getattr(res, "bytes_exact", None) is not None:  # a DryRun: the plan, nothing written
        if as_json:
            render.json_document("dry-run", res.to_dict())
        else:
            render.dry_run(res)
        return
    if as_json:
        render.json_document("conversion", res.to_dict())
    else:
        render.conversion(res)


@main.command("convert")
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
@cli_args.extraction_options
@cli_args.moe_layout_option
@click.pass_context
def convert_cmd(
    ctx: click.Context, source: str, to: str, adapters: tuple[str, ...], as_json: bool, **opts: Any
) -> None:
    """Convert SOURCE to another storage form.

    A plain (merged or fine-tuned) SOURCE with --to adapter --base BASE is extracted by SVD and
    takes the extraction options (--rank, --energy, ...); they are refused on every other route.
    --to gguf (with --base, whose config.json alone is read) writes one llama.cpp adapter file;
    --to mlx an mlx-lm adapter folder; an mlx-lm adapter --to adapter becomes a PEFT adapter.
    A PEFT adapter SOURCE with --to adapter --moe-layout per-expert|fused gets its expert LoRA in the
    other layout (PEFT target_parameters <-> one LoRA module per expert).
    """
    args = cli_args.convert_args(source=source, to=to, adapters=adapters, **opts)
    res = run_guarded(lambda: api.convert(**args, **cli_args.writing(as_json)), _debug(ctx), as_json)
    _print_conversion(res, as_json)


@main.command("merge")
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
@cli_args.ray_option("Write the output shards as Ray tasks", "one per shard")
@click.pass_context
def merge_cmd(ctx: click.Context, source: str, adapters: tuple[str, ...], as_json: bool, **opts: Any) -> None:
    """Fold LoRA into the base weights (SOURCE: an adapter with --base, or an unmerged checkpoint).

    Several adapters: merge BASE --adapter A --adapter B:0.5 folds the weighted sum of their deltas
    in one fp32 pass, rounded once (PEFT: the adapters loaded and active together, set_scale for the
    weights).  SOURCE may also be an adapter (with --base): it comes first, with weight 1.

    A quantized base (fp8, compressed-tensors fp8, bitsandbytes 4/8-bit, MXFP4) is dequantized block by
    block; with --requantize the merged weights are quantized again in its scheme."""
    args = cli_args.merge_args(source=source, adapters=adapters, **opts)
    res = run_guarded(lambda: api.merge(**args, **cli_args.writing(as_json)), _debug(ctx), as_json)
    _print_conversion(res, as_json)


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
    type=cli_args.SEED,
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
@_dry_run_option
@_debug_option
@click.pass_context
def combine_cmd(
    ctx: click.Context, adapters: tuple[str, ...], weights: tuple[str, ...], as_json: bool, **opts: Any
) -> None:
    """Combine ADAPTERS (each REF[:WEIGHT]) into one adapter, as PEFT's add_weighted_adapter does.

    The result is bit-identical to PEFT's (fp32 factors, r = lora_alpha = the new rank, the union of the
    targets) and is built one module at a time.  What PEFT gets wrong is refused with the reason: DoRA,
    modules_to_save and lora_bias adapters; rsLoRA sources are written with use_rslora false.
    """
    args = cli_args.combine_args(adapters=adapters, weights=weights, **opts)
    res = run_guarded(lambda: api.combine(**args, **cli_args.writing(as_json)), _debug(ctx), as_json)
    _print_conversion(res, as_json)


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
def verify_cmd(ctx: click.Context, merged: str, adapters: tuple[str, ...], as_json: bool, **opts: Any) -> None:
    """Check that MERGED is BASE with the adapter merged in, tensor by tensor (exit 0: all ok, 1: not).

    Each tensor is ok (every element within its error bound), not applied (equals the base), wrong scale
    (equals base + c*dW with c measurably not 1, printed with its uncertainty: sqrt(r) means alpha/sqrt(r)
    was used for alpha/r), changed outside the adapter, mismatch, not finite (NaN or Inf in MERGED), shape
    mismatch, missing or unexpected.  The three checkpoints are streamed: memory stays flat.
    """
    progress = not as_json and err.is_terminal
    args = cli_args.verify_args(merged=merged, adapters=adapters, **opts)
    res = run_guarded(lambda: api.verify(**args, progress=progress), _debug(ctx), as_json)
    if as_json:
        render.json_document("verify", res.to_dict())
    else:
        render.verification(res)
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
    if as_json and markdown:
        raise click.UsageError("--json and --markdown are exclusive")
    rep = run_guarded(lambda: api.report(path, base=base, seq_len=seq_len, adapter=adapter), _debug(ctx), as_json)
    if as_json:
        render.json_document("report", rep.to_dict())
    elif markdown:
        render.report_markdown_text(rep)
    else:
        render.report(rep, path)


@main.command("extract")
@click.argument("tuned")
@click.option("--base", required=True, help="Base model folder or Hub repo id.")
@click.option("-o", "--output", required=True, help="Output adapter folder (created atomically).")
@cli_args.extraction_options
@cli_args.moe_layout_option
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (docs/json.md).")
@_dry_run_option
@_push_options[0]
@_push_options[1]
@_push_options[2]
@cli_args.ray_option("Run the differences and SVDs as Ray tasks", "by module group")
@_debug_option
@click.pass_context
def extract_cmd(ctx: click.Context, tuned: str, as_json: bool, **opts: Any) -> None:
    """Extract a LoRA adapter from TUNED minus BASE by SVD of every changed weight."""
    args = cli_args.extract_args(tuned=tuned, **opts)
    res = run_guarded(lambda: api.extract(**args, **cli_args.writing(as_json)), _debug(ctx), as_json)
    _print_conversion(res, as_json)


@main.command("spectrum")
@click.argument("tuned")
@click.option("--base", required=True, help="Base model folder or Hub repo id.")
@click.option("--plot", help="Write an SVG chart of relative error vs rank per group, the chosen rank marked.")
@cli_args.extraction_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (docs/json.md).")
@_debug_option
@click.pass_context
def spectrum_cmd(ctx: click.Context, tuned: str, as_json: bool, **opts: Any) -> None:
    """Singular values of every changed module of TUNED minus BASE: error and kept energy at ranks 1..max,
    per module and per group, and the rank (and adapter size) --rank/--energy/--max-error would give."""
    given = cli_args.given_extraction(opts)
    progress = not as_json and err.is_terminal
    res = run_guarded(lambda: api.spectrum(tuned, **opts, progress=progress, **given), _debug(ctx), as_json)
    if as_json:
        render.json_document("spectrum", res.to_dict())
    else:
        render.spectrum(res)


@main.command("push")
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
def push_cmd(ctx: click.Context, folder: str, repo_id: str, as_json: bool, **opts: Any) -> None:
    """Push FOLDER (an output of ours) to the Hub as REPO_ID in one commit."""
    progress = not as_json and err.is_terminal
    res = run_guarded(
        lambda: api.push(**cli_args.push_args(folder, repo_id, **opts), progress=progress), _debug(ctx), as_json
    )
    if as_json:
        render.json_document("push", asdict(res))
    else:
        render.pushed(folder, res)


@main.command("batch")
@click.argument("jobs")
@click.option(
    "--workers",
    type=click.IntRange(1, 1024),
    help="Jobs at once on this machine.  [default: its cores; fewer where the jobs' memory would not fit]",
)
@click.option(
    "--ray",
    "ray_address",
    metavar="ADDRESS",
    help="Run each job as a Ray task: auto (the cluster this machine belongs to), local (start one here), or a "
    "cluster's address (host:port, ray://host:port).  Needs the ray extra.",
)
@click.option("--state", help="Folder of the finished jobs' records.  [default: JOBS.state beside JOBS]")
@click.option("--rerun", is_flag=True, help="Run every job, also those finished before with the same inputs.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document, every job (docs/json.md).")
@_debug_option
@click.pass_context
def batch_cmd(
    ctx: click.Context,
    jobs: str,
    workers: int | None,
    ray_address: str | None,
    state: str | None,
    rerun: bool,
    as_json: bool,
) -> None:
    """Run the jobs of JOBS (YAML, or JSON Lines: one command line of merge, convert, extract, verify, combine or
    push per job) in parallel, each as its command would alone; a failed job stops no other (exit 1 if any failed).

    A job reading another job's output waits for it.  A rerun skips the jobs that finished before with the same
    inputs (records in --state)."""

    def go() -> Any:
        parsed = [cli_args.parse_job(line, jobs) for line in api.read_jobs(jobs)]
        folder = state if state is not None else str(api.batch_state_folder(jobs))
        with render.BatchLive(enabled=not as_json and err.is_terminal) as live:
            return api.batch(parsed, state=folder, workers=workers, ray=ray_address, rerun=rerun, on_change=live.update)

    res = run_guarded(go, _debug(ctx), as_json)
    if as_json:
        render.json_document("batch", res.to_dict())
        render.batch_errors(res)
    else:
        render.batch(res)
    sys.exit(0 if res.ok else 1)


if __name__ == "__main__":  # pragma: no cover
    main()
