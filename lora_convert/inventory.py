"""What a checkpoint holds, from its key names and shapes alone: base tensors, LoRA modules per
adapter, replacement tensors, and which storage form that adds up to.

This is the single place where key names become meaning; detect, convert and report all
read an :class:`Inventory` instead of re-parsing keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import AdapterError
from .io.reader import Checkpoint
from .keys import ParsedKey, Role, layer_index, parse_key, short_name

DEFAULT_ADAPTER = "default"


@dataclass
class LoraModule:
    """One LoRA-wrapped module of one adapter."""

    module: str  # path in the base model, e.g. model.layers.0.self_attn.q_proj
    adapter: str
    kind: str  # "linear" or "embedding"
    a_key: str
    b_key: str
    rank: int
    in_features: int  # linear: A's columns; embedding: vocab (A_e's columns)
    out_features: int  # linear: B's rows; embedding: dim (B_e's rows)
    bias_key: str | None = None  # lora_B.bias (lora_bias=True)
    magnitude_key: str | None = None  # DoRA

    @property
    def name(self) -> str:
        return short_name(self.module)

    @property
    def layer(self) -> int | None:
        return layer_index(self.module)

    @property
    def weight_key(self) -> str:
        return f"{self.module}.weight"


@dataclass
class Inventory:
    form: str  # "adapter", "unmerged" or "plain"
    base: dict[str, str] = field(default_factory=dict)  # base key -> source key (plain/base_layer/original_module)
    lora: dict[str, dict[str, LoraModule]] = field(default_factory=dict)  # adapter -> module -> LoraModule
    replace: dict[str, dict[str, str]] = field(default_factory=dict)  # adapter -> base key -> source key
    tokens: dict[str, dict[str, str]] = field(default_factory=dict)  # adapter -> module -> delta key
    saved_layers: dict[str, set[str]] = field(default_factory=dict)  # adapter -> base keys saved whole via base_layer
    prefixed: bool = False
    old_layout: bool = False  # base weight at q_proj.weight beside q_proj.lora_A.<name>.weight

    @property
    def adapters(self) -> list[str]:
        names = set(self.lora) | set(self.replace) | set(self.tokens)
        return sorted(names)

    def modules(self, adapter: str) -> dict[str, LoraModule]:
        return self.lora.get(adapter, {})


def _group(ck: Checkpoint) -> tuple[list[ParsedKey], bool]:
    parsed = [parse_key(k) for k in ck.tensors]
    return parsed, any(p.prefixed for p in parsed)


def build_inventory(ck: Checkpoint, *, default_adapter: str | None = None) -> Inventory:
    """Sort every tensor of ``ck`` into base / LoRA / replacement.  Raises AdapterError for
    half-present LoRA pairs (lora_A without lora_B, ...)."""
    parsed, prefixed = _group(ck)
    named = any(p.adapter for p in parsed if p.role in (Role.LORA_A, Role.LORA_B, Role.EMBED_A, Role.EMBED_B))
    has_lora = any(p.role.is_lora or p.role in (Role.TOKENS_DELTA, Role.MODULES_TO_SAVE) for p in parsed)
    via_base_layer = any(p.via_base_layer for p in parsed)
    if not has_lora:
        form = "plain"
    elif ck.kind == "adapter":
        form = "adapter"
    elif named or any(p.role is Role.ORIGINAL_MODULE for p in parsed):
        form = "unmerged"  # in-model layout: PEFT keeps adapter names only inside the model
    else:
        # saved layout without names: an adapter stored under a model-like file name, unless the base is there too
        lora_modules = {p.module for p in parsed if p.role.is_lora}
        plain = {p.module for p in parsed if p.role is Role.BASE and not p.via_base_layer}
        form = "unmerged" if via_base_layer and len(plain - lora_modules) > len(lora_modules) else "adapter"
    fallback = default_adapter or ck.adapter_name or DEFAULT_ADAPTER
    inv = Inventory(form=form, prefixed=prefixed)

    parts: dict[tuple[str, str], dict[Role, ParsedKey]] = {}
    bias_parts: dict[tuple[str, str], ParsedKey] = {}
    for p in parsed:
        ad = p.adapter or fallback
        if p.role in (Role.LORA_A, Role.LORA_B, Role.EMBED_A, Role.EMBED_B, Role.MAGNITUDE):
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
        else:  # BASE
            if form == "adapter":
                # In a saved adapter every non-LoRA tensor replaces a base tensor: modules_to_save,
                # embedding layers saved whole (resized vocab), biases with bias="all"/"lora_only".
                inv.replace.setdefault(fallback, {})[p.base_key] = p.key
                if p.via_base_layer:
                    inv.saved_layers.setdefault(fallback, set()).add(p.base_key)
            elif p.base_key in inv.base and p.via_base_layer is False:
                continue  # original_module already gave the base value
            else:
                inv.base[p.base_key] = p.key

    for (ad, module), roles in sorted(parts.items()):
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
            raise AdapterError(f"mixes lora_A/B with lora_embedding_A/B for module {module}", path=ck.root,
                               tensor=a.key)
        ia, ib = ck.info(a.key), ck.info(b.key)
        if len(ia.shape) != 2 or len(ib.shape) != 2:
            raise AdapterError(f"LoRA factors must be 2-D, got {list(ia.shape)} and {list(ib.shape)}",
                               path=ck.root, tensor=a.key)
        r_a, r_b = ia.shape[0], ib.shape[1]
        if r_a != r_b:
            raise AdapterError(f"rank mismatch: A has {r_a} rows, B has {r_b} columns", path=ck.root, tensor=a.key)
        if r_a == 0:
            raise AdapterError("rank 0", path=ck.root, tensor=a.key)
        mag = roles.get(Role.MAGNITUDE)
        bias = bias_parts.pop((ad, module), None)
        lm = LoraModule(module, ad, "embedding" if embedding else "linear", a.key, b.key, r_a,
                        ia.shape[1], ib.shape[0], bias.key if bias else None, mag.key if mag else None)
        if mag is not None and ck.info(mag.key).shape != (lm.out_features,):
            raise AdapterError(f"DoRA magnitude has shape {list(ck.info(mag.key).shape)}, expected "
                               f"[{lm.out_features}]", path=ck.root, tensor=mag.key)
        inv.lora.setdefault(ad, {})[module] = lm
    for (ad, module), p in bias_parts.items():
        raise AdapterError(f"lora_B.bias without lora_A/lora_B for module {module}", path=ck.root, tensor=p.key)

    if form == "unmerged":
        inv.old_layout = not via_base_layer and any(
            f"{lm.module}.weight" in inv.base for mods in inv.lora.values() for lm in mods.values())
    return inv
