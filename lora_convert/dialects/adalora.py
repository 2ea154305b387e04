"""PEFT's AdaLoRA (``peft_type: ADALORA``) read as LoRA factors.

PEFT's ``SVDLinear.get_delta_weight`` is ``ΔW = B·(A ⊙ E) · scaling / (ranknum + 1e-5)`` with ``A`` =
``lora_A`` (r, in), ``E`` = ``lora_E`` (r, 1) (the singular values; rank masking already zeroes E's
rows), ``B`` = ``lora_B`` (out, r), ``scaling = lora_alpha`` (``r`` when ``lora_alpha <= 0``) and
``ranknum`` the layer's initial rank ``init_r`` as a float32 tensor.  So ``A' = A ⊙ E`` (A's rows scaled,
presented through :class:`~lora_convert.io.views.ScaledSource` under A's name) and ``B`` are LoRA
factors with ``scaling = lora_alpha / (ranknum + 1e-5)``: merge, report, GGUF, MLX and the other routes
read them unchanged.  Split and attach write AdaLoRA's own tensors (:attr:`Inventory.native`).

Layouts (``base_model.model.`` prefix or not):

* saved adapter: ``<module>.lora_A``, ``.lora_B``, ``.lora_E`` (ParameterDict entries: no ``.weight``);
  ``ranknum`` is not saved;
* in-model state dict: ``<module>.lora_A.<name>`` ... ``<module>.ranknum.<name>`` beside
  ``<module>.base_layer.weight``.

``rank_pattern`` is AdaLoRA's own: ``{"<module>.lora_E": [bool, ...]}``, the rows the budget kept.  A saved
adapter holds only those rows; PEFT's loader rebuilds the layer at ``sum(mask)`` rows and copies the old
``ranknum`` (``init_r``) back, so the divisor stays ``init_r`` (a layer resized to 0 rows adds nothing).
"""

from __future__ import annotations

import math
import re
import struct
from typing import Any

from ..config import AdapterConfig, check_schema
from ..errors import AdapterError, UnsupportedError
from ..inventory import DEFAULT_ADAPTER, Inventory, LoraModule
from ..io.reader import Checkpoint
from ..io.views import ScaledSource
from .peft_common import config_of_type, one_adapter
from .peft_keys import Role, parse_key

PEFT_TYPE = "ADALORA"
ROLES = ("lora_A", "lora_B", "lora_E")
_SAVED = re.compile(r"^(?P<mod>.+)\.(?P<role>lora_A|lora_B|lora_E)$", re.DOTALL)
_IN_MODEL = re.compile(
    r"^(?P<mod>.+)\.(?P<role>lora_A|lora_B|lora_E|ranknum)\.(?P<name>(?!weight$|bias$)[^.]+)$", re.DOTALL
)
_PREFIX = "base_model.model."


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 2**31


def _masks(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(m, list) and all(isinstance(b, bool) for b in m) for m in v.values())


# AdaLoRA's own keys; the LoRA ones it shares (lora_alpha, target_modules, ...) are config.SCHEMA's
SCHEMA: dict[str, tuple[Any, str]] = {
    "init_r": (_positive_int, "a positive integer"),
    "target_r": (_positive_int, "a positive integer"),
    "rank_pattern": (_masks, "an object of '<module>.lora_E' -> list of true/false (the rows the budget kept)"),
}


def _fp32(x: float) -> float:
    return float(struct.unpack("f", struct.pack("f", x))[0])


class AdaloraDialect:
    """AdaLoRA checkpoints: claimed by ``lora_E`` tensors or an adapter_config.json saying ADALORA."""

    name = "adalora"

    def claims(self, ck: Checkpoint) -> bool:
        if any(_SAVED.fullmatch(k) and k.endswith(".lora_E") for k in ck.tensors):
            return True
        if any((m := _IN_MODEL.fullmatch(k)) and m["role"] in ("lora_E", "ranknum") for k in ck.tensors):
            return True
        return config_of_type(ck, PEFT_TYPE) is not None

    def read(self, ck: Checkpoint) -> Inventory:
        data = config_of_type(ck, PEFT_TYPE)
        where = ck.adapter_config_path or ck.root
        if data is None:
            raise AdapterError(
                "AdaLoRA tensors (lora_E) without an adapter_config.json saying peft_type ADALORA: lora_alpha and "
                "init_r are unknown",
                path=where,
                hint="put the adapter_config.json PEFT saved with this AdaLoRA adapter beside its weights",
            )
        cfg = _config(data, str(where))
        parts, inv = _sort(ck)
        if not parts:
            raise AdapterError(
                "adapter_config.json says AdaLoRA, but no lora_A/lora_B/lora_E tensors are here", path=where
            )
        one_adapter(ck, parts, "AdaLoRA")
        views = ScaledSource()
        init_r = int(data.get("init_r") or 12)
        masks = {k.removeprefix(_PREFIX): v for k, v in (data.get("rank_pattern") or {}).items()}
        for (ad, mod), keys in sorted(parts.items()):
            m = _module(ck, ad, mod, keys, views, cfg, init_r, masks if inv.form == "adapter" else None)
            inv.native.setdefault(ad, {})[mod] = {r: keys[r] for r in (*ROLES, "ranknum") if r in keys}
            if m is not None:
                inv.lora.setdefault(ad, {})[mod] = m
        for ad in {a for a, _ in parts}:
            inv.configs[ad] = cfg
            inv.tuner[ad] = {
                "peft_type": PEFT_TYPE,
                "init_r": init_r,
                "target_r": data.get("target_r"),
                "lora_alpha": cfg.lora_alpha,
                "rank_pattern": "yes" if masks else "no",
            }
        return inv


