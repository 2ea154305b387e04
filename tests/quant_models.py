"""Tiny quantized checkpoints, made by the formats' own tools wherever they run on a CPU:

* fp8 block scales: transformers' ``Fp8Quantize`` (dims multiples of 128, where it quantizes), laid out as
  DeepSeek-V3 / Qwen3-FP8 releases are; partial edge blocks as DeepSeek's conversion pads them;
* compressed-tensors fp8: compressed-tensors itself (scales as llm-compressor's min-max observer sets them);
* bitsandbytes 4-bit and 8-bit: transformers + bitsandbytes, quantized on load and saved;
* MXFP4: no library quantizes it on a CPU, so our codec writes it; transformers' dequantization is the
  check (``test_quant_codecs``).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tiny import VOCAB, decoder_config

FP8_QC = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def quiet() -> None:
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)


def llama(*, hidden: int = 128, inter: int = 256, seed: int = 0, dtype=torch.bfloat16, std: float = 0.05):
    """A Llama whose projections are all (multiples of 128) x (multiples of 128) when hidden/inter are."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(decoder_config(hidden=hidden, inter=inter, kv_heads=4, head_dim=hidden // 4))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std) if p.dim() > 1 else p.uniform_(0.9, 1.1)
    return model.to(dtype).eval()


def deepseek_fp8(w: torch.Tensor, block=(128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's README_WEIGHTS recipe: zero-pad to whole blocks, s = amax/448, q = w/s, crop."""
    rows, cols = w.shape
    gr, gc = -(-rows // block[0]), -(-cols // block[1])
    padded = torch.zeros(gr * block[0], gc * block[1])
    padded[:rows, :cols] = w.float()
    tiles = padded.view(gr, block[0], gc, block[1])
    amax = tiles.abs().amax(dim=(1, 3))
    s = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
    q = (tiles / s[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.view(gr * block[0], gc * block[1])[:rows, :cols].contiguous(), s


def deepseek_dequant(q: torch.Tensor, s: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    rows, cols = q.shape
    return q.float() * s.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def save_fp8(model, path: Path, *, aligned: bool = True, qc: dict | None = None) -> dict[str, torch.Tensor]:
    """``model`` saved with every projection fp8 + ``weight_scale_inv``; returns the fp32 dequantized weights."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.utils.quantization_config import FineGrainedFP8Config

    class _Quantizer:
        quantization_config = FineGrainedFP8Config(**{k: v for k, v in (qc or {}).items() if k == "scale_fmt"})

    model.save_pretrained(path)
    sd = load_file(str(path / "model.safetensors"))
    out, deq = {}, {}
    for k, v in sd.items():
        if k.endswith("proj.weight"):
            if aligned:
                got = Fp8Quantize(_Quantizer()).convert({k: v})
                q, s = got[k], got[k + "_scale_inv"]
            else:
                q, s = deepseek_fp8(v)
            out[k], out[k + "_scale_inv"] = q, s
            deq[k] = deepseek_dequant(q, s.float())
        else:
            out[k] = v
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {**FP8_QC, **(qc or {})}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return deq


def load_dequantized(path: Path, dtype=torch.float32):
    """A quantized checkpoint as transformers loads it on a CPU, dequantized (compressed-tensors is told
    to: by default it would also quantize activations in the forward)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    quiet()
    qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    kw = (
        {"quantization_config": CompressedTensorsConfig(dequantize=True)}
        if qc.get("quant_method") == "compressed-tensors"
        else {}
    )
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kw).eval()


def plain_from(model_dir: Path, weights: dict[str, torch.Tensor]):
    """The architecture of ``model_dir`` (config only) holding ``weights`` (fp32): a dequantized base."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(model_dir))
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in m for m in missing), missing
    return model


def save_bnb(model, path: Path, **bnb_kwargs) -> None:
    """``model`` quantized by transformers + bitsandbytes on load and saved as transformers saves it."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quiet()
    plain = path.parent / (path.name + "-plain")
    model.save_pretrained(plain)
    q = AutoModelForCausalLM.from_pretrained(
        str(plain), quantization_config=BitsAndBytesConfig(**bnb_kwargs), device_map="cpu", dtype=torch.bfloat16
    )
    q.save_pretrained(path)


def save_ct(model, path: Path, scheme: str) -> None:
    """``model`` quantized by compressed-tensors with a preset scheme (FP8, FP8_DYNAMIC, FP8_BLOCK), the
    scales set as llm-compressor's min-max observer sets them, compressed and saved."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    quiet()
    sch = preset_name_to_scheme(scheme, ["Linear"])
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": sch}, ignore=["lm_head"]))
    args = sch.weights
    for _, mod in model.named_modules():
        if not hasattr(mod, "quantization_scheme"):
            continue
        w = mod.weight.data
        if args.strategy == "tensor":
            lo, hi = w.amin().reshape(1), w.amax().reshape(1)
        elif args.strategy == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        else:
            bh, bw = args.block_structure
            gr, gc = -(-w.shape[0] // bh), -(-w.shape[1] // bw)
            pad = torch.zeros(gr * bh, gc * bw, dtype=w.dtype)
            pad[: w.shape[0], : w.shape[1]] = w
            tiles = pad.view(gr, bh, gc, bw)
            lo, hi = tiles.amin((1, 3)), tiles.amax((1, 3))
        scale, _ = calculate_qparams(lo, hi, args)
        mod.weight_scale.data.copy_(scale.reshape(mod.weight_scale.shape))
        if getattr(mod, "input_scale", None) is not None:
            mod.input_scale.data.fill_(0.01)
    comp = ModelCompressor.from_pretrained_model(model)
    comp.compress_model(model)
    model.save_pretrained(path)
    comp.update_config(str(path))


def gpt_oss(*, seed: int = 0):
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    cfg = GptOssConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
        tie_word_embeddings=False,
        max_position_embeddings=64,
    )
    model = GptOssForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.uniform_(0.9, 1.1)
    return model.to(torch.bfloat16).eval()


MXFP4_QC = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}


def save_mxfp4(model, path: Path) -> None:
    """gpt-oss as OpenAI released it: experts as ``*_blocks``/``*_scales`` (our codec), the rest bf16."""
    from lora_convert.quant import mxfp4

    model.save_pretrained(path)
    sd = load_file(str(path / "model.safetensors"))
    out = {}
    for k, v in sd.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[k + "_blocks"], out[k + "_scales"] = mxfp4.quantize(v.float().transpose(1, 2))
        else:
            out[k] = v
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = MXFP4_QC
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
