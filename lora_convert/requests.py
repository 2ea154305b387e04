"""From the user's inputs to one :class:`~.routes.plan.Request`, in one straight line.

:func:`open_request` is the one entry every conversion, merge, unmerge, verify and combine goes through:

1. parse the adapter specs (``REF[:WEIGHT]``: a typo costs one ``error:`` line, nothing opened);
2. open the source (a path or a Hub id, read in its dialect);
3. pick the adapter and check it (its config is known and agrees with its tensors), or open the stack;
4. open the base (given, or named by the adapter's config), where the route needs one;
5. assemble the Request, with the route options checked against the route.

It is a context manager: what it opened is closed on the way out, whether the work succeeded or not, and
if a later step fails the earlier steps' checkpoints are closed before the error leaves.  Torch-free
(routes are imported when planned).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import (
    AdapterError,
    HubError,
    LoraConvertError,
    OptionError,
    RouteError,
    UnsupportedError,
    option,
    option_name,
    spelled,
)
from .fmt import form_word
from .inputs import load_model_config, load_source, open_plain, pick_adapter, resolve
from .inventory import Inventory
from .io.reader import Checkpoint
from .options import RouteOptions
from .routes.plan import FORMATS, Request
from .stack import AdapterInput, Spec, check_same_base, has_weight, names_a_stack, open_stack, parse_spec, parse_weights

if TYPE_CHECKING:
    from .routes.extract import ExtractOptions

NO_OPTIONS = RouteOptions()


@contextmanager
def open_request(
    source: str | Path | None,
    to: str,
    *,
    base: str | Path | None = None,
    adapter: Spec | None = None,
    adapters: Sequence[Spec] | None = None,
    weights: Sequence[float | str] | None = None,
    route: RouteOptions = NO_OPTIONS,
    plain: str | None = None,
) -> Iterator[tuple[Request, list[str]]]:
    """The Request that converts ``source`` to ``to``, and the adapters' warnings; closed on the way out.

    ``source`` None: the adapters alone (combine; the first one stands as the source).  ``plain`` says why
    the source must be a full model, where it must (verify's BASE; an unmerge's MERGED says so itself)."""
    held = _Held()
    try:
        specs, opened = _parse_specs(source, to, adapter, adapters, weights, route)  # 1.
        if opened is not None:
            held.add(opened[0])
        if specs is not None:
            yield _stacked(source, to, specs, opened, base, route, plain, held)
        elif source is not None:  # (specs are None only for a source's own adapter)
            yield _one_adapter(source, to, adapter, base, route, held)
    finally:
        held.close()


def _one_adapter(
    source: str | Path,
    to: str,
    adapter: Spec | None,
    base: str | Path | None,
    route: RouteOptions,
    held: _Held,
) -> tuple[Request, list[str]]:
    """One source and its one adapter (``adapter`` picks one of several), along the route of its form."""
    from .routes import NEEDS_BASE, OPTIONAL_BASE, planner

    name_wanted = adapter if isinstance(adapter, str) else None
    ck, inv = held.add_source(load_source(source, adapter=name_wanted))  # 2.
    form = inv.form
    extract = _route_extract_options(form, to, base, route, ck.root)
    _check_route_options(form, to, route, extract, ck.root)
    planner(form, to, path=ck.root)  # no such route: refused before the adapter is looked at
    name = pick_adapter(inv, name_wanted, ck) if form != "plain" else "default"  # 3.
    warnings = check_adapter(inv, name, ck.root) if form != "plain" else []
    base_ck = None  # 4.
    if (form, to) in NEEDS_BASE or (route.moe_layout is not None and form == "adapter"):
        base_ck = held.add(open_plain(_base_ref(inv, name, base, f"{form_word(form)} -> {to}"), "the base"))
    elif (form, to) in OPTIONAL_BASE and base is not None:
        base_ck = held.add(open_plain(resolve(base), "the base"))
    _bind(ck, inv, name, base_ck)
    ref = str(source) if form != "plain" else str(Path(str(source)))
    req = Request(  # 5.
        ck,
        ref,
        inv,
        name,
        base_ck,
        str(base) if base is not None else None,
        route,
        extract,
        base_config=_format_base_config(inv, name, base) if to in FORMATS else None,
    )
    return req, warnings


def _stacked(
    source: str | Path | None,
    to: str,
    specs: Sequence[Spec],
    opened: tuple[Checkpoint, Inventory] | None,
    base: str | Path | None,
    route: RouteOptions,
    plain: str | None,
    held: _Held,
) -> tuple[Request, list[str]]:
    """The source, its adapters (``specs``) and, for an adapter source, the base.  A plain source is the base
    (merge, verify) or the merged model (unmerge); an unmerged one carries its base."""
    if source is None:  # combine: the adapters alone
        stack = held.add_stack(open_stack(specs, None))
        for inp in stack:
            _bind(inp.ck, inp.inventory, inp.name, None)
        warnings = _check_stack(stack)
        first = stack[0]
        return Request(first.ck, first.label, first.inventory, first.name, stack=stack), warnings
    ck, inv = opened if opened is not None else held.add_source(load_source(source))  # 2.
    if plain is None and to == "base":
        plain = "unmerging subtracts adapters from a merged model"
    if plain and inv.form != "plain":
        raise RouteError(f"holds LoRA tensors ({inv.form} form): {plain}", path=ck.root)
    stack = held.add_stack(open_stack(specs, (ck, inv)))  # 3.
    warnings = _check_stack(stack)
    base_ck = None  # 4.
    if inv.form == "adapter":
        base_ck = held.add(
            open_plain(_base_ref(stack[0].inventory, stack[0].name, base, f"adapter -> {to}"), "the base")
        )
    elif inv.form == "plain" and base is not None:
        raise RouteError(
            f"the source, a full model, is the model the adapters apply to; {option_name('base')} is not used with it",
            path=ck.root,
            hint=f"drop {option_name('base')}, or give an adapter as the source",
        )
    ref = str(source)  # 5.
    base_ref = str(base) if base is not None else (ref if inv.form == "plain" else None)
    if inv.form == "plain":
        base_ck = ck  # the plain source is the base (merge, verify) or the merged model (unmerge)
    for inp in stack:
        _bind(inp.ck, inp.inventory, inp.name, base_ck)
    return Request(ck, ref, inv, stack[0].name, base_ck, base_ref, route, stack=stack), warnings


class _Held:
    """The checkpoints a request opened, each closed once."""

    def __init__(self) -> None:
        self.checkpoints: list[Checkpoint] = []

    def add(self, ck: Checkpoint) -> Checkpoint:
        self.checkpoints.append(ck)
        return ck

    def add_source(self, opened: tuple[Checkpoint, Inventory]) -> tuple[Checkpoint, Inventory]:
        self.add(opened[0])
        return opened

    def add_stack(self, stack: list[AdapterInput]) -> list[AdapterInput]:
        for inp in stack:
            self.add(inp.ck)
        return stack

    def close(self) -> None:
        seen: set[int] = set()
        for ck in self.checkpoints:
            if id(ck) not in seen:
                seen.add(id(ck))
                ck.close()


def _parse_specs(
    source: str | Path | None,
    to: str,
    adapter: Spec | None,
    adapters: Sequence[Spec] | None,
    weights: Sequence[float | str] | None,
    route: RouteOptions,
) -> tuple[list[Spec] | None, tuple[Checkpoint, Inventory] | None]:
    """The adapters to merge, unmerge, verify or combine, parsed (None for the one-adapter routes, where
    ``--adapter NAME`` picks one adapter of a checkpoint holding several); and the source when it had to be
    opened to tell (a plain source has no adapter of that name: it is an adapter to apply)."""
    if source is None:
        return combine_specs(adapter, adapters, weights), None
    opened = None
    stacked = names_a_stack(adapter, adapters)
    if not stacked and adapter is not None and to in ("merged", "base"):
        try:
            opened = load_source(source)
        except LoraConvertError:
            pass  # a folder of named adapters, say: the legacy --adapter NAME picks one of them
        if opened is not None and opened[1].form != "plain":
            opened[0].close()
            opened = None
        stacked = opened is not None
    if not stacked:
        return None, None
    try:
        if route.extract or route.moe_layout:
            raise RouteError("extraction options do not apply to merging or unmerging adapters")
        if to not in ("merged", "base"):
            merged, unmerged = spelled("--to merged", 'to="merged"'), spelled("--to base", 'to="base"')
            raise RouteError(
                f"adapters given as REF[:WEIGHT] are merged ({merged}) or unmerged ({unmerged}), not converted to {to}"
            )
        if route.requantize and to != "merged":
            raise RouteError(f"{option_name('requantize')} applies to merges into a quantized base")
        specs: list[Spec] = [*([adapter] if adapter is not None else []), *(adapters or [])]
        for spec in specs:
            parse_spec(spec)  # a weight that does not parse fails before anything is opened
    except BaseException:
        if opened is not None:
            opened[0].close()
        raise
    return specs, opened


def combine_specs(
    adapter: Spec | None, adapters: Sequence[Spec] | None, weights: Sequence[float | str] | None
) -> list[Spec]:
    """combine's adapters with their weights: ``REF:WEIGHT`` each, or all of them in ``weights``."""
    given_specs = [*([adapter] if adapter is not None else []), *(adapters or [])]
    parsed = [parse_spec(s) for s in given_specs]
    if weights:
        given = parse_weights(weights)
        if any(has_weight(s) for s in given_specs):
            raise OptionError(f"give the weights either as REF:WEIGHT or with {option_name('weights')}, not both")
        if len(given) != len(parsed):
            raise OptionError(f"{len(given)} weights for {len(parsed)} adapters")
        parsed = [(ref, w) for (ref, _), w in zip(parsed, given, strict=True)]
    if not parsed:
        raise RouteError("nothing to combine", hint="name the adapters to combine")
    return list(parsed)


