"""Tiny real mixture-of-experts models built from transformers configs, and adapters for them in the
layouts trainers write: PEFT ``target_parameters`` (fused experts) and per-expert ``target_modules``
(the transformers-v4 layout PEFT converts on load)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

H, FF, E = 32, 24, 4  # 2·FF != H: shapes alone settle PEFT's (in, out) reading
VOCAB = 96
SEQ = torch.tensor([[1, 5, 9, 17, 33, 2, 64, 80, 95, 3, 7, 11]])


def config(name: str, **over):
    from transformers import (
        DeepseekV3Config,
        GptOssConfig,
        Llama4TextConfig,
        MixtralConfig,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    common = dict(
        vocab_size=VOCAB,
        hidden_size=H,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        num_hidden_layers=2,
    )
    common.update(over)
    if name == "qwen3_moe":
        return Qwen3MoeConfig(
            **{"intermediate_size": 48, "moe_intermediate_size": FF, "num_experts": E, "head_dim": 8, **common},
            num_experts_per_tok=2,
        )
    if name == "qwen2_moe":
        return Qwen2MoeConfig(
            **{"intermediate_size": 48, "moe_intermediate_size": FF, "num_experts": E, **common},
            shared_expert_intermediate_size=40,
            num_experts_per_tok=2,
        )
    if name == "mixtral":
        return MixtralConfig(**{"intermediate_size": FF, "num_local_experts": E, **common}, num_experts_per_tok=2)
    if name == "gpt_oss":
        return GptOssConfig(
            **{"intermediate_size": FF, "num_local_experts": E, "head_dim": 8, **common}, num_experts_per_tok=2
        )
    if name == "deepseek_v3":  # layer 0 dense, layer 1 routed experts plus a shared expert
        return DeepseekV3Config(
            **{"intermediate_size": 48, "moe_intermediate_size": FF, "n_routed_experts": E, **common},
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            rope_interleave=False,
        )
    if name == "llama4_text":  # experts fused on disk, (E, in, out), which PEFT reads swapped
        return Llama4TextConfig(
            **{"intermediate_size": FF, "num_local_experts": E, "head_dim": 8, **common},
            intermediate_size_mlp=48,
            num_experts_per_tok=1,
            interleave_moe_layer_step=1,
            attention_chunk_size=64,
        )
    raise ValueError(name)


def model(name: str, *, seed: int = 0, **over):
    """A tiny model with every weight random (a router at init would send all tokens alike)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(config(name, **over), dtype=torch.float32).eval()
    with torch.no_grad():
        for _, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return m


def save_base(m, path: Path, **kw) -> Path:
    m.save_pretrained(str(path), **kw)
    return path


def peft_experts(m, *, r: int = 2, alpha: float = 6, attn=("q_proj", "v_proj"), params=None, seed: int = 1, **kw):
    """PEFT target_parameters LoRA on the experts (plus attention targets), with random B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    experts = "feed_forward.experts" if m.config.model_type == "llama4_text" else "mlp.experts"
    params = params if params is not None else [f"{experts}.gate_up_proj", f"{experts}.down_proj"]
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(attn),
        target_parameters=params,
        init_lora_weights=False,
        **kw,
    )
    pm = get_peft_model(m, cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return pm


V4_NAMES = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}


def v4_adapter(name: str, base, path: Path, *, r: int = 2, alpha: float = 6, router: bool = False, seed: int = 3):
    """A per-expert (transformers v4 names) adapter written by hand, as trainers on transformers 4 saved
    them: one LoRA pair per expert and projection, plus q_proj (and the router with ``router``)."""
    from peft import LoraConfig

    g = torch.Generator().manual_seed(seed)
    prefix, parts = V4_NAMES[name]
    sd = {}

    def pair(module: str, din: int, dout: int) -> None:
        sd[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, din, generator=g) * 0.3
        sd[f"base_model.model.{module}.lora_B.weight"] = torch.randn(dout, r, generator=g) * 0.3

    layers = base.config.num_hidden_layers
    for li in range(layers):
        pair(f"model.layers.{li}.self_attn.q_proj", H, base.model.layers[li].self_attn.q_proj.weight.shape[0])
        for e in range(E):
            pair(f"model.layers.{li}.{prefix}.experts.{e}.{parts[0]}", H, FF)
            pair(f"model.layers.{li}.{prefix}.experts.{e}.{parts[1]}", H, FF)
            pair(f"model.layers.{li}.{prefix}.experts.{e}.{parts[2]}", FF, H)
        if router:
            pair(f"model.layers.{li}.{prefix}.gate", H, E)
    targets = ["q_proj", *parts] + (["gate"] if router else [])
    path.mkdir(parents=True)
    LoraConfig(r=r, lora_alpha=alpha, target_modules=targets).save_pretrained(str(path))
    save_file(sd, str(path / "adapter_model.safetensors"))
    return path


@torch.no_grad()
def logits(m, seq: torch.Tensor = SEQ) -> torch.Tensor:
    return m(seq).logits.float()


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def load_clean(base, adapter):
    """PeftModel.from_pretrained's two steps, keeping the load result it drops: no missing keys (PEFT warns
    about those) and no unexpected keys (PEFT drops those silently)."""
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(str(adapter))
    config.inference_mode = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel(load(base), config)
        res = pm.load_adapter(str(adapter), adapter_name="default")
    assert not [w for w in caught if "missing" in str(w.message).lower()], [str(w.message) for w in caught]
    assert not res.unexpected_keys and not res.missing_keys, res
    return pm.eval()


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def scaling(r: int, alpha: float, rslora: bool = False) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r
