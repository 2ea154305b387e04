"""The routes between storage forms, as one table ``{(from, to): planner}``.

A planner takes a :class:`~.plan.Request` (the opened inputs) and returns a :class:`~.plan.Plan` (the
jobs that write the output tensors and what the folder needs besides).  A new route is one planner
here; the API looks the route up, and one folder assembly writes any plan.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import RouteError
from .extract import plan_extract
from .layout import plan_attach, plan_split, plan_strip
from .merge import plan_merge
from .plan import FORMS, Plan, Request
from .unmerge import plan_unmerge

Planner = Callable[[Request], Plan]

ROUTES: dict[tuple[str, str], Planner] = {
    ("adapter", "merged"): plan_merge,
    ("unmerged", "merged"): plan_merge,
    ("unmerged", "base"): plan_strip,
    ("unmerged", "adapter"): plan_split,
    ("adapter", "unmerged"): plan_attach,
    ("plain", "adapter"): plan_extract,
    ("plain", "merged"): plan_merge,  # the plain source is the base; the adapters come with --adapter
    ("plain", "base"): plan_unmerge,  # the plain source is a merged model; ΔW of --adapter is subtracted
}
NEEDS_BASE = frozenset({("adapter", "merged"), ("adapter", "unmerged"), ("plain", "adapter")})

__all__ = ["FORMS", "NEEDS_BASE", "ROUTES", "Plan", "Planner", "Request", "planner"]


def planner(source_form: str, to: str, *, path: object = None) -> Planner:
    """The planner of ``source_form -> to``, or a RouteError saying why there is none."""
    found = ROUTES.get((source_form, to))
    if found is not None:
        return found
    if source_form == "plain":
        raise RouteError(f"holds no LoRA tensors (a base or merged model); nothing to convert to {to}", path=path)
    if source_form == to:
        raise RouteError(f"is already in {source_form} form", path=path)
    if source_form == "adapter" and to == "base":
        raise RouteError("an adapter holds no base weights: the base is the model it was trained on", path=path)
    raise RouteError(f"no route from {source_form} to {to}", path=path)  # pragma: no cover - the table is complete