def _bind(ck: Checkpoint, inv: Inventory, name: str, base: Checkpoint | None) -> None:
    """A VeRA adapter's layers take their input width from the base: bound to it here, refused without one."""
    if inv.tuner.get(name, {}).get("peft_type") != "VERA":
        return  # (nothing to bind: the VeRA dialect's module is imported for VeRA adapters only)
    from .dialects.vera import NEEDS_BASE, bind_to_base

    if base is not None:
        bind_to_base(ck, inv, name, base, base.config)
    if NEEDS_BASE in inv.tuner.get(name, {}):
        raise UnsupportedError(
            "a VeRA adapter's shared vera_A is as wide as its widest layer: each layer's input width comes from "
            "the base, which this route does not read",
            path=ck.root,
            hint=f"merge it or attach it with {option('base', 'BASE')}",
        )


def _check_stack(stack: Sequence[AdapterInput]) -> list[str]:
    """Every adapter of the stack checked (see :func:`check_adapter`), all for one base model."""
    warnings = [w for inp in stack for w in check_adapter(inp.inventory, inp.name, inp.ck.root)]
    check_same_base(stack)
    return warnings


def check_adapter(inv: Inventory, name: str, root: Path) -> list[str]:
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


def _check_route_options(form: str, to: str, route: RouteOptions, extract: ExtractOptions | None, root: Path) -> None:
    """--moe-layout shapes PEFT adapter outputs; --requantize is a merge's; --device a merge's or extraction's."""
    if route.moe_layout is not None and to != "adapter":
        raise RouteError(f"--moe-layout applies to adapter outputs, not {form_word(form)} -> {to}", path=root)
    if route.requantize and to != "merged":
        raise RouteError(f"{option_name('requantize')} applies to merges into a quantized base", path=root)
    if route.device != "cpu" and to != "merged" and extract is None:
        raise RouteError(
            f"{option_name('device')} applies to merges and extraction, not {form_word(form)} -> {to}", path=root
        )


