"""PEFT's HRA (``peft_type: HRA``): r Householder reflections of a weight's input side, ``W ← W·H``.

Each module is a :class:`LoraModule` with ``tuner`` ``hra`` and its one tensor in ``factors``: ``hra_u`` (in, r)
(a Conv2d's in = in_channels·k·k), the reflection vectors; with ``apply_GS`` PEFT orthonormalises them first
(QR), else it multiplies the reflections of the normalised columns (compact WY form).  ``rank`` is r.  The
product is built in :mod:`..oft_math` and applied by the merge engine (``routes/oft_terms.py``); no route that
writes LoRA factors takes it.  Split and attach write HRA's own tensors.

Layouts (a ParameterDict): the saved adapter holds ``<module>.hra_u``, PEFT's in-model state dict
``<module>.hra_u.<name>`` beside ``<module>.base_layer.weight``.
"""

from __future__ import annotations

import re

from ..errors import AdapterError
from ..inventory import Inventory, LoraModule
from ..io.reader import Checkpoint
from .boft import read_parameter_dicts
from .vera import config_of_type

PEFT_TYPE = "HRA"
_KEY = re.compile(r"^.+\.hra_u(?:\.(?!weight$|bias$)[^.]+)?$", re.DOTALL)
KEYS = ("apply_GS",)  # HRA's own field, shown by detect (r is LoRA's name too)


class HraDialect:
    """HRA checkpoints: claimed by ``hra_u`` tensors or an adapter_config.json saying HRA."""

    name = "hra"

    def claims(self, ck: Checkpoint) -> bool:
        return any(_KEY.fullmatch(k) for k in ck.tensors) or config_of_type(ck, PEFT_TYPE) is not None

    def read(self, ck: Checkpoint) -> Inventory:
        inv, data, cfg, parts = read_parameter_dicts(ck, PEFT_TYPE, "hra", ("hra_u",), KEYS)
        gs = bool(data.get("apply_GS", False))
        for (ad, mod), keys in sorted(parts.items()):
            key = keys["hra_u"]
            info = ck.info(key)
            if not info.is_float or len(info.shape) != 2 or 0 in info.shape:
                raise AdapterError(
                    f"hra_u of shape {list(info.shape)} ({info.dtype_name}): PEFT's HRA stores a float (in, r) tensor",
                    path=info.file,
                    tensor=key,
                )
            base = inv.base.get(f"{mod}.weight")
            shape = ck.info(base).shape if base is not None else ()
            m = LoraModule(
                mod,
                ad,
                "conv" if len(shape) > 2 else "linear",
                key,
                key,
                info.shape[1],
                info.shape[0],
                shape[0] if shape else 0,
                scaling=1.0,
                tuner="hra",
                factors={"hra_u": key},
                factor_params=info.shape[0] * info.shape[1],
                tuner_args={"apply_GS": gs},
            )
            inv.lora.setdefault(ad, {})[mod] = m
            inv.configs[ad] = cfg
            inv.tuner[ad] = {"peft_type": PEFT_TYPE, "r": data.get("r"), "apply_GS": gs}
        return inv
