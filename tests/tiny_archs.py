"""Tiny real decoder models of the architectures llama.cpp and mlx-lm run, built from transformers configs
(hidden 32, 2 layers, 4 heads / 2 KV heads of 8 dims: rows a multiple of 32, as GGUF's q8_0 needs)."""

from __future__ import annotations

import torch
from tiny import VOCAB, decoder_config

# architecture -> (config class, model class, extra config fields, every LoRA-able linear's short name)
ARCHS = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {},
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2},
        ["q_proj", "k_proj", "v_proj", "o_proj"],
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]),
    "qwen3moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True},
        ["q_proj", "k_proj", "v_proj", "o_proj"],
    ),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {}, ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {}, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}


def build(name: str, *, tie: bool = False, vocab: int = VOCAB, seed: int = 0):
    import transformers

    config_cls, model_cls, extra, _ = ARCHS[name]
    torch.manual_seed(seed)
    cfg = decoder_config(
        config_cls, vocab=vocab, inter=64, tie=tie, head_dim=8, bos_token_id=1, eos_token_id=2, **extra
    )
    model = getattr(transformers, model_cls)(cfg).float().eval()
    with torch.no_grad():  # norms away from 1, so that a wrong tensor mapping shows in logits
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def lora_layers(pm) -> dict:
    """{module path: PEFT LoRA layer} of a PEFT model's adapter "default"."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in pm.named_modules():
        if isinstance(mod, LoraLayer) and ("default" in mod.lora_A or "default" in mod.lora_embedding_A):
            out[name.removeprefix("base_model.model.")] = mod
    return out
