"""How a command line becomes the API's keywords: each command's options as its API function's keywords (shared
by the command and a ``batch`` job), the extraction options the user gave, what a writing command adds (progress,
the model card's command line), and a batch job line parsed by its command's own options."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from typing import Any

import click

from . import api
from .bounds import MAX_SEED
from .errors import OptionError
from .render import err


def command_line(argv: list[str] | None = None) -> str:
    """The command line for the model card (``argv``: a batch job's, else this process's), with a --token value
    blanked out and ``--ray ADDRESS`` left out (where a merge ran is not what it is: the output is the same)."""
    args, hide, skip = [], False, False
    for a in sys.argv[1:] if argv is None else argv:
        if skip or a.startswith("--ray="):
            skip = False
            continue
        if a == "--ray":
            skip = True
            continue
        args.append("***" if hide else ("--token=***" if a.startswith("--token=") else a))
        hide = a == "--token"
    return "lora-convert " + " ".join(shlex.quote(a) for a in args)


def adapter_args(adapters: tuple[str, ...]) -> dict[str, Any]:
    """One --adapter is a name or a REF[:WEIGHT] (the API tells which); several are a stack."""
    if len(adapters) == 1:
        return {"adapter": adapters[0]}
    return {"adapters": list(adapters)} if adapters else {}


SEED = click.IntRange(0, MAX_SEED)  # torch's generators take 64-bit seeds: beyond, a usage error (exit 2)


#: The SVD options, shared by ``extract`` and ``convert --to adapter`` (defaults applied by the API).
EXTRACTION_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("--rank", {"type": int, "help": "Fixed rank per module (default 16 when no other criterion is given)."}),
    ("--energy", {"type": float, "help": "Smallest rank keeping this fraction of ||dW||_F^2, e.g. 0.95."}),
    ("--max-error", {"type": float, "help": "Smallest rank with relative Frobenius error at most this."}),
    ("--max-rank", {"type": int, "help": "Cap on every module's rank.  [default: 128]"}),
    ("--include", {"multiple": True, "help": "Only modules whose path matches this regex (repeatable)."}),
    ("--exclude", {"multiple": True, "help": "Leave out modules whose path matches this regex (repeatable)."}),
    ("--layers", {"help": "Only these decoder layers, e.g. 0-15,20."}),
    (
        "--embeddings",
        {
            "type": click.Choice(["lora", "full", "skip"]),
            "help": "Embeddings and lm_head: factor, save whole (modules_to_save), or leave out.  [default: lora]",
        },
    ),
    (
        "--save-other",
        {"is_flag": True, "default": None, "help": "Save modules whose norms/biases changed whole (modules_to_save)."},
    ),
    ("--svd", {"type": click.Choice(["auto", "exact", "randomized"]), "help": "[default: auto]"}),
    ("--device", {"help": "cpu or cuda.  [default: cpu]"}),
    ("--seed", {"type": SEED, "help": "Seed of the randomized SVD.  [default: 0]"}),
    (
        "--factor-dtype",
        {
            "type": click.Choice(["fp32", "bf16", "fp16"]),
            "help": "dtype of the written LoRA factors (the error is measured on them).  [default: fp32]",
        },
    ),
]
EXTRACTION_NAMES = [flag[2:].replace("-", "_") for flag, _ in EXTRACTION_OPTIONS]


def extraction_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for flag, kwargs in reversed(EXTRACTION_OPTIONS):
        f = click.option(flag, **kwargs)(f)
    return f


def moe_layout_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--moe-layout",
        type=click.Choice(["per-expert", "fused"]),
        help="Expert LoRA in the adapter written: one module per expert, or fused (PEFT target_parameters).",
    )(f)


def ray_option(what: str, split: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--ray ADDRESS`` on a command that splits one job over a cluster (merge: by shard; extract: by module)."""
    return click.option(
        "--ray",
        metavar="ADDRESS",
        help=f"{what} (auto, local, or a cluster's address), {split}, each reading the inputs from storage every "
        "node sees; byte for byte the local output.  Needs the ray extra.",
    )


