"""A toy adapter format, for the test that a new format is one dialect module.

Keys are ``{module}.down`` (r, in), ``{module}.up`` (out, r) and a 0-d ``{module}.alpha``; the file says
``"format": "toy-lora"`` in its safetensors metadata.  Scaling is alpha / r per module.  Nothing in
lora_convert knows this format: registering :class:`ToyDialect` is all it takes to merge it.
"""

from __future__ import annotations

from lora_convert.config import AdapterConfig
from lora_convert.errors import AdapterError
from lora_convert.inventory import Inventory, LoraModule
from lora_convert.io.reader import Checkpoint

SUFFIXES = (".down", ".up", ".alpha")


class ToyDialect:
    name = "toy"

    def claims(self, ck: Checkpoint) -> bool:
        return ck.metadata.get("format") == "toy-lora"

    def read(self, ck: Checkpoint) -> Inventory:
        inv = Inventory(form="adapter", dialect=self.name)
        modules: dict[str, LoraModule] = {}
        for key in ck.tensors:
            if not key.endswith(".down"):
                if not key.endswith(SUFFIXES):
                    raise AdapterError("not a toy-lora key", path=ck.root, tensor=key)
                continue
            mod = key[: -len(".down")]
            down, up = ck.info(key), ck.info(f"{mod}.up")
            rank = down.shape[0]
            alpha = float(ck.read(f"{mod}.alpha"))
            modules[mod] = LoraModule(
                mod, "default", "linear", key, f"{mod}.up", rank, down.shape[1], up.shape[0], scaling=alpha / rank
            )
        inv.lora["default"] = modules
        ranks = {m.rank for m in modules.values()}
        inv.configs["default"] = AdapterConfig(
            r=min(ranks), lora_alpha=min(ranks), target_modules=sorted({m.name for m in modules.values()})
        )
        return inv
