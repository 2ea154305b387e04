"""The Python API: every CLI command is one call here.

``detect``, ``report`` and ``push`` read headers and config files only, and never import torch; the
conversions import it when they start.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import (
    AdapterError,
    HubError,
    LoraConvertError,
    OptionError,
    OutputError,
    RouteError,
    option,
    option_name,
    spelled,
)
from .fmt import form_word, human_bytes
from .inputs import load_model_config, load_source, open_plain, pick_adapter, resolve  # noqa: F401 - load_source is public
from .inventory import Inventory
from .io.writer import parse_size
from .stack import (
    AdapterInput,
    Spec,
    check_same_base,
    close_stack,
    has_weight,
    names_a_stack,
    open_stack,
    parse_spec,
    parse_weights,
)

if TYPE_CHECKING:
    from .assemble import ConvertResult
    from .costs import Report
    from .detection import DetectResult
    from .io.hub import PushResult
    from .routes.extract import ExtractOptions
    from .routes.plan import Plan, Request
    from .routes.verify import Verification


def detect(path: str | Path, *, base: str | Path | None = None, adapter: str | None = None) -> DetectResult:
    """Say which storage form ``path`` is in, and what it holds.

    Args:
        path: a checkpoint folder or file, or a Hub repo id (``org/name[@revision]``).
        base: with a plain checkpoint, compare it with this base (reads tensor data): the form becomes
            ``base``, ``merged`` (a low-rank difference) or ``fine-tuned``.
        adapter: the adapter subfolder to read, for folders with several.

    Returns:
        A :class:`~lora_convert.detect.DetectResult` (``.form``, adapters with their modules, warnings).

    Raises:
        CheckpointError: missing, truncated or malformed files.  AdapterError: LoRA tensors that do not
        add up (half a pair, mismatched ranks).  HubError: a repo id that cannot be fetched.
    """
    from .detection import detect as detect_checkpoint

    return detect_checkpoint(path, base=base, adapter=adapter)


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
) -> ConvertResult:
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
            default writes them dequantized, in ``dtype``, bf16 for ``auto``); ``.requantization`` of the
            result holds the error that adds per module.
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

    Returns:
        A :class:`~lora_convert.assemble.ConvertResult`; ``.extraction`` holds the SVD report, ``.pushed``
        the push (a :class:`~lora_convert.io.hub.PushResult`), ``.unmerge`` the rounding bound of an unmerge.

    Raises:
        RouteError: no such route, or a missing base.  CheckpointError, AdapterError (the adapter does not
        fit the base, or its config is missing), UnsupportedError (what cannot be merged exactly),
        OutputError (the output exists, lies inside an input, the disk filled up), HubError (before any
        work: no token, a rejected one, a repo it cannot write; after: the push failed, the output stays).
    """
    started = time.perf_counter()
    _check_arguments(to, dtype, max_shard_size)
    _check_format_options(to, output, dtype, outtype, drop_norms)
    _check_device(device, to)
    push_token = _check_push(push_to, to, output, force, token)
    write = _Writer(output, force, max_shard_size, progress, command, started)
    specs = _stack_specs(source, to, adapter, adapters, extract_options or moe_layout)
    if specs is not None:
        result = _convert_stack(
            source, to, specs, base=base, dtype=dtype, requantize=requantize, device=device, write=write
        )
    else:
        options = _RouteOptions(dtype, extract_options, outtype, requantize, device, moe_layout, drop_norms)
        result = _convert_one(source, to, base=base, adapter=adapter, options=options, write=write)
    if push_to is not None:
        result.pushed = _push_output(result, push_to, private, push_token, progress)
    return result


@dataclass
class _Writer:
    """How an output is written, the same for every route (see :func:`assemble.write_output`)."""

    output: str | Path
    force: bool
    max_shard_size: str | int
    progress: bool
    command: str | None
    started: float

    def __call__(self, plan: Plan, req: Request) -> ConvertResult:
        from .assemble import write_output

        return write_output(
            plan,
            req,
            output=self.output,
            force=self.force,
            max_shard_size=self.max_shard_size,
            progress=self.progress,
            command=self.command,
            started=self.started,
        )


@dataclass
class _RouteOptions:
    """The options that only some routes take (each refused by name elsewhere)."""

    dtype: str
    extract: ExtractOptions | dict[str, Any] | None
    outtype: str | None
    requantize: bool
    device: str
    moe_layout: str | None
    drop_norms: bool = False