def _route_extract_options(
    form: str, to: str, base: str | Path | None, route: RouteOptions, root: Path
) -> ExtractOptions | None:
    """The extraction options, validated, on the SVD route (plain -> adapter with a base); refused elsewhere."""
    if form == "plain" and to == "adapter":
        if base is None:
            raise RouteError(
                "a full model holds no LoRA tensors; extracting an adapter needs the base",
                path=root,
                hint=f"pass {option('base', 'BASE')}",
            )
        given = route.extract
        if route.device != "cpu":
            given = _with_device(given, route.device)
        return extract_options(given, route.dtype)
    if route.extract is not None and not isinstance(route.extract, dict):
        # the record comes from `extract` (or a caller who meant it): say what extraction takes, not a flag name
        raise RouteError(
            f"extraction takes a full model (fine-tuned or merged) and its base; this is {_FORM_WITH_ARTICLE.get(form, form)}",
            path=root,
            hint=_not_plain_hint(form),
        )
    if route.extract:
        names = route.extract
        raise RouteError(
            f"{', '.join(option_name(k) for k in names)}: extraction options apply "
            f"only to a full model converted to an adapter with a base, not {form_word(form)} -> {to}",
            path=root,
        )
    return None


_FORM_WITH_ARTICLE = {"adapter": "an adapter", "unmerged": "an unmerged checkpoint (LoRA layers inside the model)"}


def _not_plain_hint(form: str) -> str:
    if form == "unmerged":
        return "its adapter comes out whole with `convert --to adapter`; `convert --to merged` merges it"
    if form == "adapter":
        return "it is an adapter already: `convert --to merged --base BASE` merges it"
    return "pass the fine-tuned model as SOURCE"


def _with_device(given: ExtractOptions | dict[str, Any] | None, device: str) -> ExtractOptions | dict[str, Any]:
    from .routes.extract import ExtractOptions

    if isinstance(given, ExtractOptions):
        return replace(given, device=device)
    return {**(given or {}), "device": device}


def extract_options(given: ExtractOptions | dict[str, Any] | None, dtype: str) -> ExtractOptions:
    """:class:`~.routes.extract.ExtractOptions` from the record or its fields, validated (``dtype``: --dtype,
    which names the factors' dtype on the extraction route)."""
    from .routes.extract import ExtractOptions

    if isinstance(given, ExtractOptions):
        return given.validate()
    fields = dict(given or {})
    if dtype != "auto":
        fields.setdefault("dtype", {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype))
    unknown = set(fields) - set(ExtractOptions.__dataclass_fields__)
    if unknown:
        raise OptionError(f"unknown extraction option(s): {', '.join(sorted(unknown))}")
    return ExtractOptions(**fields).validate()


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
