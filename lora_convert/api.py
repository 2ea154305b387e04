"""The Python API: every CLI command is one call here, and nothing else.

Each function checks its keywords into a few option records (:mod:`.options`: the output, the Hub push,
the route's options), opens its inputs as one request (:func:`.requests.open_request`), and hands both to
the route and the assembly.  ``detect``, ``report`` and ``push`` read headers and config files only, and
never import torch; the conversions import it when they start.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import OptionError, OutputError, RouteError, option, option_name
from .inputs import load_source  # noqa: F401 - public
from .options import UNSHARDED, HubPush, Output, RouteOptions
from .requests import combine_specs, open_request
from .requests import extract_options as _extract_options
from .stack import Spec

if TYPE_CHECKING:
    from collections.abc import Callable

    from .assemble import ConvertResult, PrepassRun, TensorRun
    from .costs import Report
    from .detection import DetectResult
    from .dry_run import DryRun
    from .fleet import BatchResult, Job, JobLine, Outcome
    from .io.hub import PushResult
    from .routes.extract import ExtractOptions
    from .routes.plan import Request
    from .routes.verify import Verification
    from .spectrum import Spectrum


def __getattr__(name: str) -> Any:
    """``Job`` and ``JobLine`` (a batch's jobs, public here) come from :mod:`.fleet` when first asked for: no
    other command runs a batch, and that module (job files, state records, hashing) is no small import."""
    if name in ("Job", "JobLine"):
        from . import fleet

        return getattr(fleet, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def detect(
    path: str | Path, *, base: str | Path | None = None, adapter: str | None = None, progress: bool = False
) -> DetectResult:
    """Say which storage form ``path`` is in, and what it holds.

    Args:
        path: a checkpoint folder or file, or a Hub repo id (``org/name[@revision]``).
        base: with a plain checkpoint, compare it with this base (reads tensor data): the form becomes
            ``base``, ``merged`` (a low-rank difference) or ``fine-tuned``.  This reads both checkpoints
            whole and computes an effective rank (a truncated SVD) of every changed weight.
        adapter: the adapter subfolder to read, for folders with several.
        progress: show a progress bar while comparing with ``base`` (bytes of ``path`` compared).

    Returns:
        A :class:`~lora_convert.detect.DetectResult` (``.form``, adapters with their modules, warnings).

    Raises:
        CheckpointError: missing, truncated or malformed files.  AdapterError: LoRA tensors that do not
        add up (half a pair, mismatched ranks).  HubError: a repo id that cannot be fetched.
    """
    from .detection import detect as detect_checkpoint

    return detect_checkpoint(path, base=base, adapter=adapter, progress=progress)


def report(
    path: str | Path, *, base: str | Path | None = None, seq_len: int = 2048, adapter: str | None = None
) -> Report:
    """Parameters, bytes on disk and FLOPs per token of ``path`` in every storage form, from headers.

    Args:
        path: an adapter, unmerged or plain checkpoint (folder, file or Hub repo id).
        base: the base model of an adapter: a folder with weights, or one with only ``config.json``.
        seq_len: the context length the attention FLOPs are counted at.
        adapter: which adapter, for checkpoints with several.

    Returns:
        A :class:`~lora_convert.report.Report` with one row per form and one per LoRA module kind.

    Raises:
        CheckpointError, AdapterError, RouteError (a base that holds LoRA tensors), HubError.
    """
    from .costs import build_report

    return build_report(path, base=base, seq_len=seq_len, adapter=adapter)


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    create_pr: bool = False,
    force: bool = False,
    progress: bool = True,
    token: str | None = None,
) -> PushResult:
    """Upload an output folder of ours to the Hub as one commit.

    Args:
        folder: a complete output folder (checked unless ``force``).
        repo_id: ``namespace/name``; created when missing (``private`` applies to a new repo).
        revision: the branch (created from main when missing).  message: the commit message.
        create_pr: open a pull request instead of committing to the branch.
        token: the Hub token (default: ``HF_TOKEN`` or the one ``hf auth login`` stored); never printed.

    Returns:
        A :class:`~lora_convert.io.hub.PushResult` (commit URL, files).

    Raises:
        HubError: authentication, permissions, network; OutputError-like problems of the folder as HubError.
    """
    from .io.hub import push_folder

    return push_folder(
        folder,
        repo_id,
        private=private,
        revision=revision,
        message=message,
        create_pr=create_pr,
        force=force,
        progress=progress,
        token=token,
    )


def convert(
    source: str | Path,
    to: str,
    *,
    output: str | Path,
    base: str | Path | None = None,
    adapter: str | None = None,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    force: bool = False,
    progress: bool = False,
    command: str | None = None,
    extract_options: ExtractOptions | dict[str, Any] | None = None,
    outtype: str | None = None,
    requantize: bool = False,
    device: str = "cpu",
    push_to: str | None = None,
    private: bool = False,
    token: str | None = None,
    moe_layout: str | None = None,
    adapters: Sequence[Spec] | None = None,
    drop_norms: bool = False,
    dry_run: bool = False,
    ray: str | None = None,
) -> ConvertResult | DryRun:
    """Convert ``source`` to the storage form ``to`` in the folder ``output``.

    Args:
        source: an adapter (PEFT's, mlx-lm's, kohya's or diffusers'), unmerged or plain checkpoint (folder, file or
            Hub repo id).
        to: ``merged``, ``adapter`` (PEFT), ``unmerged`` or ``base``; or another ecosystem's adapter:
            ``gguf`` (one llama.cpp file, ``output`` ending in ``.gguf``), ``mlx`` (an mlx-lm folder),
            ``kohya`` (sd-scripts, ComfyUI) or ``diffusers`` (``pytorch_lora_weights.safetensors``).
        output: the folder (the file, for gguf) to create (atomically: it appears whole or not at all).
        base: the base model, for adapter -> merged/unmerged and for extraction (plain -> adapter); for
            gguf and mlx only its config.json is read (a folder, the file, or a Hub repo id); for kohya and
            diffusers, optional: the UNet/transformer/text-encoder folder whose names settle the module paths.
        adapter: which adapter, for checkpoints with several.
        dtype: ``auto`` (each tensor's own), ``bf16``, ``fp16`` or ``fp32`` for floating tensors; on the
            extraction route, the dtype of the factors.
        max_shard_size: shard limit of model outputs (``5GB``, ``500MB``, an int of bytes).
        force: replace an existing ``output``.
        progress: show progress bars.  command: the command line, quoted in the model card.
        extract_options: :class:`~lora_convert.routes.extract.ExtractOptions` (or its fields as a dict),
            for plain -> adapter only.
        outtype: the GGUF tensor type, ``f32`` (default), ``f16``, ``bf16`` or ``q8_0``; gguf only.
        drop_norms: gguf only: leave out the norm weights an adapter saves whole (mergekit writes them; GGUF
            LoRA cannot carry them and llama.cpp's LoRA loader ignores them), listed in ``.dropped``; without
            it such an adapter is refused.
        requantize: merging into a quantized base, write the merged weights back in its scheme (the
            default writes them dequantized, in ``dtype``, bf16 for ``auto``); ``.report`` of the
            result (a :class:`~lora_convert.routes.requantize.Requantization`) holds the error that adds per module.
        device: ``cpu`` or ``cuda[:N]``: where a merge computes its fp32 tiles (the blocks still stream from
            and to the disk) or extraction its SVDs.
        push_to: push the output to this Hub repo (``namespace/name``) once written; the token and the right
            to write the repo are checked before any work.  private: create that repo private.
        token: the Hub token for the push (default: ``HF_TOKEN`` or the one ``hf auth login`` stored).
        moe_layout: ``per-expert`` or ``fused``: the layout of expert LoRA in an adapter output — an
            adapter converted to the other layout (adapter -> adapter, with the base), or what extraction
            writes.
        adapters: several adapters at once, each ``"REF"``, ``"REF:WEIGHT"`` or ``(REF, WEIGHT)``: with
            ``to="merged"`` the weighted sum of their ΔW is folded in (rounded once); with a plain (merged)
            ``source`` and ``to="base"`` it is subtracted (unmerge).  REF is an adapter checkpoint, or the
            name of an adapter inside ``source``.  An ``adapter`` that is a path (or has a weight) means
            the same as ``adapters=[adapter]``.
        dry_run: plan the conversion and return a :class:`~lora_convert.dry_run.DryRun` (files, tensors,
            bytes, modules, config changes, warnings) instead of writing it: nothing is written, no temporary
            folder is made, nothing is pushed.  On the extraction route the sizes are the plan's before its SVD pass
            (``.assumptions`` says what that takes for granted; ranks an energy or error criterion picks are unknown).
        ray: ``to="merged"``: write the output shards as Ray tasks on this cluster (``auto``, ``local`` or an
            address), one per shard, each reading the inputs again from storage every node sees (the paths must
            be the same on every node); the driver writes index, config and card and publishes atomically.
            ``to="adapter"`` from a plain checkpoint (extraction): the SVDs as Ray tasks, by module group
            (:func:`extract`).  The output is the local run's byte for byte.  Needs ray.

    Returns:
        A :class:`~lora_convert.assemble.ConvertResult` (a ``DryRun`` with ``dry_run``); ``.report`` holds the route's own report (the SVD
        route's :class:`~lora_convert.routes.extract.Extraction`, an unmerge's rounding bound in a
        :class:`~lora_convert.routes.unmerge.Unmerge`; None where the route has none), ``.pushed`` the push (a
        :class:`~lora_convert.io.hub.PushResult`).

    Raises:
        RouteError: no such route, or a missing base.  CheckpointError, AdapterError (the adapter does not
        fit the base, or its config is missing), UnsupportedError (what cannot be merged exactly),
        OutputError (the output exists, lies inside an input, the disk filled up), HubError (before any
        work: no token, a rejected one, a repo it cannot write; after: the push failed, the output stays).
    """
    out = Output(output, force, max_shard_size, progress, command)
    route = RouteOptions(dtype, extract_options, outtype, requantize, device, moe_layout, drop_norms)
    hub = HubPush(push_to, private, token) if push_to is not None else None
    route.check(to, out)
    if ray is not None and (to not in ("merged", "adapter") or dry_run):
        raise OptionError(
            f"{option_name('ray')} splits a merge by output shard or an extraction by module group: not --to {to}"
            if not dry_run
            else f"{option_name('ray')} runs the work on a cluster: --dry-run does none"
        )
    if hub is not None and not dry_run:
        hub = hub.preflight(to, out)  # the token and the right to write, before any work
    with open_request(source, to, base=base, adapter=adapter, adapters=adapters, route=route) as (req, warnings):
        if dry_run:
            return _describe(req, to, warnings, out)
        run, prepass = None, None
        if ray is not None:
            from .cluster import prepass_run, shard_run

            reopen = {"source": _here(source), "to": to, "base": _here(base), "adapter": _here(adapter)}
            reopen["adapters"] = [_here(a) for a in adapters] if adapters is not None else None
            if to == "merged":
                run = shard_run(ray, {**reopen, "route": route})
            elif req.extract is not None:
                prepass = prepass_run(ray, {**reopen, "route": route})
            else:
                raise OptionError(f"{option_name('ray')} with --to adapter splits an extraction (a plain SOURCE)")
        result = _write(req, to, warnings, out, run, prepass)
    if hub is not None:
        result.pushed = hub.upload(result.output, len(result.files), result.total_bytes, out.progress)
    return result


def _here(ref: Any) -> Any:
    """A local path made absolute (a Ray task's working folder is not ours); a Hub id, a name, a weight as given."""
    if isinstance(ref, str | Path) and os.path.exists(ref):
        return str(Path(ref).resolve())
    if isinstance(ref, str) and ":" in ref and os.path.exists(ref.rpartition(":")[0]):
        head, _, weight = ref.rpartition(":")
        return f"{Path(head).resolve()}:{weight}"
    if isinstance(ref, tuple | list) and ref:
        return (_here(ref[0]), *ref[1:])
    return ref


def _write(
    req: Request,
    to: str,
    warnings: list[str],
    out: Output,
    run: TensorRun | None = None,
    prepass: PrepassRun | None = None,
) -> ConvertResult:
    """The route's plan for ``req``, written where ``out`` says (its tensors by ``run``, its pre-pass by ``prepass``
    where given: ``ray``)."""
    from .assemble import write_output
    from .routes import planner

    plan = planner(req.inventory.form, to, path=req.source.root)(req)
    plan.warnings[:0] = warnings
    return write_output(plan, req, out, run, prepass)


def _describe(req: Request, to: str, warnings: list[str], out: Output) -> DryRun:
    """The route's plan for ``req``, described and not written (``dry_run=True``)."""
    from .dry_run import describe
    from .routes import planner

    plan = planner(req.inventory.form, to, path=req.source.root)(req)
    plan.warnings[:0] = warnings
    return describe(plan, req, out)


def merge(
    source: str | Path, *, output: str | Path, base: str | Path | None = None, **kwargs: Any
) -> ConvertResult | DryRun:
    """Fold the LoRA of an adapter (with ``base``) or of an unmerged checkpoint into the base weights.

    Several adapters at once: ``merge(BASE, adapters=["a", ("b", 0.5)], output=...)`` folds
    ``Σ wᵢ·ΔWᵢ`` in one fp32 pass, rounded once; the logits equal PEFT's with the same adapters loaded
    and active together (``set_scale(name, w)`` for the weights).

    The same as ``convert(source, "merged", ...)``: see :func:`convert` for the arguments (``dry_run=True``: the
    plan as a :class:`~lora_convert.dry_run.DryRun`, nothing written) and errors."""
    return convert(source, "merged", output=output, base=base, **kwargs)


VERIFY_TOLERANCE_MAX = 1e6  # the largest --slack / --ulps: beyond, a tolerance means nothing


def verify(
    merged: str | Path,
    *,
    base: str | Path,
    adapter: Spec | None = None,
    adapters: Sequence[Spec] | None = None,
    slack: float = 1.0,
    ulps: float = 0.0,
    logits: bool = False,
    progress: bool = False,
) -> Verification:
    """Check, tensor by tensor, that ``merged`` is ``base`` with the adapter(s) merged in.

    Streams the three checkpoints (a few blocks in memory) and gives every tensor a status: ok (every
    element within its error bound), not applied, wrong scale (base + c·ΔW with c measurably not 1, given
    with its uncertainty), changed outside the adapter, mismatch, not finite, shape mismatch, missing or
    unexpected.

    Args:
        merged: the merged checkpoint (plain).  base: the model the merge started from.
        adapter, adapters: the adapter(s) merged, ``REF[:WEIGHT]`` as for :func:`merge`.
        slack: the tolerance, as a multiple of each element's error bound (the most two correct
            computations of the merge may differ by: see :mod:`lora_convert.routes.verify`), 0 to 1e6.
        ulps: ulps of MERGED's dtype allowed on top (0 to 1e6).  Neither widens an element's tolerance
            beyond 1/16 of its magnitude.
        logits: also compare MERGED's logits with PEFT's unmerged model on a few tokens (needs
            transformers and peft, and memory for two copies of the model in fp32; skipped otherwise).

    Returns:
        A :class:`~lora_convert.routes.verify.Verification` (``.ok``, ``.checks``, ``.summary()``).

    Raises:
        RouteError: no adapter, a bad tolerance, MERGED or BASE holding LoRA tensors.  CheckpointError,
        AdapterError (the adapter does not fit BASE), UnsupportedError (what merge refuses), HubError.
    """
    from .assemble import run_prepass
    from .routes import command_planner

    specs = [*([adapter] if adapter is not None else []), *(adapters or [])]
    if not specs:
        raise RouteError("verify needs the adapter that was merged", hint=f"pass {option('adapter', 'ADAPTER')}")
    for name, value in (("slack", slack), ("ulps", ulps)):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not (ok and 0 <= value <= VERIFY_TOLERANCE_MAX):  # NaN fails too
            raise OptionError(f"{option_name(name)} must be a number from 0 to {VERIFY_TOLERANCE_MAX:g}, not {value!r}")
    mck, minv = load_source(merged)
    try:
        if minv.form != "plain":
            raise RouteError(f"holds LoRA tensors ({minv.form} form); MERGED is a merged model", path=mck.root)
        plain = "BASE is the model the adapters were merged into"
        with open_request(base, "merged", adapters=specs, plain=plain) as (req, warnings):
            check = command_planner("verify")(req, mck, slack=float(slack), ulps=float(ulps))
            run_prepass(check, progress)
            result = check.result()
            result.warnings = warnings
            if logits:
                from .logits_check import compare_logits

                result.logits = compare_logits(mck, req)
            return result
    finally:
        mck.close()


def combine(
    adapters: Sequence[Spec],
    *,
    output: str | Path,
    method: str,
    weights: Sequence[float | str] | None = None,
    density: float | None = None,
    rank: int | None = None,
    seed: int = 0,
    svd_clamp: float | None = None,
    majority_sign: str = "total",
    force: bool = False,
    progress: bool = False,
    command: str | None = None,
    dry_run: bool = False,
) -> ConvertResult | DryRun:
    """Combine adapters into one, as PEFT's ``add_weighted_adapter`` does (bit for bit).

    Args:
        adapters: ``REF[:WEIGHT]`` (or ``(REF, WEIGHT)``) of each adapter; ``weights`` gives them all at once
            instead (numbers, or strings such as ``"0.7,-0.4"``).
        method: cat (exact: ΔW = Σ wᵢ·ΔWᵢ), linear, ties, dare_linear, dare_ties, magnitude_prune (on the
            factors: need equal ranks), or svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
            (on each ΔW, then truncated to ``rank``).
        density: the fraction kept by the pruning methods (ties, dare, magnitude_prune).  rank: the svd
            methods' rank (default: the largest source rank).  seed: dare's masks; with PEFT, the seed of
            ``torch.manual_seed`` just before ``add_weighted_adapter``.  svd_clamp: PEFT's quantile clamp.
            majority_sign: ties' sign election, ``total`` or ``frequency``.
        dry_run: return the plan as a :class:`~lora_convert.dry_run.DryRun` and write nothing.

    Returns:
        A :class:`~lora_convert.assemble.ConvertResult` for the new adapter folder.

    Raises:
        RouteError: bad options or weights, unequal ranks where the method needs one rank.  AdapterError:
        adapters for different base models.  UnsupportedError: what PEFT's combination gets wrong (DoRA,
        modules_to_save, lora_bias, differing layer selections).  OutputError, CheckpointError, HubError.
    """
    out = Output(output, force, UNSHARDED, progress, command)
    from .assemble import write_output
    from .routes import command_planner
    from .routes.combine import CombineOptions

    specs = combine_specs(None, adapters, weights)
    opts = CombineOptions(method, density, rank, seed, svd_clamp, majority_sign).validate()
    with open_request(None, "combine", adapters=specs) as (req, warnings):
        plan = command_planner("combine")(req, opts)
        plan.warnings[:0] = warnings
        if dry_run:
            from .dry_run import describe

            return describe(plan, req, out)
        return write_output(plan, req, out)


def extract(
    tuned: str | Path,
    *,
    base: str | Path,
    output: str | Path,
    options: ExtractOptions | None = None,
    force: bool = False,
    progress: bool = False,
    command: str | None = None,
    push_to: str | None = None,
    private: bool = False,
    token: str | None = None,
    moe_layout: str | None = None,
    dry_run: bool = False,
    ray: str | None = None,
    **option_fields: Any,
) -> ConvertResult | DryRun:
    """Factor every changed tensor of ``tuned`` against ``base`` into a PEFT LoRA adapter (SVD).

    Args:
        tuned: a fine-tuned or merged (plain) checkpoint.  base: the model it was tuned from.
        output: the adapter folder to create.
        options: an :class:`~lora_convert.routes.extract.ExtractOptions`; or give its fields as keyword
            arguments (``rank=8``, ``energy=0.95``, ``include=[...]``, ``dtype="bf16"`` for the factors...).
        push_to, private, token: push the adapter to the Hub once written, as :func:`convert` does.
        moe_layout: routed experts as one PEFT ``target_parameters`` pair per fused parameter (``fused``, the
            default) or as one LoRA module per stored per-expert tensor (``per-expert``).
        dry_run: describe the adapter from headers alone, without the SVD pass (a
            :class:`~lora_convert.dry_run.DryRun`): every tensor to factor counted as changed, ranks exact for
            ``rank=`` and upper bounds (``max_rank``) for ``energy=``/``max_error=``, as its ``.assumptions`` say.
        ray: run the differences and SVDs as Ray tasks on this cluster (``auto``, ``local`` or an address), a group
            of modules of about equal size each, every task reading the inputs again from storage every node sees
            (the same paths on every node) and factoring with this process's torch thread count; the factors come
            back here and the adapter is written as ever: the local run's byte for byte.  Needs ray.

    Returns:
        A :class:`~lora_convert.assemble.ConvertResult` whose ``.report`` (an ``Extraction``) has each module's rank,
        energy kept and relative error measured on the factors as written.

    Raises:
        RouteError: bad options, LoRA tensors in either input, nothing to extract.  CheckpointError:
        NaN/Inf in either input.  UnsupportedError: quantized tensors.  OutputError, HubError.
    """
    if options is not None and option_fields:
        raise RouteError("give the extraction options either as options= or as keyword arguments, not both")
    opts = options if options is not None else _extract_options(option_fields, "auto")
    return convert(
        tuned,
        "adapter",
        output=output,
        base=base,
        force=force,
        progress=progress,
        command=command,
        extract_options=opts,
        push_to=push_to,
        private=private,
        token=token,
        moe_layout=moe_layout,
        dry_run=dry_run,
        ray=ray,
    )


def spectrum(
    tuned: str | Path,
    *,
    base: str | Path,
    plot: str | Path | None = None,
    options: ExtractOptions | None = None,
    progress: bool = False,
    **option_fields: Any,
) -> Spectrum:
    """The singular values of every changed module's ΔW = TUNED − BASE, to choose a rank before extracting.

    Args:
        tuned: a fine-tuned or merged (plain) checkpoint.  base: the model it was tuned from.
        plot: write an SVG chart of relative error vs rank per group, the chosen rank marked (a ``.svg`` path).
        options: the :class:`~lora_convert.routes.extract.ExtractOptions` ``extract`` would take (or their fields
            as keyword arguments): the criterion (``rank``/``energy``/``max_error``, capped by ``max_rank``, which
            also bounds the curves), which tensors (``include``, ``exclude``, ``layers``, ``embeddings``), and
            ``dtype`` (the factors' dtype, for the adapter size).

    Returns:
        A :class:`~lora_convert.spectrum.Spectrum`: per module the singular values, relative error and kept
        energy at ranks 1…max and the rank extraction's criterion picks (the same code as :func:`extract`);
        per group (attention, mlp, embeddings, experts) the same curves, and the adapter's parameters and bytes.

    Raises:
        OptionError: bad options, a ``plot`` path that is not ``.svg``.  RouteError: LoRA tensors in either
        input, nothing changed.  CheckpointError: NaN/Inf in either input.
    """
    if options is not None and option_fields:
        raise RouteError("give the extraction options either as options= or as keyword arguments, not both")
    opts = options if options is not None else _extract_options(option_fields, "auto")
    if plot is not None and Path(plot).suffix.lower() != ".svg":
        raise OptionError(f"{option_name('plot')} writes an SVG chart: name the file .svg (got {str(plot)[:80]!r})")
    if plot is not None and not Path(plot).parent.is_dir():
        raise OutputError("no such folder for the chart", path=Path(plot).parent)
    from .inputs import open_plain
    from .spectrum import spectrum as compute
    from .spectrum import svg

    with open_plain(tuned, "the tuned model") as tk, open_plain(base, "the base") as bk:
        res = compute(tk, bk, opts, progress=progress)
        if not res.modules:
            raise RouteError(
                "no changed tensor to factor: the tuned checkpoint equals the base where a LoRA can go",
                path=tk.root,
            )
    if plot is not None:
        try:
            Path(plot).write_text(svg(res), encoding="utf-8")
        except OSError as e:
            raise OutputError(f"cannot write the chart: {e.strerror or e}", path=plot) from None
        res.plot = str(plot)
    return res


def read_jobs(path: str | Path) -> list[JobLine]:
    """The jobs of a job file (YAML or JSON Lines; see :func:`batch`), each a command line not yet parsed.

    Raises:
        OptionError: a file that cannot be read, is not YAML/JSON Lines, lists no job, or a job that is not one of
        merge, convert, extract, verify, combine, push (naming the file and the job)."""
    from .fleet import read_job_file

    return read_job_file(path)


def batch_state_folder(path: str | Path) -> Path:
    """Where a batch keeps its finished jobs' records by default: ``JOBS.state`` beside the job file."""
    from .fleet import state_folder

    return state_folder(path)


def batch(
    jobs: Sequence[Job],
    *,
    state: str | Path | None = None,
    workers: int | None = None,
    ray: str | None = None,
    rerun: bool = False,
    on_change: Callable[[list[Outcome]], None] | None = None,
) -> BatchResult:
    """Run several jobs (each one call of ``merge``, ``convert``, ``extract``, ``verify``, ``combine`` or ``push``:
    a :class:`~lora_convert.fleet.Job` with the function's keywords) in parallel; one job's failure stops no other.

    Args:
        jobs: the jobs (the CLI parses a job file's command lines into them).
        state: a folder for the finished jobs' records (what identified their inputs and what they wrote): a job
            whose record still matches is skipped.  None: no records.  rerun: run every job all the same.
        workers: jobs at once on this machine (default: its cores, fewer where their memory would not fit).
        ray: run each job as a Ray task on this cluster: ``auto``, ``local`` (start one) or an address; needs ray.
        on_change: called with every job's :class:`~lora_convert.fleet.Outcome` whenever one changes.

    Returns:
        A :class:`~lora_convert.fleet.BatchResult` (``.ok``, ``.jobs`` with each one's status and error line).

    Raises:
        OptionError: bad ``workers``, ``ray`` without ray installed, an address it cannot reach.
    """
    from .fleet import check_job, run_batch

    for j in jobs:
        check_job(j)
    return run_batch(list(jobs), state=state, workers=workers, ray=ray, rerun=rerun, on_change=on_change)