def _convert_one(
    source: str | Path, to: str, *, base: str | Path | None, adapter: str | None, options: _RouteOptions, write: _Writer
) -> ConvertResult:
    """One source (and its one adapter) converted along the route the table gives for its form."""
    from .routes import FORMATS, NEEDS_BASE, OPTIONAL_BASE, Request, planner

    ck, inv = load_source(source, adapter=adapter)
    base_ck = None
    try:
        form = inv.form
        opts = _route_extract_options(form, to, base, options, ck.root)
        _check_moe_layout(form, to, options.moe_layout, ck.root)
        if options.requantize and to != "merged":
            raise RouteError(f"{option_name('requantize')} applies to merges into a quantized base", path=ck.root)
        if options.device != "cpu" and to != "merged" and opts is None:
            raise RouteError(
                f"{option_name('device')} applies to merges and extraction, not {form_word(form)} -> {to}", path=ck.root
            )
        plan_for = planner(form, to, path=ck.root)
        name = pick_adapter(inv, adapter, ck) if form != "plain" else "default"
        warnings = _check_adapter(inv, name, ck.root) if form != "plain" else []
        if (form, to) in NEEDS_BASE or (options.moe_layout is not None and form == "adapter"):
            base_ck = open_plain(_base_ref(inv, name, base, f"{form_word(form)} -> {to}"), "the base")
        elif (form, to) in OPTIONAL_BASE and base is not None:
            base_ck = open_plain(resolve(base), "the base")
        ref = str(source) if form != "plain" else str(Path(str(source)))
        req = Request(
            ck,
            ref,
            inv,
            name,
            base_ck,
            str(base) if base is not None else None,
            options.dtype,
            opts,
            write.progress,
            base_config=_format_base_config(inv, name, base) if to in FORMATS else None,
            outtype=options.outtype,
            requantize=options.requantize,
            moe_layout=options.moe_layout,
            device=options.device,
            drop_norms=options.drop_norms,
        )
        plan = plan_for(req)
        plan.warnings[:0] = warnings
        return write(plan, req)
    finally:
        ck.close()
        if base_ck is not None:
            base_ck.close()


def _route_extract_options(
    form: str, to: str, base: str | Path | None, options: _RouteOptions, root: Path
) -> ExtractOptions | None:
    """The extraction options, validated, on the SVD route (plain -> adapter with a base); refused elsewhere."""
    if form == "plain" and to == "adapter":
        if base is None:
            raise RouteError(
                "a full model holds no LoRA tensors; extracting an adapter needs the base",
                path=root,
                hint=f"pass {option('base', 'BASE')}",
            )
        given = options.extract
        if options.device != "cpu":
            given = _with_device(given, options.device)
        return _extract_options(given, options.dtype)
    if options.extract:
        names = options.extract if isinstance(options.extract, dict) else {"extract_options": 1}
        raise RouteError(
            f"{', '.join(option_name(k) for k in names)}: extraction options apply "
            f"only to a full model converted to an adapter with a base, not {form_word(form)} -> {to}",
            path=root,
        )
    return None


def _with_device(given: ExtractOptions | dict[str, Any] | None, device: str) -> ExtractOptions | dict[str, Any]:
    from dataclasses import replace

    from .routes.extract import ExtractOptions

    if isinstance(given, ExtractOptions):
        return replace(given, device=device)
    return {**(given or {}), "device": device}


def _check_device(device: str, to: str) -> None:
    """``cpu``, or a CUDA device torch can see (checked before any work)."""
    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise OptionError(f"{option_name('device')} must be cpu or cuda[:N], not {device!r}")
    import torch

    if not torch.cuda.is_available():
        raise RouteError(
            f"{option_name('device')} {device}: no CUDA device is available",
            hint="use " + spelled("--device cpu", 'device="cpu"'),
        )


def _check_arguments(to: str, dtype: str, max_shard_size: str | int) -> None:
    from .routes import FORMATS, FORMS
    from .routes.plan import output_dtype

    if to not in FORMS + FORMATS:
        raise OptionError(f"unknown target form {to!r} (choose from {', '.join(FORMS + FORMATS)})")
    output_dtype(dtype)
    try:
        parse_size(max_shard_size)
    except ValueError as exc:
        raise OptionError(f"{option_name('max_shard_size')}: {exc}") from None


