"""What we know about model architectures, in one place: which modules are embeddings and output
heads, whether the two are tied, where a multimodal config keeps its text model, which models store
linear weights transposed (GPT-2's ``Conv1D``), and the shape numbers ``report`` counts with.

Everything here reads ``config.json`` (a dict) and tensor names; nothing opens a file or imports
torch.  A new architecture fact goes here, not into the module that first needs it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError

# Short module names (the last path component).
INPUT_EMBEDDINGS = frozenset({"embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "embeddings"})
# Learned position tables are nn.Embedding too (GPT-2 wpe, OPT embed_positions, BERT-style): PEFT gives
# them lora_embedding_A/B, never the tied head's delta.
POSITION_EMBEDDINGS = frozenset({"wpe", "embed_positions", "position_embeddings"})
OTHER_EMBEDDINGS = frozenset({"token_type_embeddings", "shared"})
EMBEDDINGS = INPUT_EMBEDDINGS | POSITION_EMBEDDINGS | OTHER_EMBEDDINGS
HEADS = frozenset({"lm_head", "embed_out", "output"})
HEAD_KEY = "lm_head.weight"  # where transformers' causal LMs keep the output head

# Architectures whose linear layers are transformers' Conv1D, stored (in, out).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})

# Module names -> the kind ``report`` breaks LoRA costs down by.
REPORT_KINDS = (
    "embed_tokens",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "lm_head",
    "other",
)
_KIND_ALIASES = {
    "embed_tokens": "embed_tokens",
    "wte": "embed_tokens",
    "word_embeddings": "embed_tokens",
    "tok_embeddings": "embed_tokens",
    "embed_in": "embed_tokens",
    "q_proj": "q_proj",
    "query": "q_proj",
    "k_proj": "k_proj",
    "key": "k_proj",
    "v_proj": "v_proj",
    "value": "v_proj",
    "o_proj": "o_proj",
    "out_proj": "o_proj",
    "gate_proj": "gate_proj",
    "w1": "gate_proj",
    "up_proj": "up_proj",
    "w3": "up_proj",
    "c_fc": "up_proj",
    "fc1": "up_proj",
    "down_proj": "down_proj",
    "w2": "down_proj",
    "fc2": "down_proj",
    "lm_head": "lm_head",
    "embed_out": "lm_head",
}


def short_name(module: str) -> str:
    """The last path component (``q_proj``), which is what ``target_modules`` usually names."""
    return module.rsplit(".", 1)[-1]


LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks|block|layer)\.(\d+)\.")  # decoder-layer containers


def layer_index(module: str) -> int | None:
    """Decoder-layer index of a module path (``model.layers.3.mlp.up_proj`` -> 3), if any."""
    m = LAYER_INDEX.search(f".{module}.")
    return int(m.group(1)) if m else None


def module_of(key: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj``."""
    return key.rsplit(".", 1)[0] if "." in key else key


# -- config.json ------------------------------------------------------------------------------


def text_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """The text model's config: ``text_config`` of a multimodal config, else the config itself."""
    if not config:
        return {}
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def config_value(config: dict[str, Any] | None, key: str, default: Any = None) -> Any:
    """``config[key]``, else ``config["text_config"][key]`` (multimodal configs), else ``default``."""
    if config and config.get(key) is not None:
        return config[key]
    value = text_config(config).get(key)
    return default if value is None else value


def stores_conv1d(config: dict[str, Any] | None) -> bool:
    """Whether the model's linear weights are GPT-2 ``Conv1D`` (stored (in, out))."""
    return config_value(config, "model_type") in CONV1D_MODEL_TYPES


# -- tensor names -----------------------------------------------------------------------------


def is_embedding(module: str) -> bool:
    return short_name(module) in EMBEDDINGS


def is_position_embedding(module: str) -> bool:
    return short_name(module) in POSITION_EMBEDDINGS


def is_head(module: str) -> bool:
    return short_name(module) in HEADS


def input_embedding_key(keys: Iterable[str]) -> str | None:
    """The token embedding's weight among ``keys`` (``model.embed_tokens.weight``, ``transformer.wte.weight``)."""
    for k in keys:
        mod, _, param = k.rpartition(".")
        if param == "weight" and short_name(mod) in INPUT_EMBEDDINGS:
            return k
    return None


def ties_embeddings(config: dict[str, Any] | None, head_stored: bool) -> bool:
    """Whether the output head shares the input embedding's weight.  ``tie_word_embeddings`` decides;
    without it, a checkpoint that stores no head can only be tied."""
    tie = config_value(config, "tie_word_embeddings")
    return (not head_stored) if tie is None else bool(tie)


def tied_pair(config: dict[str, Any] | None, keys: Iterable[str]) -> tuple[str, str] | None:
    """(input embedding key, head key) when the model ties them.  A tied model's head *is* the input
    embedding at load time, whether or not the file also stores ``lm_head.weight``."""
    keys = list(keys)
    emb = input_embedding_key(keys)
    if emb is None or not ties_embeddings(config, HEAD_KEY in keys):
        return None
    return emb, HEAD_KEY


