"""Tiny real models built from transformers configs, wrapped with PEFT — the oracle for every test."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB = 96
SEQ = torch.tensor([[1, 5, 9, 17, 33, 2, 64, 80, 95, 3, 7, 11]])


def decoder_config(
    config_cls: str = "LlamaConfig",
    *,
    vocab: int = VOCAB,
    hidden: int = 32,
    inter: int = 48,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    tie: bool = False,
    max_positions: int | None = 64,
    **extra,
):
    """The one tiny decoder config every builder starts from (``config_cls`` names a transformers config class;
    ``extra`` adds that architecture's own fields); ``max_positions=None`` keeps the class's default."""
    import transformers

    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tie,
    )
    if max_positions is not None:
        fields["max_position_embeddings"] = max_positions
    return getattr(transformers, config_cls)(**fields, **extra)


def llama(*, tie: bool = False, vocab: int = VOCAB, layers: int = 2, seed: int = 0, dtype=torch.float32):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(decoder_config(vocab=vocab, layers=layers, tie=tie)).to(dtype).eval()


def qwen2(*, tie: bool = True, vocab: int = VOCAB, seed: int = 0):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(decoder_config("Qwen2Config", vocab=vocab, tie=tie)).eval()


def gpt2(*, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def peft_wrap(model, adapter_name: str = "default", seed: int = 1, **lora_kwargs):
    """PEFT model with non-zero, random LoRA weights (B = 0 would make every test pass)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora_kwargs.setdefault("init_lora_weights", False)
    pm = get_peft_model(model, LoraConfig(**lora_kwargs), adapter_name=adapter_name)
    with torch.no_grad():  # make magnitudes / saved copies differ from the base too
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name or "modules_to_save" in name or "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p) * 0.1)
            if "lora_B" in name and name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    return pm.eval()


@torch.no_grad()
def logits(model, seq: torch.Tensor = SEQ) -> torch.Tensor:
    return model(seq).logits.float()


def save_unmerged(pm, path: Path, *, prefixed: bool = True) -> Path:
    """An 'unmerged' checkpoint as users store one: the PEFT model's full state dict, its
    adapter_config.json and the base's config.json."""
    path.mkdir(parents=True, exist_ok=True)
    sd = pm.state_dict()
    if not prefixed:
        sd = {k.removeprefix("base_model.model."): v for k, v in sd.items()}
    save_file(
        {k: v.detach().clone().contiguous() for k, v in sd.items()},
        str(path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    name = next(iter(pm.peft_config))
    pm.peft_config[name].save_pretrained(str(path))
    pm.get_base_model().config.save_pretrained(str(path))
    return path


def load_merged(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# -- vision-language models (their text part is what an adapter's prefixes are about) ---------------------

VLM_TEXT = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
)
VLM_SEQ = torch.tensor([[1, 5, 9, 33, 2, 17, 40, 3]])  # text only: no image token (63)


def vlm(name: str, *, seed: int = 0):
    """A tiny Qwen2-VL, Gemma 3 or Llava (Llama text), as transformers builds it from a config."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    torch.manual_seed(seed)
    if name == "qwen2_vl":
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}
        vision = dict(
            depth=1,
            embed_dim=16,
            hidden_size=16,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        )
        model = Qwen2VLForConditionalGeneration(
            Qwen2VLConfig(text_config=dict(VLM_TEXT, rope_parameters=rope), vision_config=vision)
        )
    elif name == "gemma3":
        vision = dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        cfg = Gemma3Config(
            text_config=dict(VLM_TEXT, head_dim=8, sliding_window=16), vision_config=vision, mm_tokens_per_image=4
        )
        model = Gemma3ForConditionalGeneration(cfg)
    elif name == "llava":
        vision = dict(
            model_type="clip_vision_model",
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            projection_dim=16,
        )
        cfg = LlavaConfig(text_config=LlamaConfig(**VLM_TEXT).to_dict(), vision_config=vision, image_token_index=63)
        model = LlavaForConditionalGeneration(cfg)
    else:
        raise ValueError(name)
    return model.eval()


# -- diffusion models (diffusers' UNet, CLIP's text encoder) -------------------------------------------------

UNET_SD = dict(  # SD 1.x-like: conv 1×1 proj_in/out, attention in the first down and last up block
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")
)
UNET_XL = dict(  # SDXL-like: linear proj_in/out, no attention in the first down and last up block
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
)


def unet(*, seed: int = 0, **kind):
    """A tiny UNet2DConditionModel (208 tensors): conv 3×3 ResNets and samplers, conv 1×1 shortcuts."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
        **(kind or UNET_SD),
    ).eval()


UNET_INPUT = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([10]))
UNET_CONTEXT = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(6))


@torch.no_grad()
def unet_out(model) -> torch.Tensor:
    return model(*UNET_INPUT, UNET_CONTEXT).sample.float()


UNET_TARGETS = ["to_q", "to_k", "to_out.0", "ff.net.0.proj", "proj_in", "conv1", "conv_shortcut", "time_emb_proj"]
UNET_TARGETS += ["downsamplers.0.conv"]


def peft_unet(tmp_path: Path, *, dora: bool = False):
    """Base UNet saved at ``tmp_path / "unet"``, then PEFT's LoRA on it (random B; conv layers, rank and alpha
    patterns, DoRA magnitudes moved off their start): the model and its reference output."""
    from peft import LoraConfig

    model = unet()
    model.save_pretrained(str(tmp_path / "unet"))
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=UNET_TARGETS,
        rank_pattern={"conv1": 2, "time_emb_proj": 6},
        alpha_pattern={"proj_in": 3, "to_k": 5},
        init_lora_weights=False,
        use_dora=dora,
    )
    torch.manual_seed(1)
    model.add_adapter(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model, unet_out(model)


def clip_text(*, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return CLIPTextModel(cfg).eval()


def peft_stack(base, adapters: list[tuple[Path, float]]):
    """PEFT's model with several saved adapters loaded and active together, ``set_scale`` for the weights:
    the reference for merging (and verifying) several adapters at once."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    names = [f"a{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(base, str(adapters[0][0]), adapter_name=names[0])
    for name, (path, _) in zip(names[1:], adapters[1:], strict=True):
        model.load_adapter(str(path), adapter_name=name)
    model.base_model.set_adapter(names)
    for mod in model.modules():
        if isinstance(mod, LoraLayer):
            for name, (_, weight) in zip(names, adapters, strict=True):
                mod.set_scale(name, weight)
    return model.eval()


class LayerKinds(torch.nn.Module):
    """Every layer kind PEFT builds LoHa/LoKr on: Linear, Conv2d 3×3 and 1×1, Conv1d k=3 and k=1."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(24, 36)
        self.conv = torch.nn.Conv2d(8, 12, 3, padding=1)
        self.pw = torch.nn.Conv2d(12, 8, 1)
        self.c1 = torch.nn.Conv1d(8, 6, 3)
        self.c1p = torch.nn.Conv1d(6, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
