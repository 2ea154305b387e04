"""What we know about model architectures, in one place: which modules are embeddings and output
heads, whether the two are tied, where a multimodal config keeps its text model, which models store
linear weights transposed (GPT-2's ``Conv1D``), and the shape numbers ``report`` counts with.

Everything here reads ``config.json`` (a dict) and tensor names; nothing opens a file or imports
torch.  A new architecture fact goes here, not into the module that first needs it; a diffusion model's
names (kohya, SGM, pipeline components) go to :mod:`.diffusion_names`, the order models register
modules in to :mod:`.module_order`, MoE expert layouts to :mod:`.moe_layouts`.
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
    "experts",
    "router",
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


def is_diffusers_config(config: dict[str, Any] | None) -> bool:
    """A diffusers model's config.json (``_class_name``), not a transformers one."""
    return config is not None and "_class_name" in config and "architectures" not in config


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
    """Module kind for ``report``'s breakdown; GPT-2's ``c_proj`` is o_proj under ``attn``, down_proj under ``mlp``;
    routed experts (fused parameters or per-expert modules) are ``experts``, MoE routers ``router``."""
    parts = module.split(".")
    if "experts" in parts[:-1]:
        return "experts"
    if parts[-1] == "router" or (parts[-1] == "gate" and len(parts) > 1 and parts[-2] in ("mlp", "block_sparse_moe")):
        return "router"
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


# Layer counts build per-layer structures (llama.cpp's name map, report's meta-device model): the deepest
# real transformers have a few hundred layers, so a count beyond this is a broken or hostile config.json.
MAX_LAYERS = 4096
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def _layer_count(v: Any) -> bool:
    return _count(v) and v <= MAX_LAYERS


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
    **{k: (_layer_count, f"a layer count from 0 to {MAX_LAYERS}") for k in LAYER_COUNT_KEYS},
}


def check_model_config(data: Any, path: Path) -> dict[str, Any] | None:
    """config.json as a dict whose keys we read have the right types (null: unset); None if it is not
    an object.  It comes from a stranger: a wrong type is refused by key, as in adapter_config.json,
    rather than raising deep inside a route."""
    if not isinstance(data, dict):
        return None
    if is_diffusers_config(data):  # not transformers' keys (a UNet's num_attention_heads may be a list): the
        return data  # diffusion readers check the types of what they read (sgm_to_diffusers, diffusion_component)
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


def check_layer_count(config: dict[str, Any] | None, keys: Iterable[str], path: str | Path | None) -> None:
    """Refuse a config.json that claims more decoder layers than its own weights (``keys``) hold: the
    count sizes per-layer work, so it is bounded by the tensors' highest layer index.  Fewer is fine
    (extra layers, e.g. a multi-token-prediction head, are stored beyond the count)."""
    claimed = model_shape(config).layers if config else None
    if not claimed:
        return
    highest = max((i for k in keys if (i := layer_index(k)) is not None), default=None)
    if highest is not None and claimed > highest + 1:
        raise CheckpointError(
            f"num_hidden_layers is {claimed} but the weights hold layers 0-{highest} only",
            path=path,
            hint="fix num_hidden_layers in config.json",
        )


def head_count(config: dict[str, Any] | None, key: str, path: str | Path | None, default: int | None = None) -> int:
    """A head count of the text config (``num_attention_heads``, ``num_key_value_heads``): at least 1, as
    everything that splits rows into heads needs (``default`` where the key is absent or null)."""
    v = text_config(config).get(key)
    if v is None and default is not None:
        return default
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise CheckpointError(
            f"{key} must be a positive integer, not {json.dumps(v)[:60]}", path=path, hint="fix it in config.json"
        )
    return v


# -- prefixes that spell the same module in different layouts ----------------------------------------------

# Each tuple lists prefixes under which checkpoints of different layouts keep the same modules; an adapter
# module is matched to a base tensor across them (module_match.py).  A VLM's text decoder: text-only and
# Qwen2-VL as saved (``model.layers``), as transformers >= 4.52 holds a VLM and PEFT names its adapters
# (``model.language_model.layers``), the Llava family (Gemma 3, Mistral 3...) as save_pretrained still
# writes it (``language_model.model.layers``), a bare LlavaModel (``language_model.layers``); its vision
# parts with or without ``model.``.  CLIP text encoders: transformers 5 saves CLIPTextModel without
# ``text_model.``.  diffusers' LoRA files prefix every key with the pipeline component it is for.
EQUIVALENT_PREFIXES: tuple[tuple[str, ...], ...] = (
    ("model.language_model.", "language_model.model.", "model.", "language_model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.visual.", "visual."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("text_model.", ""),
    ("unet.", ""),
    ("transformer.", ""),
    ("text_encoder.", ""),
    ("text_encoder_2.", ""),
    ("text_encoder_3.", ""),
)
VLM_TEXT_PREFIXES = EQUIVALENT_PREFIXES[0]

# Parts of a checkpoint that an adapter may carry for a model the base is not: a diffusion pipeline's
# components (a kohya file holds UNet and text-encoder LoRA; each merges into its own folder) and a VLM's
# vision side (nothing to merge it into in a text-only base).
DIFFUSION_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
VISION_PREFIXES = tuple(p for group in EQUIVALENT_PREFIXES[2:5] for p in group)


def part_of(module: str) -> str | None:
    """The separable part (``text_encoder``, ``model.vision_tower.``) a module path belongs to, if any."""
    head = module.split(".", 1)[0]
    if head in DIFFUSION_COMPONENTS:
        return head
    return next((p for p in VISION_PREFIXES if module.startswith(p)), None)


def layout_of(modules: Iterable[str]) -> dict[str, str]:
    """Where an adapter's modules sit: {part: prefix} for the text decoder's and the vision parts'
    prefixes and the diffusion components found (what ``detect`` reports)."""
    out: dict[str, str] = {}
    for m in modules:
        head = m.split(".", 1)[0]
        if head in DIFFUSION_COMPONENTS:
            out.setdefault(head, head + ".")
            continue
        vision = next((p for p in VISION_PREFIXES if m.startswith(p)), None)
        if vision is not None:
            out.setdefault(vision.rstrip(".").rsplit(".", 1)[-1], vision)
            continue
        text = next((p for p in VLM_TEXT_PREFIXES if m.startswith(p + "layers.")), None)
        if text is not None:
            out.setdefault("text decoder", text)
    return out
