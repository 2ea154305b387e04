"""PEFT's layouts — the saved adapter (``adapter_model.safetensors``) and the in-model state dict of an
unmerged checkpoint — read into an :class:`~lora_convert.inventory.Inventory`.

Keys are parsed by :mod:`.peft_keys`; ranks come from the tensors, ``lora_alpha``/patterns/rsLoRA from
``adapter_config.json`` (:class:`~lora_convert.config.AdapterConfig`), resolved per module here so that
every route reads one number, :attr:`LoraModule.scaling`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from ..config import AdapterConfig
from ..errors import AdapterError
from ..inventory import DEFAULT_ADAPTER, Inventory, LoraModule
from ..io.reader import Checkpoint
from . import peft_tuners
from .peft_experts import resolve_experts
from .peft_keys import ParsedKey, Role, parse_key

_FACTOR_ROLES = (Role.LORA_A, Role.LORA_B, Role.EMBED_A, Role.EMBED_B, Role.TUNER)


class PeftDialect:
    """PEFT's key layouts (every version since 0.7, the older in-model one too).  Claims anything: the
    fallback dialect, under which a checkpoint without LoRA keys is a plain model."""

    name = "peft"

    def claims(self, ck: Checkpoint) -> bool:
        return True

    def read(self, ck: Checkpoint) -> Inventory:
        inv = build_inventory(ck)
        if inv.form == "plain":
            return inv
        cfg = AdapterConfig.load(ck.adapter_config_path) if ck.adapter_config_path else None
        if cfg is None and inv.form == "adapter":
            raise AdapterError(
                "adapter_config.json is missing",
                path=ck.root,
                hint="an adapter needs the adapter_config.json PEFT writes beside its weights",
            )
        configs = _own_configs(ck, inv.adapters, cfg)
        resolve_experts(inv, configs, ck)
        for name in inv.adapters:
            own = configs.get(name)
            if own is None:
                if configs or cfg is not None:  # configs are there, none of them this adapter's: alpha unknown
                    inv.problems[name] = [_not_its_config(ck, name, inv.adapters, sorted(configs))]
                continue
            inv.configs[name] = own
            inv.problems[name] = list(peft_tuners.resolve(own, inv.modules(name), name, ck))  # LoHa/LoKr: rank, type
            for m in inv.modules(name).values():
                m.scaling = own.scaling_for(m.config_key, m.rank)
            inv.problems[name] += list(_rank_disagreements(own, inv.modules(name).values(), name, ck))
            biased = [m for m in inv.modules(name).values() if m.bias_key]
            if biased and not own.lora_bias:
                inv.warnings.setdefault(name, []).append(_unflagged_bias(biased, own.source or str(ck.root)))
            if own.use_dora:
                missing = dora_without_magnitudes(
                    inv.modules(name).values(), path=own.source or ck.root, said="use_dora is true", loader="PEFT"
                )
                inv.problems[name] += [missing] if missing is not None else []
            else:
                unsaid = magnitudes_without_dora(inv.modules(name).values(), path=own.source or ck.root)
                inv.problems[name] += [unsaid] if unsaid is not None else []
        return inv


def magnitudes_without_dora(modules: Iterable[LoraModule], *, path: str | Path) -> AdapterError | None:
    """The reverse of :func:`dora_without_magnitudes`: DoRA magnitude vectors beside a config that says
    ``use_dora: false``.  PEFT builds plain LoRA layers and drops the magnitudes (an "unexpected keys"
    warning), so its merge is not the DoRA the tensors describe; which of the two was trained cannot be told."""
    mods = list(modules)
    dora = [m for m in mods if m.magnitude_key is not None]
    if not dora:
        return None
    return AdapterError(
        f"use_dora is false but {len(dora)} of the {len(mods)} LoRA modules hold a DoRA magnitude vector: PEFT "
        "would drop them and merge a plain LoRA, not the DoRA the tensors describe",
        path=path,
        tensor=dora[0].magnitude_key,
        hint="set use_dora: true in adapter_config.json if it was trained as DoRA; remove the magnitudes if not",
    )


def _unflagged_bias(modules: list[LoraModule], source: str) -> str:
    """mergekit writes bias deltas as ``lora_B.bias`` without setting ``lora_bias``: we merge them (what
    mergekit means: the merged biases are the tuned model's), while PEFT builds lora_B without a bias
    and drops them with a warning — said, since the two tools' merges differ."""
    return (
        f"{len(modules)} module(s) hold lora_B.bias (first: {modules[0].bias_key}) but lora_bias is false in "
        f"{Path(source).name}: merged as mergekit, which writes such files, means (base bias + scaling · "
        "lora_B.bias); PEFT would drop them with a warning"
    )


def dora_without_magnitudes(
    modules: Iterable[LoraModule], *, path: str | Path, said: str, loader: str
) -> AdapterError | None:
    """A config that says DoRA beside LoRA modules without magnitude vectors: the config's own library
    loads them as DoRA with magnitudes initialised from the base weights' norms (``m = ‖W‖``, so the
    merged weight is ``‖W‖·(W + ΔW)/‖W + ΔW‖``), not as the plain LoRA the tensors alone describe.
    Neither reading is what was trained (the trained magnitudes are gone), so the file is refused."""
    mods = list(modules)
    missing = [m for m in mods if m.magnitude_key is None]
    if not missing:
        return None
    return AdapterError(
        f"{said} but {len(missing)} of the {len(mods)} LoRA modules hold no DoRA magnitude vector (first: "
        f"{missing[0].module}): {loader} would load them as DoRA with magnitudes taken from the base weights' "
        "norms, not as the plain LoRA the tensors describe, and the trained magnitudes are not in the file",
        path=path,
        tensor=missing[0].a_key,
        hint="use the file saved with its magnitudes, or a config that says use_dora: false if it is a plain LoRA",
    )


def _own_configs(ck: Checkpoint, names: list[str], top: AdapterConfig | None) -> dict[str, AdapterConfig]:
    """Each adapter's own config, as PEFT's ``save_pretrained`` lays them out: a named adapter's in the
    subfolder named after it, the ``default`` adapter's at the top.  The top-level config of a checkpoint
    holding one adapter is that adapter's, whatever its name; with several, it is only ``default``'s —
    giving it to the others would merge them with another adapter's lora_alpha."""
    out: dict[str, AdapterConfig] = {}
    for name in names:
        sub = ck.root / name / "adapter_config.json"
        if ck.adapter_name is None and name != DEFAULT_ADAPTER and sub.is_file():
            out[name] = AdapterConfig.load(sub)
        elif top is not None and (len(names) == 1 or name == DEFAULT_ADAPTER):
            out[name] = top
    return out


def _not_its_config(ck: Checkpoint, name: str, names: list[str], have: list[str]) -> AdapterError:
    if ck.adapter_config_path is None:
        whose = f"only {', '.join(have)} has one"
    elif DEFAULT_ADAPTER in names:
        whose = (
            f"the adapter_config.json here belongs to adapter '{DEFAULT_ADAPTER}' "
            "(PEFT saves a named adapter's config in a subfolder named after it)"
        )
    else:
        whose = f"the adapter_config.json here belongs to one of {', '.join(names)} and does not say which"
    return AdapterError(
        f"adapter '{name}' has no adapter_config.json of its own, so its lora_alpha is unknown: {whose}",
        path=ck.root,
        hint=f"save the config of adapter '{name}' as {ck.root / name / 'adapter_config.json'}",
    )


def _rank_disagreements(
    cfg: AdapterConfig, modules: Iterable[LoraModule], adapter: str, ck: Checkpoint
) -> list[AdapterError]:
    """The config's rank for a module is not its tensors' rank.  PEFT refuses to load such an adapter (the
    shapes do not fit), and ``lora_alpha / r`` is not the scaling it was trained with under either rank:
    the modules' scaling is left unknown and conversions refuse."""
    bad = [m for m in modules if cfg.rank_for(m.config_key) != m.rank]
    if not bad:
        return []
    for m in bad:
        m.scaling = None
    m = bad[0]
    return [
        AdapterError(
            f"adapter {adapter}: {m.module}: config says r={cfg.rank_for(m.config_key)}, the tensors have rank {m.rank} "
            f"({len(bad)} module(s) disagree); PEFT refuses to load it and the scaling lora_alpha/r is unknown",
            path=cfg.source or ck.root,
            hint="use the adapter_config.json saved with these tensors (r and rank_pattern must match them)",
        )
    ]


def _form(ck: Checkpoint, parsed: list[ParsedKey]) -> str:
    """adapter | unmerged | plain, from the key names (and the file name: adapter_model.*)."""
    if not any(p.role.is_lora or p.role in (Role.TOKENS_DELTA, Role.MODULES_TO_SAVE) for p in parsed):
        return "plain"
    if ck.kind == "adapter":
        return "adapter"
    named = any(p.adapter for p in parsed if p.role in _FACTOR_ROLES)
    if named or any(p.role is Role.ORIGINAL_MODULE for p in parsed):
        return "unmerged"  # in-model layout: PEFT keeps adapter names only inside the model
    # saved layout without names: an adapter stored under a model-like file name, unless the base is there too
    lora_modules = {p.module for p in parsed if p.role.is_lora}
    plain = {p.module for p in parsed if p.role is Role.BASE and not p.via_base_layer}
    via_base_layer = any(p.via_base_layer for p in parsed)
    return "unmerged" if via_base_layer and len(plain - lora_modules) > len(lora_modules) else "adapter"


def build_inventory(ck: Checkpoint) -> Inventory:
    """Sort every tensor of ``ck`` into base / LoRA / replacement (scaling left unset: see
    :meth:`PeftDialect.read`).  Raises AdapterError for half-present LoRA pairs (lora_A without lora_B, ...)."""
    parsed = [parse_key(k) for k in ck.tensors]
    form = _form(ck, parsed)
    inv = Inventory(form=form, prefixed=any(p.prefixed for p in parsed))
    fallback = ck.adapter_name or DEFAULT_ADAPTER
    parts: dict[tuple[str, str], dict[Role, ParsedKey]] = {}
    bias_parts: dict[tuple[str, str], ParsedKey] = {}
    tuner_parts: dict[tuple[str, str], dict[str, ParsedKey]] = {}
    for p in parsed:
        ad = p.adapter or fallback
        if p.role is Role.TUNER:
            tuner_parts.setdefault((ad, p.module), {})[p.param] = p
        elif p.role.is_lora:
            if p.role is Role.LORA_B and p.param == "bias":
                bias_parts[(ad, p.module)] = p
            elif p.role is Role.LORA_A and p.param == "bias":
                raise AdapterError("lora_A has no bias in PEFT's LoRA", path=ck.root, tensor=p.key)
            else:
                parts.setdefault((ad, p.module), {})[p.role] = p
        elif p.role is Role.TOKENS_DELTA:
            inv.tokens.setdefault(ad, {})[p.module] = p.key
        elif p.role is Role.MODULES_TO_SAVE:
            inv.replace.setdefault(ad, {})[p.base_key] = p.key
        elif p.role is Role.ORIGINAL_MODULE:
            inv.base[p.base_key] = p.key
        elif form == "adapter":
            # In a saved adapter every non-LoRA tensor replaces a base tensor: modules_to_save,
            # embedding layers saved whole (resized vocab), biases with bias="all"/"lora_only".
            inv.replace.setdefault(fallback, {})[p.base_key] = p.key
            if p.via_base_layer:
                inv.saved_layers.setdefault(fallback, set()).add(p.base_key)
        elif not (p.base_key in inv.base and not p.via_base_layer):  # original_module already gave the base value
            inv.base[p.base_key] = p.key
    for (ad, module), roles in sorted(parts.items()):
        inv.lora.setdefault(ad, {})[module] = _module(ck, ad, module, roles, bias_parts.pop((ad, module), None))
    for (ad, module), factors in sorted(tuner_parts.items()):
        if module in inv.lora.get(ad, {}):
            raise AdapterError(
                f"module {module} holds LoRA and LoHa/LoKr factors",
                path=ck.root,
                tensor=next(iter(factors.values())).key,
            )
        inv.lora.setdefault(ad, {})[module] = peft_tuners.tuner_module(ck, ad, module, factors)
    for (_, module), p in bias_parts.items():
        raise AdapterError(f"lora_B.bias without lora_A/lora_B for module {module}", path=ck.root, tensor=p.key)
    if form == "unmerged":
        inv.old_layout = not any(p.via_base_layer for p in parsed) and any(
            f"{m.module}.weight" in inv.base for mods in inv.lora.values() for m in mods.values()
        )
    return inv


def conv_factors(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> bool:
    """PEFT's (and kohya's) LoRA of a convolution: A is a conv (r, in, *kernel), B a 1×1 conv (out, r, 1...)."""
    return len(a_shape) > 2 and len(b_shape) == len(a_shape) and all(d == 1 for d in b_shape[2:])


def _module(
    ck: Checkpoint, adapter: str, module: str, roles: dict[Role, ParsedKey], bias: ParsedKey | None
) -> LoraModule:
    """One LoRA module from its keys, after checking that the factors fit each other."""
    a = roles.get(Role.LORA_A) or roles.get(Role.EMBED_A)
    b = roles.get(Role.LORA_B) or roles.get(Role.EMBED_B)
    if a is None or b is None:
        have = next(iter(roles.values()))
        missing = "lora_A" if a is None else "lora_B"
        if Role.EMBED_A in roles or Role.EMBED_B in roles:
            missing = "lora_embedding_A" if a is None else "lora_embedding_B"
        raise AdapterError(f"{missing} is missing for module {module}", path=ck.root, tensor=have.key)
    embedding = a.role is Role.EMBED_A
    if embedding != (b.role is Role.EMBED_B):
        raise AdapterError(f"mixes lora_A/B with lora_embedding_A/B for module {module}", path=ck.root, tensor=a.key)
    ia, ib = ck.info(a.key), ck.info(b.key)
    conv = conv_factors(ia.shape, ib.shape) and not embedding
    if not conv and (len(ia.shape) != 2 or len(ib.shape) != 2):
        raise AdapterError(
            f"LoRA factors must be 2-D, got {list(ia.shape)} and {list(ib.shape)}", path=ck.root, tensor=a.key
        )
    r_a, r_b = ia.shape[0], ib.shape[1]
    if r_a != r_b:
        raise AdapterError(f"rank mismatch: A has {r_a} rows, B has {r_b} columns", path=ck.root, tensor=a.key)
    if r_a == 0:
        raise AdapterError("rank 0", path=ck.root, tensor=a.key)
    mag = roles.get(Role.MAGNITUDE)
    m = LoraModule(
        module,
        adapter,
        "embedding" if embedding else ("conv" if conv else "linear"),
        a.key,
        b.key,
        r_a,
        math.prod(ia.shape[1:]),
        ib.shape[0],
        bias.key if bias else None,
        mag.key if mag else None,
    )
    mag_shape = ck.info(mag.key).shape if mag is not None else ()
    if mag is not None and mag_shape != (m.out_features,) and not (conv and math.prod(mag_shape) == m.out_features):
        raise AdapterError(
            f"DoRA magnitude has shape {list(ck.info(mag.key).shape)}, expected [{m.out_features}]",
            path=ck.root,
            tensor=mag.key,
        )
    return m
