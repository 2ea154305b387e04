"""PEFT's IA³ (``peft_type: IA3``): a learned vector that scales a weight, not a term added to it.

PEFT's ``ia3.Linear.merge`` is ``W ← W ⊙ transpose(l, fan_in_fan_out)`` with ``l = ia3_l`` of shape
``(1, in)`` on a feed-forward module (its input side: columns of nn.Linear's ``(out, in)`` weight) and
``(out, 1)`` otherwise (rows), where the base bias is scaled too (``b ← b ⊙ l``).  On nn.Conv2d/Conv3d
(``ia3._ConvNd``) the vector is ``(1, n, 1, 1[, 1])`` either way: a feed-forward module's scales the input
channels (every kernel element of a channel), another's the output channels and the bias.  Each module is a
:class:`LoraModule` of kind ``ia3`` whose ``a_key`` is the vector: the merge engine multiplies the base's
rows or columns by it (``routes/merge_engine.py``, the scales DoRA also uses) and no route that writes
LoRA factors takes it.  Split and attach write IA³'s own tensors.

Layouts: the saved adapter holds ``<module>.ia3_l``; PEFT's in-model state dict ``<module>.ia3_l.<name>``
beside ``<module>.base_layer.weight``.
"""

from __future__ import annotations

import re
from typing import Any

from ..config import AdapterConfig
from ..errors import AdapterError
from ..inventory import DEFAULT_ADAPTER, Inventory, LoraModule
from ..io.reader import Checkpoint
from .peft_common import config_of_type, one_adapter, sort_rest

PEFT_TYPE = "IA3"
_SAVED = re.compile(r"^(?P<mod>.+)\.ia3_l$", re.DOTALL)
_IN_MODEL = re.compile(r"^(?P<mod>.+)\.ia3_l\.(?P<name>(?!weight$|bias$)[^.]+)$", re.DOTALL)
_PREFIX = "base_model.model."


def _feedforward(data: dict[str, Any], module: str) -> bool:
    """PEFT's ``_check_target_module_feedforward``: a regex matched whole, or names the module ends with."""
    ff = data.get("feedforward_modules")
    if isinstance(ff, str):
        return bool(re.fullmatch(ff, module))
    return any(module.endswith(t) for t in ff or [] if isinstance(t, str))


class Ia3Dialect:
    """IA³ checkpoints: claimed by ``ia3_l`` tensors or an adapter_config.json saying IA3."""

    name = "ia3"

    def claims(self, ck: Checkpoint) -> bool:
        if any(_SAVED.fullmatch(k) or _IN_MODEL.fullmatch(k) for k in ck.tensors):
            return True
        return config_of_type(ck, PEFT_TYPE) is not None

    def read(self, ck: Checkpoint) -> Inventory:
        data = config_of_type(ck, PEFT_TYPE)
        where = ck.adapter_config_path or ck.root
        if data is None:
            raise AdapterError(
                "IA³ tensors (ia3_l) without an adapter_config.json saying peft_type IA3: which modules are "
                "feed-forward is unknown",
                path=where,
                hint="put the adapter_config.json PEFT saved with this IA³ adapter beside its weights",
            )
        lora = {k: v for k, v in data.items() if k not in ("feedforward_modules",)}
        cfg = AdapterConfig.from_dict(lora, source=str(where))
        cfg.raw, cfg.peft_type = dict(data), PEFT_TYPE
        fallback = ck.adapter_name or DEFAULT_ADAPTER
        parts: dict[tuple[str, str], dict[str, str]] = {}
        rest: list[str] = []
        in_model = any(_IN_MODEL.fullmatch(k) for k in ck.tensors)
        for k in ck.tensors:
            m = _IN_MODEL.fullmatch(k) if in_model else _SAVED.fullmatch(k)
            if m:
                ad = m.groupdict().get("name") or fallback
                parts[(ad, m["mod"].removeprefix(_PREFIX))] = {"ia3_l": k}
            else:
                rest.append(k)
        if not parts:
            raise AdapterError("adapter_config.json says IA³, but no ia3_l tensors are here", path=where)
        one_adapter(ck, parts, "IA³")
        inv = Inventory(
            form="unmerged" if in_model else "adapter",
            dialect="ia3",
            prefixed=any(k.startswith(_PREFIX) for k in ck.tensors),
        )
        sort_rest(ck, inv, rest, fallback, "an IA³ checkpoint: IA³'s are ia3_l")
        for (ad, mod), keys in sorted(parts.items()):
            inv.lora.setdefault(ad, {})[mod] = _module(ck, ad, mod, keys["ia3_l"], _feedforward(data, mod))
            inv.native.setdefault(ad, {})[mod] = dict(keys)
            inv.configs[ad] = cfg
            ff = data.get("feedforward_modules")
            inv.tuner[ad] = {
                "peft_type": PEFT_TYPE,
                "feedforward_modules": ff if isinstance(ff, str) else sorted(ff or []),
            }
        return inv


def _module(ck: Checkpoint, adapter: str, mod: str, key: str, feedforward: bool) -> LoraModule:
    """One IA³ module: ``in_features`` is the vector's length on a feed-forward module, else ``out_features``
    (the other side stays 0: the vector alone does not say it).  A linear layer's vector is ``(1, in)`` or
    ``(out, 1)``; a Conv2d/Conv3d layer's ``(1, n, 1, 1[, 1])`` on either side (PEFT's ``_ConvNd``)."""
    info = ck.info(key)
    shape = tuple(info.shape)
    conv = len(shape) in (4, 5) and shape[0] == 1 and all(d == 1 for d in shape[2:])
    if not info.is_float or not (len(shape) == 2 and 1 in shape or conv):
        raise AdapterError(
            f"ia3_l of shape {list(shape)} ({info.dtype_name}): PEFT's IA³ is a float (1, in) or (out, 1) vector "
            "on a linear layer, (1, channels, 1, 1[, 1]) on a convolution",
            path=info.file,
            tensor=key,
        )
    if not conv and (shape[0] == 1) != feedforward and shape != (1, 1):
        said = "is" if feedforward else "is not"
        want = "(1, in)" if feedforward else "(out, 1)"
        raise AdapterError(
            f"module {mod} {said} in feedforward_modules, so PEFT builds its ia3_l as {want}, not "
            f"{list(shape)}: PEFT refuses to load it",
            path=info.file,
            tensor=key,
        )
    n = shape[1] if feedforward or conv else shape[0]
    return LoraModule(
        mod,
        adapter,
        "ia3",
        key,
        key,
        1,
        n if feedforward else 0,
        0 if feedforward else n,
        scaling=1.0,
        trained_params=n,
    )
