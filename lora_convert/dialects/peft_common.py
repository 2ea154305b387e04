"""What PEFT's tuners other than LoRA share when their checkpoints are read (AdaLoRA, VeRA, IA³): claiming a
checkpoint by the ``peft_type`` of its adapter_config.json, one adapter per checkpoint, and sorting the tensors that
are not the tuner's own (base tensors, modules_to_save, layers saved whole).  Each tuner's dialect imports these, so
none of them imports another's.
"""

from __future__ import annotations

from typing import Any

from ..errors import AdapterError, LoraConvertError, UnsupportedError
from ..inventory import Inventory
from ..io.files import MAX_CONFIG_BYTES, load_json
from ..io.reader import Checkpoint
from .peft_keys import Role, parse_key


def adapter_config_object(ck: Checkpoint) -> dict[str, Any] | None:
    """The adapter_config.json's object (None: no such file, or one that cannot be read or is no object: the PEFT
    dialect then names what is wrong with it).  PEFT's other tuners claim their checkpoints by its peft_type."""
    if ck.adapter_config_path is None:
        return None
    try:
        data = load_json(
            ck.adapter_config_path, what="an adapter config", max_bytes=MAX_CONFIG_BYTES, error=AdapterError
        )
    except LoraConvertError:
        return None
    return data if isinstance(data, dict) else None


def config_of_type(ck: Checkpoint, peft_type: str) -> dict[str, Any] | None:
    """The adapter_config.json's object when it says ``peft_type`` (None otherwise, or unreadable: the PEFT
    dialect then names what is wrong with it).  Each of PEFT's other tuners claims its checkpoints by it."""
    data = adapter_config_object(ck)
    return data if data is not None and str(data.get("peft_type") or "").upper() == peft_type else None


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