def _check_push(push_to: str | None, to: str, output: str | Path, force: bool, token: str | None) -> str | None:
    """Everything a push needs, before any work: the token, its right to write the repo, and (a rerun after a
    failed push) no finished output in the way."""
    if push_to is None:
        return None
    if to == "gguf":
        raise RouteError(
            f"{option_name('push_to')} uploads a folder and a gguf output is one file",
            hint="upload the .gguf file with `hf upload REPO FILE`",
        )
    if Path(output).exists() and not force:
        again = spelled(f"lora-convert push {output} {push_to}", f"lora_convert.push({str(output)!r}, {push_to!r})")
        raise OutputError(
            "already exists",
            path=output,
            hint=f"to push the folder that is there: {again}; to convert again, pass {option('force')}",
        )
    from .io.hub import check_push_access

    return check_push_access(push_to, token)


def _push_output(result: ConvertResult, repo_id: str, private: bool, token: str | None, progress: bool) -> PushResult:
    """Push a finished output; a failure says that the output is complete and how to push it alone."""
    from .io.hub import push_folder

    try:
        return push_folder(result.output, repo_id, private=private, token=token, progress=progress)
    except HubError as exc:
        again = spelled(
            f"lora-convert push {result.output} {repo_id}", f"lora_convert.push({result.output!r}, {repo_id!r})"
        )
        raise HubError(
            f"the output was written in full ({len(result.files)} weight file(s), "
            f"{human_bytes(result.total_bytes)}), then the push failed: {exc.message}",
            path=result.output,
            hint=(f"{exc.hint}; then " if exc.hint else "") + f"push it without converting again: {again}",
        ) from exc