def given_extraction(opts: dict[str, Any]) -> dict[str, Any]:
    """Takes the extraction options out of ``opts`` (the command's parameters) and returns those the user
    actually gave (click passes None / () for the others), as the API takes them: --factor-dtype is
    extract(dtype=...), repeated options are lists.  extract() supplies the defaults of the rest."""
    given = {k: opts.pop(k) for k in EXTRACTION_NAMES}
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in given.items() if v is not None and v != ()}
    if "factor_dtype" in out:
        out["dtype"] = out.pop("factor_dtype")
    return out


def writing(as_json: bool) -> dict[str, Any]:
    """What a command that writes an output passes besides the user's options: a progress bar on a
    terminal, and the command line for the model card."""
    return {"progress": not as_json and err.is_terminal, "command": command_line()}


def convert_args(source: str, to: str, adapters: tuple[str, ...], **opts: Any) -> dict[str, Any]:
    """``convert``'s options as :func:`api.convert`'s keywords (here and in a batch job)."""
    given = given_extraction(opts)  # the other options are the API's keywords
    if opts["push_to"] and to == "gguf":
        raise click.UsageError("--push-to uploads a folder; upload the .gguf file with `hf upload REPO FILE`")
    return {"source": source, "to": to, **adapter_args(adapters), **opts, "extract_options": given or None}


def merge_args(source: str, adapters: tuple[str, ...], **opts: Any) -> dict[str, Any]:
    return {"source": source, **adapter_args(adapters), **opts}


def combine_args(adapters: tuple[str, ...], weights: tuple[str, ...], **opts: Any) -> dict[str, Any]:
    return {"adapters": list(adapters), "weights": list(weights), **opts}


def verify_args(merged: str, adapters: tuple[str, ...], **opts: Any) -> dict[str, Any]:
    return {"merged": merged, "adapters": list(adapters), **opts}


def extract_args(tuned: str, **opts: Any) -> dict[str, Any]:
    given = given_extraction(opts)
    return {"tuned": tuned, **opts, **given}


def push_args(folder: str, repo_id: str, **opts: Any) -> dict[str, Any]:
    return {"folder": folder, "repo_id": repo_id, **opts}


#: The commands a batch job may run: how each turns its parsed options into its API function's keywords (the same
#: functions the commands themselves use), and whether it writes an output whose model card quotes the command line.
JOB_ARGS: dict[str, tuple[Callable[..., dict[str, Any]], bool]] = {
    "merge": (merge_args, True),
    "convert": (convert_args, True),
    "extract": (extract_args, True),
    "combine": (combine_args, True),
    "verify": (verify_args, False),
    "push": (push_args, False),
}


def parse_job(line: Any, jobs_file: str) -> Any:
    """A job line of the file (``api.JobLine``) parsed by its command's own options into an ``api.Job``; a bad
    option is an OptionError naming the file and the job (one error line, nothing run)."""
    name, argv = line.argv[0], list(line.argv[1:])
    where = f"job {line.index} ({line.name})"
    if any(a in ("-h", "--help") for a in argv):
        raise OptionError(f"{where}: --help has no place in a job", path=jobs_file)
    from .cli import main  # the commands' own options parse the job (imported when a batch runs)

    cmd = main.commands[name]
    try:
        with cmd.make_context(f"lora-convert {name}", argv) as ctx:
            params = dict(ctx.params)
        params.pop("as_json", None)
        to_kwargs, writes = JOB_ARGS[name]
        kwargs = to_kwargs(**params)
    except click.UsageError as exc:
        raise OptionError(f"{where}: {exc.format_message()}", path=jobs_file) from None
    if kwargs.get("dry_run"):
        raise OptionError(f"{where}: --dry-run has no place in a batch (run it on its own)", path=jobs_file)
    kwargs["progress"] = False
    if writes:
        kwargs["command"] = command_line(list(line.argv))
    return api.Job(line.index, line.name, name, tuple(line.argv), kwargs)
