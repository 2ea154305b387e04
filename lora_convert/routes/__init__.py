"""The routes between storage forms, as one table ``{(from, to): planner}``.

A planner takes a :class:`~.plan.Request` (the opened inputs) and returns a :class:`~.plan.Plan` (the
jobs that write the output tensors and what the folder needs besides).  A new route is one planner
here; the API looks the route up, and one folder assembly writes any plan.

The commands that are no conversion of one source to a form sit in a second table beside it, ``COMMANDS``
``{name: planner}``: ``combine`` (several adapters -> one, a :class:`~.plan.Plan` the assembly writes) and
``verify`` (a merge checked: a pre-pass the assembly runs, whose result is the verdict).  The API looks them
up there too (:func:`command_planner`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RouteError, UnsupportedError
from ..fmt import form_word
from .plan import FORMATS, FORMS, Plan, Request

if TYPE_CHECKING:
    from ..inventory import Inventory

Planner = Callable[[Request], Plan]

# Each planner is named "module:function" and imported when its route is first asked for: a merge does not
# pay for importing the GGUF, MLX, kohya, extraction and unmerge modules (~0.1 s of start-up).
ROUTES: dict[tuple[str, str], str] = {
    ("adapter", "merged"): "merge:plan_merge",
    ("unmerged", "merged"): "merge:plan_merge",
    ("unmerged", "base"): "strip_split_attach:plan_strip",
    ("unmerged", "adapter"): "strip_split_attach:plan_split",
    ("adapter", "unmerged"): "strip_split_attach:plan_attach",
    ("plain", "adapter"): "extract:plan_extract",
    ("adapter", "adapter"): "to_peft:plan_adapter",  # --moe-layout, or another dialect's adapter -> PEFT
    ("adapter", "gguf"): "gguf:plan_gguf",
    ("unmerged", "gguf"): "gguf:plan_gguf",
    ("adapter", "mlx"): "mlx:plan_mlx",
    ("unmerged", "mlx"): "mlx:plan_mlx",
    ("adapter", "kohya"): "diffusion:plan_kohya",
    ("adapter", "diffusers"): "diffusion:plan_diffusers",
    ("plain", "merged"): "merge:plan_merge",  # the plain source is the base; the adapters come with --adapter
    ("plain", "base"): "unmerge:plan_unmerge",  # the plain source is a merged model; ΔW of --adapter is subtracted
}
# command -> "module:function": its planner takes the Request and the command's own inputs and options.
COMMANDS: dict[str, str] = {
    "combine": "combine:plan_combine",  # (Request, CombineOptions) -> Plan
    "verify": "verify:plan_verify",  # (Request, MERGED, slack=, ulps=) -> VerifyPass, a pre-pass with a result()
}
NEEDS_BASE = frozenset({("adapter", "merged"), ("adapter", "unmerged"), ("plain", "adapter")})
OPTIONAL_BASE = frozenset({("adapter", "kohya"), ("adapter", "diffusers")})  # the base settles module names

__all__ = [
    "COMMANDS",
    "FORMATS",
    "FORMS",
    "NEEDS_BASE",
    "OPTIONAL_BASE",
    "ROUTES",
    "Plan",
    "Planner",
    "Request",
    "TUNER_OUTPUTS",
    "command_planner",
    "planner",
    "refuse_tuners",
]


def _load(found: str) -> Any:
    module, _, name = found.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def command_planner(name: str) -> Callable[..., Any]:
    """The planner of the command ``name`` in :data:`COMMANDS` (imported when first asked for)."""
    return _load(COMMANDS[name])


# the routes that know LoHa/LoKr modules (their ΔW: routes/tuner_terms; their keys moved as PEFT lays them out);
# every other route converts LoRA factors and refuses them by name
TUNER_ROUTES = frozenset(
    {
        ("adapter", "merged"),
        ("unmerged", "merged"),
        ("plain", "merged"),
        ("plain", "base"),
        ("unmerged", "base"),
        ("unmerged", "adapter"),
        ("adapter", "unmerged"),
    }
)


def _lora_only(plan: Planner, to: str) -> Planner:
    def checked(req: Request) -> Plan:
        for inp in req.adapters_in():
            if inp.inventory.dialect == "kohya":  # LyCORIS files: merged or written back (refuse_tuners)
                continue
            tuned = [m for m in inp.inventory.modules(inp.name).values() if m.tuner != "lora"]
            if tuned:
                word = {"loha": "LoHa", "lokr": "LoKr"}.get(tuned[0].tuner, tuned[0].tuner)
                raise UnsupportedError(
                    f"a {word} adapter ({len(tuned)} module(s), first {tuned[0].module}): converting it to {to} "
                    "needs LoRA factors; LoHa and LoKr adapters are merged, verified, attached, split and stripped",
                    path=inp.ck.root,
                    tensor=tuned[0].a_key,
                    hint="merge it (--to merged with --base), then extract a LoRA from the merged model if needed",
                )
        return plan(req)

    return checked


def planner(source_form: str, to: str, *, path: str | Path | None = None) -> Planner:
    """The planner of ``source_form -> to``, or a RouteError saying why there is none."""
    found = ROUTES.get((source_form, to))
    if found is not None:
        found_planner = _load(found)
        return found_planner if (source_form, to) in TUNER_ROUTES else _lora_only(found_planner, to)
    if source_form == "plain":
        raise RouteError(
            f"holds no LoRA tensors (a full model: base, merged or fine-tuned); nothing to convert to {to}", path=path
        )
    if source_form == to:
        raise RouteError(f"is already in {form_word(source_form)} form", path=path)
    if source_form == "adapter" and to == "base":
        raise RouteError("an adapter holds no base weights: the base is the model it was trained on", path=path)
    raise RouteError(
        f"no route from {form_word(source_form)} to {to}", path=path
    )  # pragma: no cover - the table is complete


# the outputs a module of another algorithm (LoHa, LoKr, full diff) can go to: a merge (its ΔW through
# :func:`.tuner_terms.delta`), and a kohya file (LyCORIS's own layout, tensors copied); every other route takes LoRA pairs
TUNER_OUTPUTS = frozenset({"merged", "kohya"})


def refuse_tuners(inputs: Iterable[tuple[Inventory, str, Path]], to: str) -> None:
    """Refuse by name a LyCORIS module (LoHa, LoKr, full diff in a kohya file) on a route that only knows LoRA
    pairs (``to``: the output form, or ``combine``); ``inputs``: (inventory, adapter, where) of each adapter the
    route reads."""
    if to in TUNER_OUTPUTS:
        return
    for inv, name, where in inputs:
        if inv.dialect != "kohya":  # PEFT's LoHa/LoKr adapters: routes.planner knows the routes that take them
            continue
        for m in inv.modules(name).values():
            if m.tuner != "lora":
                raise UnsupportedError(
                    f"{m.tuner} module {m.module}: {'combining' if to == 'combine' else f'--to {to}'} takes "
                    "LoRA modules only",
                    path=where,
                    tensor=m.a_key,
                    hint="merge it into its base, or write it back with --to kohya",
                )