def merge(source: str | Path, *, output: str | Path, base: str | Path | None = None, **kwargs: Any) -> ConvertResult:
    """Fold the LoRA of an adapter (with ``base``) or of an unmerged checkpoint into the base weights.

    Several adapters at once: ``merge(BASE, adapters=["a", ("b", 0.5)], output=...)`` folds
    ``Σ wᵢ·ΔWᵢ`` in one fp32 pass, rounded once; the logits equal PEFT's with the same adapters loaded
    and active together (``set_scale(name, w)`` for the weights).

    The same as ``convert(source, "merged", ...)``: see :func:`convert` for the arguments and errors."""
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
    from .routes.verify import verify_merge

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
        with _stack_request(base, specs, base=None, to="merged", progress=progress, plain=plain) as (req, warnings):
            result = verify_merge(req, mck, slack=float(slack), ulps=float(ulps), progress=progress)
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
) -> ConvertResult:
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

    Returns:
        A :class:`~lora_convert.assemble.ConvertResult` for the new adapter folder.

    Raises:
        RouteError: bad options or weights, unequal ranks where the method needs one rank.  AdapterError:
        adapters for different base models.  UnsupportedError: what PEFT's combination gets wrong (DoRA,
        modules_to_save, lora_bias, differing layer selections).  OutputError, CheckpointError, HubError.
    """
    started = time.perf_counter()
    specs = [parse_spec(s) for s in adapters]
    if weights:
        given = parse_weights(weights)
        if any(has_weight(s) for s in adapters):
            raise OptionError(f"give the weights either as REF:WEIGHT or with {option_name('weights')}, not both")
        if len(given) != len(specs):
            raise OptionError(f"{len(given)} weights for {len(specs)} adapters")
        specs = [(ref, w) for (ref, _), w in zip(specs, given, strict=True)]
    if not specs:
        raise RouteError("nothing to combine", hint="name the adapters to combine")
    from .assemble import write_output
    from .routes.combine import CombineOptions, plan_combine
    from .routes.plan import Request

    opts = CombineOptions(method, density, rank, seed, svd_clamp, majority_sign).validate()
    stack = open_stack(specs, None)
    try:
        warnings = [w for inp in stack for w in _check_adapter(inp.inventory, inp.name, inp.ck.root)]
        check_same_base(stack)
        first = stack[0]
        req = Request(first.ck, first.label, first.inventory, first.name, progress=progress, stack=stack)
        plan = plan_combine(req, opts)
        plan.warnings[:0] = warnings
        return write_output(
            plan,
            req,
            output=output,
            force=force,
            max_shard_size=10**15,
            progress=progress,
            command=command,
            started=started,
        )
    finally:
        close_stack(stack)


def _convert_stack(
    source: str | Path,
    to: str,
    specs: Sequence[Spec],
    *,
    base: str | Path | None,
    dtype: str,
    requantize: bool,
    device: str,
    write: _Writer,
) -> ConvertResult:
    """merge (``to="merged"``) or unmerge (``to="base"``) with the adapters of ``specs``."""
    from .routes import planner

    if to not in ("merged", "base"):
        merged, unmerged = spelled("--to merged", 'to="merged"'), spelled("--to base", 'to="base"')
        raise RouteError(
            f"adapters given as REF[:WEIGHT] are merged ({merged}) or unmerged ({unmerged}), not converted to {to}"
        )
    if requantize and to != "merged":
        raise RouteError(f"{option_name('requantize')} applies to merges into a quantized base")
    plain = "unmerging subtracts adapters from a merged model" if to == "base" else None
    with _stack_request(source, specs, base=base, to=to, dtype=dtype, progress=write.progress, plain=plain) as (
        req,
        warnings,
    ):
        req.requantize, req.device = requantize, device
        plan = planner(req.inventory.form, to, path=req.source.root)(req)
        plan.warnings[:0] = warnings
        return write(plan, req)


@contextmanager
def _stack_request(
    source: str | Path,
    specs: Sequence[Spec],
    *,
    base: str | Path | None,
    to: str,
    dtype: str = "auto",
    progress: bool = False,
    plain: str | None = None,
) -> Iterator[tuple[Request, list[str]]]:
    """The source, its adapters (``specs``) and, for an adapter source, the base, opened as one
    Request (closed on the way out), and the adapters' warnings.  A plain source is the base (merge)
    or the merged model (unmerge, verify); an unmerged one carries its base.  ``plain`` says why the
    source must be plain, where it must (unmerge's MERGED, verify's BASE)."""
    from .routes import Request

    for spec in specs:
        parse_spec(spec)  # a weight that does not parse fails before anything is opened
    ck, inv = load_source(source)
    stack: list[AdapterInput] = []
    base_ck = None
    try:
        if plain and inv.form != "plain":
            raise RouteError(f"holds LoRA tensors ({inv.form} form): {plain}", path=ck.root)
        stack = open_stack(specs, (ck, inv))
        warnings = [w for inp in stack for w in _check_adapter(inp.inventory, inp.name, inp.ck.root)]
        check_same_base(stack)
        if inv.form == "adapter":
            base_ck = open_plain(_base_ref(stack[0].inventory, stack[0].name, base, f"adapter -> {to}"), "the base")
        elif inv.form == "plain" and base is not None:
            raise RouteError(
                f"the source, a full model, is the model the adapters apply to; {option_name('base')} is not used "
                "with it",
                path=ck.root,
                hint=f"drop {option_name('base')}, or give an adapter as the source",
            )
        ref = str(source)
        base_ref = str(base) if base is not None else (ref if inv.form == "plain" else None)
        if inv.form == "plain":
            base_ck = ck  # the plain source is the base (merge, verify) or the merged model (unmerge)
        yield Request(ck, ref, inv, stack[0].name, base_ck, base_ref, dtype, None, progress, stack=stack), warnings
    finally:
        close_stack(stack, keep=ck)
        ck.close()
        if base_ck is not None and base_ck is not ck:
            base_ck.close()


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
    **option_fields: Any,
) -> ConvertResult:
    """Factor every changed tensor of ``tuned`` against ``base`` into a PEFT LoRA adapter (SVD).

    Args:
        tuned: a fine-tuned or merged (plain) checkpoint.  base: the model it was tuned from.
        output: the adapter folder to create.
        options: an :class:`~lora_convert.routes.extract.ExtractOptions`; or give its fields as keyword
            arguments (``rank=8``, ``energy=0.95``, ``include=[...]``, ``dtype="bf16"`` for the factors...).
        push_to, private, token: push the adapter to the Hub once written, as :func:`convert` does.
        moe_layout: routed experts as one PEFT ``target_parameters`` pair per fused parameter (``fused``, the
            default) or as one LoRA module per stored per-expert tensor (``per-expert``).

    Returns:
        A :class:`~lora_convert.assemble.ConvertResult` whose ``.extraction`` has each module's rank,
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
    )


def _extract_options(given: ExtractOptions | dict[str, Any] | None, dtype: str) -> ExtractOptions:
    from .routes.extract import ExtractOptions

    if isinstance(given, ExtractOptions):
        return given.validate()
    fields = dict(given or {})
    if dtype != "auto":  # --dtype names the factors' dtype on this route
        fields.setdefault("dtype", {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype))
    unknown = set(fields) - set(ExtractOptions.__dataclass_fields__)
    if unknown:
        raise OptionError(f"unknown extraction option(s): {', '.join(sorted(unknown))}")
    return ExtractOptions(**fields).validate()


