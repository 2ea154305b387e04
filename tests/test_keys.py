"""The key grammar: every layout parses, and formatting then parsing is the identity."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lora_convert.arch import layer_index
from lora_convert.dialects.peft_keys import Role, format_key, parse_key

ident = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(
    lambda s: (
        s
        not in {
            "weight",
            "bias",
            "base_layer",
            "lora_A",
            "lora_B",
            "modules_to_save",
            "original_module",
            "token_adapter",
            "lora_magnitude_vector",
            "lora_embedding_A",
            "lora_embedding_B",
        }
    )
)
modules = (
    st.lists(st.one_of(ident, st.integers(0, 99).map(str)), min_size=1, max_size=6)
    .map(".".join)
    .filter(lambda m: not m.split(".")[0].isdigit())
)
roles = st.sampled_from(
    [
        Role.LORA_A,
        Role.LORA_B,
        Role.EMBED_A,
        Role.EMBED_B,
        Role.MAGNITUDE,
        Role.TOKENS_DELTA,
        Role.MODULES_TO_SAVE,
        Role.ORIGINAL_MODULE,
        Role.BASE,
    ]
)


@settings(max_examples=400, deadline=None)
@given(
    module=modules,
    role=roles,
    adapter=st.one_of(st.none(), ident),
    prefixed=st.booleans(),
    base_layer=st.booleans(),
    param=st.sampled_from(["weight", "bias"]),
)
def test_format_then_parse_round_trips(module, role, adapter, prefixed, base_layer, param):
    if role is Role.MODULES_TO_SAVE and adapter is None:
        adapter = "default"
    if role in (Role.ORIGINAL_MODULE,):
        adapter = None
    if role in (Role.EMBED_A, Role.EMBED_B, Role.MAGNITUDE, Role.TOKENS_DELTA):
        param = ""
    if role is Role.LORA_A:
        param = "weight"
    key = format_key(
        module, role, param=param, adapter=adapter, prefixed=prefixed, base_layer=base_layer and role is Role.BASE
    )
    p = parse_key(key)
    assert p.module == module, key
    assert p.role is role, key
    assert p.prefixed is prefixed
    if role is Role.BASE:
        assert p.param == param and p.via_base_layer is (base_layer and role is Role.BASE)
    elif role is not Role.ORIGINAL_MODULE:
        assert p.adapter == adapter, key
    assert parse_key(key) == p  # deterministic


def test_known_layouts():
    cases = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": (
            "model.layers.0.self_attn.q_proj",
            Role.LORA_A,
            "default",
            "weight",
        ),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (
            "model.layers.0.self_attn.q_proj",
            Role.LORA_B,
            None,
            "weight",
        ),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": (
            "model.layers.0.self_attn.q_proj",
            Role.LORA_B,
            None,
            "bias",
        ),
        "base_model.model.model.embed_tokens.lora_embedding_A": ("model.embed_tokens", Role.EMBED_A, None, ""),
        "model.embed_tokens.lora_embedding_B.chat": ("model.embed_tokens", Role.EMBED_B, "chat", ""),
        "base_model.model.lm_head.lora_magnitude_vector": ("lm_head", Role.MAGNITUDE, None, ""),
        "base_model.model.lm_head.lora_magnitude_vector.weight": ("lm_head", Role.MAGNITUDE, None, ""),
        "base_model.model.lm_head.lora_magnitude_vector.default.weight": ("lm_head", Role.MAGNITUDE, "default", ""),
        "base_model.model.model.norm.modules_to_save.default.weight": (
            "model.norm",
            Role.MODULES_TO_SAVE,
            "default",
            "weight",
        ),
        "base_model.model.model.norm.original_module.weight": ("model.norm", Role.ORIGINAL_MODULE, None, "weight"),
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": (
            "model.embed_tokens",
            Role.TOKENS_DELTA,
            None,
            "",
        ),
        "base_model.model.model.embed_tokens.token_adapter.base_layer.weight": (
            "model.embed_tokens",
            Role.BASE,
            None,
            "weight",
        ),
        "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias": (
            "transformer.h.0.attn.c_attn",
            Role.BASE,
            None,
            "bias",
        ),
        "model.layers.3.mlp.down_proj.weight": ("model.layers.3.mlp.down_proj", Role.BASE, None, "weight"),
    }
    for key, (module, role, adapter, param) in cases.items():
        p = parse_key(key)
        assert (p.module, p.role, p.adapter, p.param) == (module, role, adapter, param), key


def test_layer_index():
    assert layer_index("model.layers.12.mlp.up_proj") == 12
    assert layer_index("transformer.h.3.attn.c_attn") == 3
    assert layer_index("lm_head") is None


def test_names_with_line_breaks_parse_like_any_other():
    """A hostile module name holding a newline (or ending in one) is still read by its role: before, the
    patterns' '.' stopped at the newline and a LoRA factor fell back to a plain base tensor."""
    for module in ("model.layers.0.q\nproj", "model.layers.0.q_proj\n", "\nmodel.layers.0.q_proj"):
        for role in (Role.LORA_A, Role.LORA_B, Role.EMBED_A, Role.MAGNITUDE, Role.TOKENS_DELTA):
            key = format_key(module, role, adapter="default")
            got = parse_key(key)
            assert (got.module, got.role, got.adapter) == (module, role, "default"), key
        base = parse_key(format_key(module, Role.BASE, base_layer=True))
        assert (base.module, base.param, base.via_base_layer) == (module, "weight", True)
    trailing = parse_key("base_model.model.model.layers.0.q_proj.lora_A.weight\n")
    assert trailing.role is Role.BASE and trailing.param == "weight\n"  # the name as stored, not a factor
