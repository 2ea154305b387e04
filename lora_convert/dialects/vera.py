"""PEFT's VeRA (``peft_type: VERA``) read as LoRA factors.

PEFT's ``vera.Linear.get_delta_weight`` is ``ΔW = (λ_b ⊙ vera_B[:out, :]) @ (λ_d ⊙ vera_A[:, :in])``: two
frozen random projections shared by every layer — ``vera_A`` (r, largest in) and ``vera_B`` (largest out,
r) — and per layer the trained vectors ``vera_lambda_b`` (out) and ``vera_lambda_d`` (r); no scaling.  So
``A' = λ_d ⊙ vera_A[:r, :in]`` and ``B' = λ_b ⊙ vera_B[:out, :r]`` are LoRA factors with scaling 1,
presented through :class:`~lora_convert.io.views.ScaledSource` under the λ vectors' names (the factors
are shared, the names are each layer's own); split and attach write VeRA's own tensors.

Layouts: the saved adapter holds ``<module>.vera_lambda_b`` / ``.vera_lambda_d`` and, with
``save_projection`` (PEFT's default), ``base_model.vera_A`` / ``base_model.vera_B``; PEFT's in-model state
dict holds ``.vera_lambda_b.<name>`` ..., a copy of the projections under every layer
(``<module>.vera_A.<name>``) and ``base_model.vera_A.<name>``.

A layer's input width is not in the adapter (``vera_A`` is as wide as the widest target): an unmerged
checkpoint gives it (``base_layer.weight``), an adapter takes it from the base (:func:`bind_to_base`),
and routes without a base refuse it.  Without ``save_projection`` the projections are not in the file:
PEFT regenerates them from ``projection_prng_key`` with torch's generator, which PEFT itself warns may
differ between systems — refused by name rather than guessed.
"""

from __future__ import annotations

import re
from typing import Any

from ..config import AdapterConfig
from ..errors import AdapterError, UnsupportedError
from ..inventory import DEFAULT_ADAPTER, Inventory, LoraModule
from ..io.reader import Checkpoint
from ..io.safetensors_format import TensorInfo
from ..io.views import ScaledSource
from . import adapter_config_object
from .peft_keys import Role, parse_key

PEFT_TYPE = "VERA"
SHARED = "base_model."  # the projections are the tuner's, not a layer's: base_model.vera_A
_SHARED = re.compile(r"^(?:base_model\.)?(?P<role>vera_A|vera_B)(?:\.(?P<name>[^.]+))?$", re.DOTALL)  # (unprefixed too)
_SAVED = re.compile(r"^(?P<mod>.+)\.(?P<role>vera_lambda_b|vera_lambda_d)$", re.DOTALL)
_IN_MODEL = re.compile(
    r"^(?P<mod>.+)\.(?P<role>vera_lambda_b|vera_lambda_d|vera_A|vera_B)\.(?P<name>(?!weight$|bias$)[^.]+)$", re.DOTALL
)
_PREFIX = "base_model.model."
NEEDS_BASE = "input_widths"  # inv.tuner key: the adapter's layers take their input width from the base


def config_of_type(ck: Checkpoint, peft_type: str) -> dict[str, Any] | None:
    """The adapter_config.json's object when it says ``peft_type`` (None otherwise, or unreadable: the PEFT
    dialect then names what is wrong with it).  Each of PEFT's other tuners claims its checkpoints by it."""
    data = adapter_config_object(ck)
    return data if data is not None and str(data.get("peft_type") or "").upper() == peft_type else None


class VeraDialect:
    """VeRA checkpoints: claimed by ``vera_lambda_*`` tensors or an adapter_config.json saying VERA."""

    name = "vera"

    def claims(self, ck: Checkpoint) -> bool:
        if any(".vera_lambda_" in k for k in ck.tensors):
            return True
        return config_of_type(ck, PEFT_TYPE) is not None

    def read(self, ck: Checkpoint) -> Inventory:
        data = config_of_type(ck, PEFT_TYPE)
        where = ck.adapter_config_path or ck.root
        if data is None:
            raise AdapterError(
                "VeRA tensors (vera_lambda_b/d) without an adapter_config.json saying peft_type VERA",
                path=where,
                hint="put the adapter_config.json PEFT saved with this VeRA adapter beside its weights",
            )
        cfg = AdapterConfig.from_dict(data, source=str(where))
        cfg.peft_type = PEFT_TYPE
        parts, shared, inv = _sort(ck)
        if not parts:
            raise AdapterError("adapter_config.json says VeRA, but no vera_lambda_b/d tensors are here", path=where)
        if data.get("save_projection") is False or not shared:
            raise UnsupportedError(
                "VeRA adapter saved without its projections (save_projection false, no vera_A/vera_B): PEFT "
                "regenerates them from projection_prng_key with torch's generator, which it warns may differ "
                "between systems",
                path=where,
                hint="save the adapter with save_projection=True (PEFT's default)",
            )
        one_adapter(ck, parts, "VeRA")
        views = ScaledSource()
        for ad in sorted({a for a, _ in parts}):
            proj = shared.get(ad) or shared.get(DEFAULT_ADAPTER) or next(iter(shared.values()))
            for role in ("vera_A", "vera_B"):
                if role not in proj:
                    have = next(iter(proj.values()))
                    raise AdapterError(f"{role} is missing beside {have}", path=ck.root, tensor=have)
            va, vb = _stored(ck, proj["vera_A"]), _stored(ck, proj["vera_B"])
            _check_projections(cfg, va, vb)
            inv.native.setdefault(ad, {})[""] = dict(proj)
            for (a2, mod), keys in sorted(parts.items()):
                if a2 != ad:
                    continue
                width = None
                if inv.form == "unmerged":
                    width = _base_width(ck, inv, mod, cfg, keys)
                inv.lora.setdefault(ad, {})[mod] = _module(ck, ad, mod, keys, va, vb, width, views)
                inv.native[ad][mod] = {r: keys[r] for r in ("vera_lambda_b", "vera_lambda_d")}
            inv.configs[ad] = cfg
            inv.tuner[ad] = {"peft_type": PEFT_TYPE, "r": cfg.r, "vera_A": list(va.shape), "vera_B": list(vb.shape)}
            if inv.form == "adapter":
                inv.tuner[ad][NEEDS_BASE] = "from the base"
        return inv