def tensor_kind(name: str, shape: tuple[int, ...], vocab: int | None) -> str:
    """linear | embedding | lm_head | other (what a LoRA cannot carry: 1-D, biases, norms)."""
    if len(shape) != 2 or not name.endswith(".weight"):
        return "other"
    module = module_of(name)
    if is_head(module):
        return "lm_head"
    if is_embedding(module) or (vocab and shape[0] == vocab and "embed" in name):
        return "embedding"
    return "linear"


def report_kind(module: str) -> str:
    """Module kind for ``report``'s breakdown; GPT-2's ``c_proj`` is o_proj under ``attn``, down_proj under ``mlp``."""
    parts = module.split(".")
    if parts[-1] == "c_proj" and len(parts) > 1:
        return {"attn": "o_proj", "mlp": "down_proj"}.get(parts[-2], "other")
    return _KIND_ALIASES.get(parts[-1], "other")


# -- shape numbers ------------------------------------------------------------------------------


@dataclass
class ModelShape:
    """The numbers ``report`` needs from config.json (None where the config does not say)."""

    layers: int | None = None
    heads: int | None = None
    head_dim: int | None = None
    hidden: int | None = None
    vocab: int | None = None
    tied: bool = False
    window_layers: int = 0
    sliding_window: int | None = None


def _first(config: dict[str, Any], *names: str) -> Any:
    for n in names:
        if config.get(n) is not None:
            return config[n]
    return None


def model_shape(config: dict[str, Any] | None, *, head_stored: bool = True) -> ModelShape:
    if not config:
        return ModelShape()
    text = text_config(config)
    s = ModelShape(
        layers=_first(text, "num_hidden_layers", "n_layer", "num_layers"),
        heads=_first(text, "num_attention_heads", "n_head", "num_heads"),
        hidden=_first(text, "hidden_size", "n_embd", "d_model"),
        vocab=_first(text, "vocab_size"),
        head_dim=_first(text, "head_dim"),
        tied=ties_embeddings(config, head_stored),
    )
    if s.head_dim is None and s.hidden and s.heads:
        s.head_dim = s.hidden // s.heads
    window = text.get("sliding_window")
    types = text.get("layer_types")
    if window and isinstance(types, list):
        s.window_layers = sum(1 for t in types if t == "sliding_attention")
        s.sliding_window = int(window)
    elif window and text.get("use_sliding_window"):
        s.window_layers = int(s.layers or 0)
        s.sliding_window = int(window)
    return s


def task_type(config: dict[str, Any] | None) -> str | None:
    """PEFT's ``task_type`` for the model's architecture (causal LMs; None where we cannot tell)."""
    for name in (config or {}).get("architectures") or []:
        if str(name).endswith(("ForCausalLM", "LMHeadModel")):
            return "CAUSAL_LM"
    return None


# -- config.json, type-checked -------------------------------------------------------------------


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**48


def _strings(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# The config.json keys this tool reads (at the top level and in text_config), with what they must be.
MODEL_CONFIG_SCHEMA: dict[str, tuple[Any, str]] = {
    "model_type": (lambda v: isinstance(v, str), "a string"),
    "architectures": (_strings, "a list of strings"),
    "tie_word_embeddings": (lambda v: isinstance(v, bool), "true or false"),
    "use_sliding_window": (lambda v: isinstance(v, bool), "true or false"),
    "text_config": (lambda v: isinstance(v, dict), "an object"),
    "quantization_config": (
        lambda v: isinstance(v, dict) and isinstance(v.get("quant_method", ""), str),
        "an object (with a string quant_method)",
    ),
    "layer_types": (_strings, "a list of strings"),
    **{
        k: (_count, "a non-negative integer")
        for k in (
            "vocab_size",
            "num_hidden_layers",
            "n_layer",
            "num_layers",
            "num_attention_heads",
            "n_head",
            "num_heads",
            "hidden_size",
            "n_embd",
            "d_model",
            "num_key_value_heads",
            "head_dim",
            "sliding_window",
        )
    },
}


def check_model_config(data: Any, path: Path) -> dict[str, Any] | None:
    """config.json as a dict whose keys we read have the right types (null: unset); None if it is not
    an object.  It comes from a stranger: a wrong type is refused by key, as in adapter_config.json,
    rather than raising deep inside a route."""
    if not isinstance(data, dict):
        return None
    for where, obj in (("", data), ("text_config.", data.get("text_config"))):
        if not isinstance(obj, dict):
            continue
        for key, (ok, what) in MODEL_CONFIG_SCHEMA.items():
            v = obj.get(key)
            if v is not None and not ok(v):
                shown = json.dumps(v, default=str)
                raise CheckpointError(
                    f"{where}{key} must be {what}, not {shown[:60]}", path=path, hint="fix this value in config.json"
                )
    return data
