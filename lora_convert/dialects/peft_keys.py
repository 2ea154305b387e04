"""PEFT's key grammar: one parser for every state-dict key PEFT writes, and its inverse.

A key is parsed into the *module* it belongs to (the path of the module in the base
model, e.g. ``model.layers.0.self_attn.q_proj``), its *role* (base weight, ``lora_A``,
DoRA magnitude, ...), the *adapter name* where the key carries one, and the *param*
(``weight``/``bias``; a dotted rest for ``modules_to_save`` wrappers around containers).

Layouts covered (all with or without the ``base_model.model.`` prefix):

* PEFT >= 0.7 in-model layout: ``q_proj.base_layer.weight``, ``q_proj.lora_A.default.weight``
* the older in-model layout, base weight at ``q_proj.weight`` beside the LoRA keys
* the saved-adapter layout, where adapter names are stripped: ``q_proj.lora_A.weight``,
  ``embed_tokens.lora_embedding_A``, ``q_proj.lora_magnitude_vector``
* ``lora_B.<name>.bias`` (lora_bias), ``lora_embedding_A/B[.<name>]``,
  ``lora_magnitude_vector[.<name>][.weight]``, ``modules_to_save.<name>.<param>``,
  ``original_module.<param>``, ``token_adapter.trainable_tokens_delta[.<name>]``,
  ``token_adapter.base_layer.weight``.

Everything else is a plain tensor of the base model (role ``BASE``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

PEFT_PREFIX = "base_model.model."


class Role(str, Enum):
    BASE = "base"  # a base-model tensor (plain, ``base_layer.*`` or ``token_adapter.base_layer.*``)
    LORA_A = "lora_A"
    LORA_B = "lora_B"
    EMBED_A = "lora_embedding_A"
    EMBED_B = "lora_embedding_B"
    MAGNITUDE = "lora_magnitude_vector"
    MODULES_TO_SAVE = "modules_to_save"  # the trained copy that replaces the module
    ORIGINAL_MODULE = "original_module"  # the frozen copy kept beside it
    TOKENS_DELTA = "trainable_tokens_delta"  # replaced rows of an embedding
    TUNER = "tuner"  # a LoHa/LoKr factor (``hada_w1_a``, ``lokr_w2``, ...): its name in ``param``

    @property
    def is_lora(self) -> bool:
        return self in LORA_ROLES


LORA_ROLES = frozenset({Role.LORA_A, Role.LORA_B, Role.EMBED_A, Role.EMBED_B, Role.MAGNITUDE, Role.TUNER})

# PEFT's LoHa and LoKr parameters (``adapter_layer_names``): a ParameterDict each, so the in-model key is
# ``<module>.<factor>.<adapter>`` and the saved one ``<module>.<factor>``
TUNER_FACTORS = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
_TUNER_NAMES = "|".join(n for names in TUNER_FACTORS.values() for n in names)


@dataclass(frozen=True)
class ParsedKey:
    """A state-dict key taken apart.  ``str(parsed)`` is not the source key; use :func:`format_key`."""

    key: str  # the key as found
    module: str  # module path in the base model, no PEFT prefix
    role: Role
    adapter: str | None  # adapter name when the key carries one
    param: str  # "weight", "bias", "" (lora_embedding_*, bare magnitude), or a dotted rest
    prefixed: bool  # had "base_model.model."
    via_base_layer: bool = False  # base tensor reached through ``base_layer`` (new layout)

    @property
    def base_key(self) -> str:
        """The key this tensor has (or replaces) in the plain base model."""
        return f"{self.module}.{self.param}" if self.param else self.module


_NAME = r"(?:\.(?P<name>[^.]+))"
_PATTERNS: list[tuple[Role, re.Pattern[str]]] = [
    (Role.LORA_A, re.compile(r"^(?P<mod>.+)\.lora_A(?:\.(?P<name>[^.]+))?\.(?P<param>weight|bias)$", re.DOTALL)),
    (Role.LORA_B, re.compile(r"^(?P<mod>.+)\.lora_B(?:\.(?P<name>[^.]+))?\.(?P<param>weight|bias)$", re.DOTALL)),
    (Role.EMBED_A, re.compile(rf"^(?P<mod>.+)\.lora_embedding_A{_NAME}?$", re.DOTALL)),
    (Role.EMBED_B, re.compile(rf"^(?P<mod>.+)\.lora_embedding_B{_NAME}?$", re.DOTALL)),
    (
        Role.MAGNITUDE,
        re.compile(
            r"^(?P<mod>.+)\.lora_magnitude_vector(?:\.(?P<name>(?!weight$)[^.]+))?(?:\.(?P<param>weight))?$", re.DOTALL
        ),
    ),
    (Role.TUNER, re.compile(rf"^(?P<mod>.+)\.(?P<param>{_TUNER_NAMES}){_NAME}?$", re.DOTALL)),
    (Role.TOKENS_DELTA, re.compile(rf"^(?P<mod>.+)\.token_adapter\.trainable_tokens_delta{_NAME}?$", re.DOTALL)),
    (Role.MODULES_TO_SAVE, re.compile(r"^(?P<mod>.+?)\.modules_to_save\.(?P<name>[^.]+)\.(?P<param>.+)$", re.DOTALL)),
    (Role.ORIGINAL_MODULE, re.compile(r"^(?P<mod>.+?)\.original_module\.(?P<param>.+)$", re.DOTALL)),
]
_BASE_LAYER = re.compile(r"^(?P<mod>.+?)\.(?:token_adapter\.)?base_layer\.(?P<param>.+)$", re.DOTALL)


def strip_prefix(key: str) -> tuple[str, bool]:
    if key.startswith(PEFT_PREFIX):
        return key[len(PEFT_PREFIX) :], True
    return key, False


def parse_key(key: str) -> ParsedKey:
    """Parse one state-dict key.  Never raises: an unknown key is a plain base tensor."""
    body, prefixed = strip_prefix(key)
    for role, pattern in _PATTERNS:
        m = pattern.fullmatch(body)  # whole names, newlines included (DOTALL): a hostile name parses like any other
        if m:
            groups = m.groupdict()
            param = groups.get("param") or ""
            if role is Role.MAGNITUDE:
                param = ""  # the magnitude is a vector of the module, never a param of it
            return ParsedKey(key, m["mod"], role, groups.get("name"), param, prefixed)
    m = _BASE_LAYER.fullmatch(body)
    if m:
        param = m["param"]
        while param.startswith("base_layer."):  # nested ParamWrappers (several target_parameters of one module)
            param = param[len("base_layer.") :]
        return ParsedKey(key, m["mod"], Role.BASE, None, param, prefixed, via_base_layer=True)
    mod, _, param = body.rpartition(".")
    if not mod:
        return ParsedKey(key, body, Role.BASE, None, "", prefixed)
    return ParsedKey(key, mod, Role.BASE, None, param, prefixed)


def format_key(
    module: str,
    role: Role,
    *,
    param: str = "weight",
    adapter: str | None = None,
    prefixed: bool = True,
    base_layer: bool | int = False,  # an int: that many nested base_layer (ParamWrappers)
) -> str:
    """Inverse of :func:`parse_key`.  ``adapter=None`` gives PEFT's saved-adapter layout."""
    prefix = PEFT_PREFIX if prefixed else ""
    name = f".{adapter}" if adapter else ""
    if role is Role.BASE:
        mid = ".base_layer" * int(base_layer)
        return f"{prefix}{module}{mid}.{param}" if param else f"{prefix}{module}"
    if role in (Role.LORA_A, Role.LORA_B):
        return f"{prefix}{module}.{role.value}{name}.{param}"
    if role in (Role.EMBED_A, Role.EMBED_B):
        return f"{prefix}{module}.{role.value}{name}"
    if role is Role.MAGNITUDE:
        return f"{prefix}{module}.lora_magnitude_vector{name}" + (".weight" if adapter else "")
    if role is Role.TOKENS_DELTA:
        return f"{prefix}{module}.token_adapter.trainable_tokens_delta{name}"
    if role is Role.TUNER:
        return f"{prefix}{module}.{param}{name}"
    if role is Role.MODULES_TO_SAVE:
        return f"{prefix}{module}.modules_to_save.{adapter or 'default'}.{param}"
    if role is Role.ORIGINAL_MODULE:
        return f"{prefix}{module}.original_module.{param}"
    raise ValueError(role)