def one_adapter(ck: Checkpoint, parts: dict[tuple[str, str], dict[str, str]], tuner: str) -> None:
    """One adapter per checkpoint: PEFT keeps each named adapter's config in its own subfolder, and a tuner's
    config here is the top-level one, so a second adapter's numbers would be guessed."""
    names = sorted({a for a, _ in parts})
    if len(names) > 1:
        key = next(k for (a, _), keys in sorted(parts.items()) if a == names[1] for k in keys.values())
        raise UnsupportedError(
            f"{len(names)} {tuner} adapters in one checkpoint ({', '.join(names)}): only one is read, with the "
            "adapter_config.json beside it",
            path=ck.root,
            tensor=key,
            hint="save each adapter on its own (PEFT's save_pretrained(selected_adapters=[...]))",
        )


def _stored(ck: Checkpoint, key: str) -> TensorInfo:
    info = ck.info(key)
    return info.source.stored(key) if isinstance(info.source, ScaledSource) else info  # a second reading


def _check_projections(cfg: AdapterConfig, va: TensorInfo, vb: TensorInfo) -> None:
    for info in (va, vb):
        if not info.is_float or len(info.shape) != 2:
            raise AdapterError(
                f"VeRA projection of shape {list(info.shape)} ({info.dtype_name}): expected a 2-D floating-point tensor",
                path=info.file,
                tensor=info.name,
            )
    if va.shape[0] != cfg.r or vb.shape[1] != cfg.r:
        raise AdapterError(
            f"vera_A {list(va.shape)} and vera_B {list(vb.shape)} do not have r={cfg.r} rows / columns as the config says",
            path=va.file,
            tensor=va.name if va.shape[0] != cfg.r else vb.name,
        )


def _sort(
    ck: Checkpoint,
) -> tuple[dict[tuple[str, str], dict[str, str]], dict[str, dict[str, str]], Inventory]:
    """VeRA's per-layer tensors per (adapter, module), its projections per adapter, and the rest."""
    saved: dict[tuple[str, str], dict[str, str]] = {}
    in_model: dict[tuple[str, str], dict[str, str]] = {}
    shared: dict[str, dict[str, str]] = {}
    rest: list[str] = []
    fallback = ck.adapter_name or DEFAULT_ADAPTER
    for k in ck.tensors:
        m = _SHARED.fullmatch(k)
        if m:
            shared.setdefault(m["name"] or fallback, {})[m["role"]] = k
            continue
        m = _IN_MODEL.fullmatch(k)
        if m:
            if m["role"].startswith("vera_lambda"):  # the per-layer copies of the projections are left aside
                in_model.setdefault((m["name"], m["mod"].removeprefix(_PREFIX)), {})[m["role"]] = k
            continue
        m = _SAVED.fullmatch(k)
        if m:
            saved.setdefault((fallback, m["mod"].removeprefix(_PREFIX)), {})[m["role"]] = k
            continue
        rest.append(k)
    if saved and in_model:
        key = next(iter(next(iter(in_model.values())).values()))
        raise AdapterError(
            "mixes VeRA's saved-adapter names (<module>.vera_lambda_b) with in-model ones (.vera_lambda_b.<name>)",
            path=ck.root,
            tensor=key,
        )
    form = "unmerged" if in_model else "adapter"
    inv = Inventory(form=form, dialect="vera", prefixed=any(k.startswith(_PREFIX) for k in ck.tensors))
    sort_rest(ck, inv, rest, fallback, "a VeRA checkpoint: VeRA's are vera_lambda_b/d and vera_A/B")
    return (saved or in_model), shared, inv


