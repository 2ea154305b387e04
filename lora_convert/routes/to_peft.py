"""An adapter in another dialect (mlx-lm's) -> a PEFT adapter folder.

The dialect has already read the factors in PEFT's orientation and resolved each module's scaling into a
PEFT config, so this is PEFT's split (:func:`~.strip_split_attach.plan_split`: every factor under PEFT's
saved name, bytes as the dialect presents them) with ``target_modules`` naming exactly the modules
written — an adapter may cover only some layers, and PEFT warns about every module it wraps but finds no
weights for.
"""

from __future__ import annotations

from ..errors import RouteError
from .extract import target_regex
from .plan import Plan, Request
from .strip_split_attach import plan_split


def plan_adapter(req: Request) -> Plan:
    """adapter -> adapter: a PEFT adapter's expert LoRA in the other layout (``--moe-layout``, with the base),
    or another dialect's adapter written as PEFT's."""
    if req.moe_layout is not None:
        from .moe_adapter import plan_moe_layout  # only this route's --moe-layout needs it

        return plan_moe_layout(req)
    if req.inventory.dialect == "peft":
        raise RouteError(
            "is already a PEFT adapter",
            path=req.source.root,
            hint="--moe-layout per-expert|fused converts its expert LoRA to the other layout",
        )
    return plan_peft(req)


def plan_peft(req: Request) -> Plan:
    """Another dialect's adapter (plan_adapter has refused a PEFT one) as a PEFT adapter folder."""
    if req.inventory.dialect in ("kohya", "diffusers"):  # image-model LoRA: PEFT-style is diffusers' own file
        raise RouteError(
            f"a {req.inventory.dialect} LoRA file's PEFT-style form is diffusers' LoRA file",
            path=req.source.root,
            hint="use --to diffusers (or --to kohya); --base settles a kohya file's module names",
        )
    assert req.config is not None, "the API checks that an adapter config exists"
    req.config.check_supported()
    plan = plan_split(req)
    assert plan.adapter_config is not None
    plan.adapter_config["target_modules"] = target_regex(sorted(req.inventory.modules(req.adapter)))
    return plan
