"""The order transformers' models register their modules in, which PEFT walks them in: safetensors files
list tensors alphabetically, so only this table tells that order (``combine``'s dare masks are drawn in it).

Model facts (module names only); no file is opened, torch is not imported.
"""

from __future__ import annotations

# Module names in the order transformers' models register them (``named_modules()``): embeddings,
# decoder layers, attention before MLP, q/k/v/o, gate/up/down, GPT-2's c_attn/c_fc/c_proj, then the
# final norm and the head.  Safetensors files list tensors alphabetically, so this is what tells the
# order PEFT walks modules in (combine's dare masks are drawn in that order).
REGISTRATION_ORDER = (
    "model",
    "transformer",
    "language_model",
    "embed_tokens",
    "wte",
    "wpe",
    "layers",
    "h",
    "self_attn",
    "attn",
    "mlp",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "c_attn",
    "c_fc",
    "c_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "norm",
    "ln_f",
    "lm_head",
)
_ORDER = {name: i for i, name in enumerate(REGISTRATION_ORDER)}


def registration_key(module: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key that puts module paths in registration order: known names by the table above, layer
    numbers numerically, anything else after them, alphabetically."""
    key = []
    for part in module.split("."):
        if part.isdigit():
            key.append((1, int(part), ""))
        elif part in _ORDER:
            key.append((0, _ORDER[part], ""))
        else:
            key.append((2, 0, part))
    return tuple(key)
