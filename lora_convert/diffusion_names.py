"""What we know about diffusion models' LoRA names: kohya's (sd-scripts) prefixes and the words a kohya
name is spelled from, the SGM/LDM UNet block numbering SDXL kohya files use and how it maps to diffusers',
and which pipeline component (UNet, transformer, text encoder) a module belongs to.

Model facts like :mod:`.arch` (which keeps the facts of language models' ``config.json``): tables and
tensor names only; nothing opens a file or imports torch.
"""

from __future__ import annotations

from typing import Any

from .arch import DIFFUSION_COMPONENTS, is_diffusers_config

# kohya (sd-scripts) name prefixes -> the diffusers pipeline component the module belongs to.  SD 1.x/2.x
# have one text encoder (lora_te), SDXL two (lora_te1, lora_te2); ComfyUI writes diffusers-named SD3/Flux
# transformers as lora_transformer.
KOHYA_PREFIXES = {
    "lora_unet": "unet",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
    "lora_te3": "text_encoder_3",
    "lora_transformer": "transformer",
}

# Module names of diffusers' UNet2DConditionModel and of CLIP text encoders that contain '_', so that a
# kohya name (the module path with every '.' written '_') can be read back without the model.  Every
# component of a reading is one of these, one of the plain names below, or a number; anything else
# needs the base's own tensor names.
KOHYA_COMPOUNDS = frozenset(
    {
        "down_blocks",
        "mid_block",
        "up_blocks",
        "transformer_blocks",
        "proj_in",
        "proj_out",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "time_emb_proj",
        "conv_shortcut",
        "conv_in",
        "conv_out",
        "time_embedding",
        "add_embedding",
        "linear_1",
        "linear_2",
        "text_model",
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "token_embedding",
        "position_embedding",
        "text_projection",
    }
)
KOHYA_PLAIN_NAMES = frozenset(
    {
        "attentions",
        "resnets",
        "downsamplers",
        "upsamplers",
        "attn1",
        "attn2",
        "ff",
        "net",
        "proj",
        "conv",
        "conv1",
        "conv2",
        "encoder",
        "layers",
        "mlp",
        "fc1",
        "fc2",
        "embeddings",
    }
)

# SGM/LDM UNet names (below): read as compounds, but never a diffusers module, so always unsure.
KOHYA_SGM_COMPOUNDS = frozenset(
    {
        "input_blocks",
        "middle_block",
        "output_blocks",
        "in_layers",
        "out_layers",
        "emb_layers",
        "skip_connection",
        "time_embed",
        "label_emb",
    }
)

# SDXL kohya LoRAs name UNet modules by the SGM/LDM UNet sd-scripts trains on (input_blocks.4.1...), not
# by diffusers' (down_blocks.1.attentions.0...); the renames inside a ResNet block, and the modules
# outside the block structure.
_SGM_RESNET = {
    "in_layers.2": "conv1",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_SGM_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.2": "conv_out",
}


# Where a bare module path (a PEFT adapter of one pipeline component) says which component it is in.
_UNET_HEADS = frozenset(
    {"down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding", "add_embedding"}
)
_TRANSFORMER_HEADS = frozenset({"transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder"})


def diffusion_component(module: str, config: dict[str, Any] | None = None) -> str | None:
    """The pipeline component a module belongs to: its diffusers prefix, else the model's config (a
    UNet, a transformer, a CLIP text model), else its path; None for anything else (a language model)."""
    head = module.split(".", 1)[0]
    if head in DIFFUSION_COMPONENTS:
        return head
    cls = str((config or {}).get("_class_name") or ((config or {}).get("architectures") or [""])[0])
    if "UNet" in cls:
        return "unet"
    if "Transformer" in cls and is_diffusers_config(config):
        return "transformer"
    if cls.startswith("CLIPText"):
        return "text_encoder"
    if head in _UNET_HEADS:
        return "unet"
    if head in _TRANSFORMER_HEADS:
        return "transformer"
    if head == "text_model" or module.startswith("encoder.layers."):
        return "text_encoder"
    return None


def is_sgm_path(path: str) -> bool:
    """A UNet module path in SGM block numbering (``input_blocks.4.1...``), not diffusers'."""
    return path.split(".", 1)[0] in ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb") or (
        path == "out.2"
    )


MAX_LAYERS_PER_BLOCK = 64  # SD 1.x/2.x and SDXL UNets have 1 to 3


def sgm_to_diffusers(path: str, config: dict[str, Any] | None) -> str | None:
    """A UNet module path in SGM block numbering as diffusers names it, from the UNet's config
    (``layers_per_block``, the block types); None when ``path`` is not one or the config cannot say.

    Down block b holds ``layers_per_block`` ResNets (+ attentions) and a downsampler, SGM's input blocks
    ``1 + b·(layers_per_block+1) ...``; up block b holds one ResNet more, output blocks ``b·(lpb+1) ...``
    whose parts are [resnet, attention if the block has one, upsampler if not the last block]."""
    cfg = config or {}
    lpb, down, up = cfg.get("layers_per_block"), cfg.get("down_block_types"), cfg.get("up_block_types")
    if not isinstance(down, list | tuple) or not isinstance(up, list | tuple):
        return None
    if isinstance(lpb, bool) or not isinstance(lpb, int) or not 1 <= lpb <= MAX_LAYERS_PER_BLOCK:
        return None  # a count from a stranger's config.json: 0 or -1 would divide by zero below
    for old, new in _SGM_TOP.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old) :]
    parts = path.split(".")
    try:
        if parts[0] == "middle_block":
            where = ["resnets.0", "attentions.0", "resnets.1"][int(parts[1])]
            return _sgm_inner(f"mid_block.{where}", parts[2:])
        i, j, rest = int(parts[1]), int(parts[2]), parts[3:]
    except (IndexError, ValueError):
        return None
    if parts[0] == "input_blocks" and i > 0:
        block, layer = divmod(i - 1, lpb + 1)
        if block >= len(down):
            return None
        if layer == lpb:  # the downsampler: SGM's ``op`` is diffusers' ``conv``
            return f"down_blocks.{block}.downsamplers.0.conv" if (j, rest) == (0, ["op"]) else None
        kinds = ["resnets"] + (["attentions"] if "Attn" in str(down[block]) else [])
        return _sgm_inner(f"down_blocks.{block}.{kinds[j]}.{layer}", rest) if j < len(kinds) else None
    if parts[0] == "output_blocks":
        block, layer = divmod(i, lpb + 1)
        if block >= len(up):
            return None
        kinds = (
            ["resnets"]
            + (["attentions"] if "Attn" in str(up[block]) else [])
            + (["upsamplers"] if block < len(up) - 1 else [])
        )
        if j >= len(kinds):
            return None
        return _sgm_inner(f"up_blocks.{block}.{kinds[j]}.{0 if kinds[j] == 'upsamplers' else layer}", rest)
    return None


def _sgm_inner(block: str, rest: list[str]) -> str:
    tail = ".".join(rest)
    if ".resnets." in f".{block}.":
        for old, new in _SGM_RESNET.items():
            if tail == old or tail.startswith(old + "."):
                tail = new + tail[len(old) :]
                break
    return f"{block}.{tail}" if tail else block