def _config(data: dict[str, Any], source: str) -> AdapterConfig:
    """The LoRA config the routes read (``raw`` keeps AdaLoRA's own keys, written back as they were)."""
    check_schema(data, source, SCHEMA)
    if data.get("use_dora"):
        raise UnsupportedError("AdaLoRA with use_dora: PEFT refuses this combination", path=source)
    lora = {k: v for k, v in data.items() if k not in ("rank_pattern", "alpha_pattern")}
    cfg = AdapterConfig.from_dict(lora, source=source)
    cfg.raw = dict(data)
    cfg.peft_type = PEFT_TYPE
    if cfg.use_rslora:
        raise UnsupportedError(
            "AdaLoRA with use_rslora: PEFT's AdaLoRA ignores it (scaling is lora_alpha / ranknum)", path=source
        )
    return cfg


def _sort(ck: Checkpoint) -> tuple[dict[tuple[str, str], dict[str, str]], Inventory]:
    """AdaLoRA's tensors per (adapter, module), and the inventory of the rest (base / replacements)."""
    saved: dict[tuple[str, str], dict[str, str]] = {}
    in_model: dict[tuple[str, str], dict[str, str]] = {}
    rest: list[str] = []
    for k in ck.tensors:
        m = _IN_MODEL.fullmatch(k)
        if m:
            in_model.setdefault((m["name"], m["mod"].removeprefix(_PREFIX)), {})[m["role"]] = k
            continue
        m = _SAVED.fullmatch(k)
        if m:
            saved.setdefault((ck.adapter_name or DEFAULT_ADAPTER, m["mod"].removeprefix(_PREFIX)), {})[m["role"]] = k
            continue
        rest.append(k)
    if saved and in_model:
        key = next(iter(next(iter(in_model.values())).values()))
        raise AdapterError(
            "mixes AdaLoRA's saved-adapter names (<module>.lora_A) with in-model ones (<module>.lora_A.<name>)",
            path=ck.root,
            tensor=key,
        )
    form = "unmerged" if in_model else "adapter"
    inv = Inventory(form=form, dialect="adalora", prefixed=any(k.startswith(_PREFIX) for k in ck.tensors))
    fallback = ck.adapter_name or DEFAULT_ADAPTER
    for k in rest:
        p = parse_key(k)
        if p.role.is_lora or p.role is Role.TOKENS_DELTA:
            raise UnsupportedError(
                f"a {p.role.value} tensor in an AdaLoRA checkpoint: AdaLoRA's factors are lora_A, lora_B and lora_E",
                path=ck.root,
                tensor=k,
            )
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
    return (saved or in_model), inv


def _module(
    ck: Checkpoint,
    adapter: str,
    mod: str,
    keys: dict[str, str],
    views: ScaledSource,
    cfg: AdapterConfig,
    init_r: int,
    masks: dict[str, list[bool]] | None,
) -> LoraModule | None:
    """One AdaLoRA module as LoRA factors (None for a module the budget cut to rank 0: it adds nothing)."""
    have = next(iter(keys.values()))
    for role in ROLES:
        if role not in keys:
            raise AdapterError(f"{role} is missing for AdaLoRA module {mod}", path=ck.root, tensor=have)
    a, b, e = (ck.info(keys[r]) for r in ROLES)
    if isinstance(a.source, ScaledSource):  # read a second time: the view is in place
        a = a.source.stored(a.name)
    for info in (a, b, e):
        if not info.is_float:
            raise AdapterError(
                f"an AdaLoRA tensor stored as {info.dtype_name}: its factors are floating-point numbers",
                path=info.file,
                tensor=info.name,
            )
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise AdapterError(
            f"AdaLoRA's lora_A and lora_B must be 2-D, got {list(a.shape)} and {list(b.shape)}",
            path=a.file,
            tensor=a.name if len(a.shape) != 2 else b.name,
        )
    r = a.shape[0]
    if b.shape[1] != r:
        raise AdapterError(
            f"rank mismatch: lora_A has {r} rows, lora_B has {b.shape[1]} columns", path=b.file, tensor=b.name
        )
    if e.shape != (r, 1):
        raise AdapterError(
            f"lora_E has shape {list(e.shape)}, expected [{r}, 1] (one value per rank)", path=e.file, tensor=e.name
        )
    if masks is not None:
        mask = masks.get(f"{mod}.lora_E")
        want = sum(mask) if mask is not None else init_r
        if r != want:
            said = f"rank_pattern keeps {want} of its rows" if mask is not None else f"init_r is {want}"
            raise AdapterError(
                f"AdaLoRA module {mod}: {said}, the tensors have rank {r}; PEFT refuses to load it",
                path=cfg.source or ck.root,
                tensor=keys["lora_A"],
                hint="use the adapter_config.json saved with these tensors",
            )
    if r == 0:
        return None
    ranknum = float(init_r)
    if "ranknum" in keys:
        ranknum = ck.read_scalar(keys["ranknum"])
    if not math.isfinite(ranknum) or ranknum + 1e-5 <= 0:
        raise AdapterError(f"ranknum {ranknum} is not a rank", path=ck.root, tensor=keys.get("ranknum", have))
    alpha = cfg.lora_alpha if cfg.lora_alpha > 0 else float(r)
    scaling = alpha / _fp32(_fp32(ranknum) + _fp32(1e-5))
    in_f, out_f = a.shape[1], b.shape[0]
    ck.tensors[a.name] = views.view(a.name, a, e, 0, (r, in_f))
    return LoraModule(
        mod,
        adapter,
        "linear",
        a.name,
        b.name,
        r,
        in_f,
        out_f,
        scaling=scaling,
        trained_params=r * (in_f + out_f) + r,
    )