def _stack_specs(
    source: str | Path, to: str, adapter: Spec | None, adapters: Sequence[Spec] | None, extract_options: Any
) -> list[Spec] | None:
    """The adapters to merge or unmerge, or None for the one-adapter routes (``--adapter NAME`` picks one
    adapter of a checkpoint holding several)."""
    stacked = names_a_stack(adapter, adapters)
    if not stacked and adapter is not None and to in ("merged", "base"):
        stacked = _is_plain(source)  # a plain source has no adapter of that name: it is an adapter to apply
    if not stacked:
        return None
    if extract_options:
        raise RouteError("extraction options do not apply to merging or unmerging adapters")
    return [*([adapter] if adapter is not None else []), *(adapters or [])]


def _is_plain(source: str | Path) -> bool:
    try:
        ck, inv = load_source(source)
    except LoraConvertError:
        return False  # a folder of named adapters, say: the legacy --adapter NAME picks one of them
    ck.close()
    return inv.form == "plain"


def _check_moe_layout(form: str, to: str, moe_layout: str | None, root: Path) -> None:
    """--moe-layout shapes PEFT adapter outputs (an adapter converted to the other layout, or extracted)."""
    if moe_layout is not None and to != "adapter":
        raise RouteError(f"--moe-layout applies to adapter outputs, not {form_word(form)} -> {to}", path=root)


def _check_format_options(
    to: str, output: str | Path, dtype: str, outtype: str | None, drop_norms: bool = False
) -> None:
    """--outtype and --drop-norms are GGUF's (its types are not --dtype's), and a GGUF output is a ``.gguf`` file."""
    from .io.gguf_sink import OUTTYPES

    def target(form: str) -> str:
        return spelled(f"--to {form}", f'to="{form}"')

    if outtype is not None and to != "gguf":
        raise OptionError(f"{option_name('outtype')} applies to {target('gguf')} only, not {target(to)}")
    if drop_norms and to != "gguf":
        raise OptionError(f"{option_name('drop_norms')} applies to {target('gguf')} only, not {target(to)}")
    if to != "gguf":
        return
    if dtype != "auto":
        raise OptionError(
            f"{option_name('dtype')} does not apply to {target('gguf')}: use {option_name('outtype')} "
            + "|".join(OUTTYPES)
        )
    if outtype is not None and outtype not in OUTTYPES:
        raise OptionError(f"unknown {option_name('outtype')} {outtype!r} (choose from {', '.join(OUTTYPES)})")
    if not str(output).endswith(".gguf"):
        raise RouteError(
            f"{target('gguf')} writes one file: give {spelled('-o', 'output=')} a path ending in .gguf", path=output
        )


def _format_base_config(inv: Inventory, adapter: str, base: str | Path | None) -> dict[str, Any] | None:
    """The base's config.json for the gguf/mlx routes, which need no base weights: from --base, else from
    the adapter config's ``base_model_name_or_path`` when that is a local path (None: the source's own)."""
    if base is not None:
        return load_model_config(base)
    cfg = inv.config(adapter)
    named = cfg.base_model_name_or_path if cfg is not None else None
    if named and (Path(named) / "config.json").is_file():
        return load_model_config(named)
    return None


def _base_ref(inv: Inventory, adapter: str, base: str | Path | None, route: str) -> Path:
    """The base model: the one given, else the adapter config's ``base_model_name_or_path`` when it exists."""
    if base is not None:
        return resolve(base)
    hint = f"pass {option('base', 'BASE')} (a folder or a Hub repo id)"
    cfg = inv.config(adapter)
    if cfg is None or not cfg.base_model_name_or_path:
        raise RouteError(f"{route} needs the base model", hint=hint)
    named = cfg.base_model_name_or_path
    said = (
        f"{route} needs the base model: base_model_name_or_path in adapter_config.json names {named!r}, "
        "which is not a folder here"
    )
    try:
        p = resolve(named)  # a repo id that is no local folder goes to the Hub, as --base would
    except HubError as exc:  # (often a path relative to where the adapter was trained, not a repo)
        raise HubError(
            f"{said}, and {exc.message}", path=cfg.source, hint=f"{hint}; {exc.hint}" if exc.hint else hint
        ) from exc
    if os.path.exists(p):  # (False for a name too long, rather than raising)
        return p
    raise RouteError(said, path=cfg.source, hint=hint)


def _check_adapter(inv: Inventory, name: str, root: Path) -> list[str]:
    """The adapter's own config must be known (it sets the scaling) and agree with the tensors; returns
    what its dialect warned about."""
    problems = inv.problems.get(name)
    if problems:
        raise problems[0]
    if inv.config(name) is None:
        raise AdapterError(
            "no adapter_config.json beside the LoRA tensors, so the scaling (lora_alpha / r) is unknown",
            path=root,
            hint="put the adapter_config.json of this fine-tune there",
        )
    return list(inv.warnings.get(name, []))
