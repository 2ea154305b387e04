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

import functools
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
    "TUNER_TAKES",
    "TUNER_WORDS",
    "Request",
    "Route",
    "command_planner",
    "planner",
    "refuse_untaken",
    "tuner_key",
]


def _load(found: str) -> Any:
    module, _, name = found.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def command_planner(name: str) -> Callable[..., Any]:
    """The planner of the command ``name`` in :data:`COMMANDS` (imported when first asked for), which first
    refuses the tuners :data:`TUNER_TAKES` does not give it."""
    return _checked(_load(COMMANDS[name]), name)


# Which routes and commands take a module of each tuner: ONE table, read by :func:`refuse_untaken` for every
# route (:func:`planner`) and command (:func:`command_planner`).  A module's key is :func:`tuner_key`'s; LoRA
# pairs (and the tuners read as LoRA factors, AdaLoRA and VeRA) go everywhere and are not listed.  A route is
# its (from, to) pair, a command its name.
Route = tuple[str, str] | str
_MERGES: frozenset[Route] = frozenset({("adapter", "merged"), ("unmerged", "merged"), ("plain", "merged"), "verify"})
# the tuner's own tensors moved as PEFT lays them out (strip, split, attach)
_PEFT_LAYOUT: frozenset[Route] = frozenset({("unmerged", "base"), ("unmerged", "adapter"), ("adapter", "unmerged")})
TUNER_TAKES: dict[str, frozenset[Route]] = {
    # PEFT's LoHa and LoKr: ΔW merged, verified and subtracted (routes/tuner_terms), their tensors moved as PEFT's
    "loha": _MERGES | _PEFT_LAYOUT | {("plain", "base")},
    "lokr": _MERGES | _PEFT_LAYOUT | {("plain", "base")},
    # IA³ scales W (W ⊙ l): merged and verified, its own tensors moved, its adapter rewritten as PEFT's;
    # no unmerge (the merge engine scales, it does not divide), no LoRA factors for the formats, no combine
    "ia3": _MERGES | _PEFT_LAYOUT | {("adapter", "adapter")},
    # a LyCORIS file's LoHa, LoKr and full diff: merged, verified, or written back as LyCORIS's own kohya file
    "lycoris": _MERGES | {("adapter", "kohya")},
    # OFT, BOFT and HRA rotate W (routes/oft_terms): merged, verified, their tensors moved; no unmerge (no
    # inverse rotation is applied), no LoRA factors, no combine
    "oft": _MERGES | _PEFT_LAYOUT,
    "boft": _MERGES | _PEFT_LAYOUT,
    "hra": _MERGES | _PEFT_LAYOUT,
    # RoAd mixes pairs of output rows (R·W, R·b): merged, verified, its tensors moved; no unmerge (no inverse)
    "road": _MERGES | _PEFT_LAYOUT,
    # PEFT's additive tuners (routes/additive_terms): ΔW merged, verified and subtracted, their tensors moved
    **{
        t: _MERGES | _PEFT_LAYOUT | {("plain", "base")}
        for t in ("shira", "fourierft", "vblora", "delora", "c3a", "randlora", "miss")
    },
}
#: How messages name each tuner (``LoraModule.tuner``, or an IA³ module's kind).
TUNER_WORDS = {
    "loha": "LoHa",
    "lokr": "LoKr",
    "ia3": "IA³",
    "full": "full diff",
    "diag-oft": "Diag-OFT",
    "oft": "OFT",
    "boft": "BOFT",
    "hra": "HRA",
    "shira": "SHiRA",
    "fourierft": "FourierFT",
    "vblora": "VB-LoRA",
    "delora": "DeLoRA",
    "c3a": "C3A",
    "randlora": "RandLoRA",
    "miss": "MiSS",
    "road": "RoAd",
}
_ROUTE_WORDS: dict[Route, str] = {
    ("adapter", "merged"): "merged",
    ("unmerged", "merged"): "merged",
    ("plain", "merged"): "merged",
    "verify": "verified",
    ("plain", "base"): "unmerged",
    ("adapter", "unmerged"): "attached",
    ("unmerged", "adapter"): "split",
    ("unmerged", "base"): "stripped",
    ("adapter", "adapter"): "rewritten as a PEFT adapter",
    ("adapter", "kohya"): "written back as a kohya file",
}


def tuner_key(dialect: str, tuner: str, kind: str) -> str:
    """A module's row in :data:`TUNER_TAKES` ("lora": every route): a LyCORIS module of a kohya file is
    "lycoris" whatever its algorithm, a PEFT LoHa/LoKr module its tuner, an IA³ module "ia3"."""
    if tuner != "lora":
        return "lycoris" if dialect == "kohya" else tuner
    return "ia3" if kind == "ia3" else "lora"


def refuse_untaken(req: Request, route: Route) -> None:
    """Refuse by name the first module of an adapter ``req`` reads whose tuner :data:`TUNER_TAKES` does not
    give ``route`` (one message shape for every tuner, route and command)."""
    for inp in req.adapters_in():
        inv = inp.inventory
        modules = list(inv.modules(inp.name).values())
        for m in modules:
            key = tuner_key(inv.dialect, m.tuner, m.kind)
            if key == "lora":
                continue
            takes = TUNER_TAKES.get(key, frozenset())  # a tuner the table does not list goes nowhere
            if route in takes:
                continue
            tuner = m.tuner if m.tuner != "lora" else m.kind
            word = TUNER_WORDS.get(tuner, tuner)
            origin = " from a LyCORIS file" if key == "lycoris" else ""
            n = sum(o.tuner == m.tuner and o.kind == m.kind for o in modules)
            doing = "combining" if route == "combine" else f"--to {route[1] if isinstance(route, tuple) else route}"
            verbs = list(dict.fromkeys(w for r, w in _ROUTE_WORDS.items() if r in takes))
            raise UnsupportedError(
                f"{tuner} module {m.module} ({n} {word} module(s){origin}): {doing} does not take them; {word} "
                f"modules{origin} are {_listed(verbs)}",
                path=inp.ck.root,
                tensor=m.a_key,
                hint=None
                if route == ("plain", "base")  # an unmerge: nothing else to offer
                else "merge it into its base, then extract a LoRA from the merged model if needed"
                + (", or write it back with --to kohya" if key == "lycoris" else ""),
            )


def _listed(words: list[str]) -> str:
    if not words:
        return "taken by no route"
    return " and ".join(filter(None, (", ".join(words[:-1]), words[-1])))


def _checked(plan: Callable[..., Any], route: Route) -> Callable[..., Any]:
    """``plan`` behind :func:`refuse_untaken` (its name and signature kept: the tables are inspected)."""

    @functools.wraps(plan)
    def checked(req: Request, *args: Any, **kwargs: Any) -> Any:
        refuse_untaken(req, route)
        return plan(req, *args, **kwargs)

    return checked


def planner(source_form: str, to: str, *, path: str | Path | None = None) -> Planner:
    """The planner of ``source_form -> to``, or a RouteError saying why there is none."""
    found = ROUTES.get((source_form, to))
    if found is not None:
        found_planner: Planner = _checked(_load(found), (source_form, to))
        return found_planner
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