def sort_rest(ck: Checkpoint, inv: Inventory, rest: list[str], fallback: str, where: str) -> None:
    """The tensors of a tuner's checkpoint that are not the tuner's: base tensors (unmerged), replacements
    (modules_to_save, layers saved whole); a LoRA tensor among them is refused (``where`` says whose)."""
    form = inv.form
    for k in rest:
        p = parse_key(k)
        if p.role.is_lora or p.role is Role.TOKENS_DELTA:
            raise UnsupportedError(f"a {p.role.value} tensor in {where}", path=ck.root, tensor=k)
        if p.role is Role.MODULES_TO_SAVE:
            inv.replace.setdefault(p.adapter or fallback, {})[p.base_key] = k
        elif p.role is Role.ORIGINAL_MODULE:
            inv.base[p.base_key] = k
        elif form == "adapter":
            inv.replace.setdefault(fallback, {})[p.base_key] = k
            if p.via_base_layer:
                inv.saved_layers.setdefault(fallback, set()).add(p.base_key)
        elif not (p.base_key in inv.base and not p.via_base_layer):
            inv.base[p.base_key] = k


def _base_width(ck: Checkpoint, inv: Inventory, mod: str, cfg: AdapterConfig, keys: dict[str, str]) -> int:
    """A layer's input width from its base weight in the same checkpoint (Conv1D stores it (in, out))."""
    key = inv.base.get(f"{mod}.weight")
    if key is None:
        raise AdapterError(
            f"VeRA module {mod} has no base weight beside it", path=ck.root, tensor=keys["vera_lambda_b"]
        )
    return weight_width(ck.info(key), cfg, keys["vera_lambda_b"])


def weight_width(info: TensorInfo, cfg: AdapterConfig, lambda_key: str) -> int:
    if len(info.shape) != 2:
        raise UnsupportedError(
            f"VeRA on a weight of shape {list(info.shape)}: PEFT's VeRA wraps linear layers only",
            path=info.file,
            tensor=lambda_key,
        )
    return int(info.shape[0] if cfg.fan_in_fan_out else info.shape[1])


def _module(
    ck: Checkpoint,
    adapter: str,
    mod: str,
    keys: dict[str, str],
    va: TensorInfo,
    vb: TensorInfo,
    width: int | None,
    views: ScaledSource,
) -> LoraModule:
    have = next(iter(keys.values()))
    for role in ("vera_lambda_b", "vera_lambda_d"):
        if role not in keys:
            raise AdapterError(f"{role} is missing for VeRA module {mod}", path=ck.root, tensor=have)
    lb, ld = _stored(ck, keys["vera_lambda_b"]), _stored(ck, keys["vera_lambda_d"])
    for info in (lb, ld):
        if not info.is_float or len(info.shape) != 1:
            raise AdapterError(
                f"VeRA vector of shape {list(info.shape)} ({info.dtype_name}): expected a 1-D floating-point vector",
                path=info.file,
                tensor=info.name,
            )
    r, out_f = va.shape[0], lb.shape[0]
    if ld.shape[0] != r:
        raise AdapterError(
            f"vera_lambda_d has {ld.shape[0]} values, vera_A has r={r} rows", path=ld.file, tensor=ld.name
        )
    if out_f > vb.shape[0]:
        raise AdapterError(
            f"vera_lambda_b has {out_f} values, more than vera_B's {vb.shape[0]} rows", path=lb.file, tensor=lb.name
        )
    in_f = va.shape[1] if width is None else width
    if in_f > va.shape[1]:
        raise AdapterError(
            f"the layer takes {in_f} inputs, more than vera_A's {va.shape[1]} columns", path=lb.file, tensor=lb.name
        )
    ck.tensors[ld.name] = views.view(ld.name, va, ld, 0, (r, in_f), stored=ld)
    ck.tensors[lb.name] = views.view(lb.name, vb, lb, 0, (out_f, r), stored=lb)
    return LoraModule(mod, adapter, "linear", ld.name, lb.name, r, in_f, out_f, scaling=1.0, trained_params=out_f + r)


def bind_to_base(ck: Checkpoint, inv: Inventory, adapter: str, base: Checkpoint, config: dict[str, Any] | None) -> None:
    """Give a VeRA adapter's layers their input width from ``base`` (a no-op for other adapters)."""
    tuner = inv.tuner.get(adapter, {})
    if tuner.get("peft_type") != PEFT_TYPE or NEEDS_BASE not in tuner:
        return
    from ..module_match import match_modules

    mods = inv.modules(adapter)
    match = match_modules(list(mods), base.tensors, spelled=inv.spelled, config=config)
    cfg = inv.configs[adapter]
    views = ScaledSource()
    proj = inv.native[adapter][""]
    va, vb = _stored(ck, proj["vera_A"]), _stored(ck, proj["vera_B"])
    for mod, m in mods.items():
        key = f"{match.mapping.get(mod, mod)}.weight"
        if key not in base.tensors:
            continue  # the route's own module matching names what is missing
        width = weight_width(base.info(key), cfg, m.b_key)
        keys = inv.native[adapter][mod]
        inv.lora[adapter][mod] = _module(ck, adapter, mod, keys, va, vb, width, views)
    del tuner[NEEDS_BASE]
