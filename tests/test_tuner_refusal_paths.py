"""Refusals of tuner merges name the adapter's file and tensor, and the tuner they are about: a weighted (or
stacked) rotation merge (PEFT's OFT, LyCORIS's Diag-OFT: a rotation has no scale), and another tuner's module on an
embedding (PEFT builds none of LoHa, LoKr, SHiRA, ... there)."""

from __future__ import annotations

import json

import torch
from helpers import cli, one_error
from lycoris.modules.diag_oft import DiagOFTModule
from peft import OFTConfig
from safetensors.torch import save_file
from tiny import llama, unet


def test_a_weighted_oft_merge_names_the_adapter_and_its_tensor(tmp_path):
    llama().save_pretrained(str(tmp_path / "base"))
    ad = tmp_path / "adapter"
    ad.mkdir()
    key = "base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight"
    save_file({key: torch.randn(4, 28) * 0.1}, str(ad / "adapter_model.safetensors"))  # 4 blocks of 8×8: in 32
    cfg = OFTConfig(oft_block_size=8, target_modules=["q_proj"]).to_dict()
    cfg["peft_type"], cfg["target_modules"] = "OFT", ["q_proj"]
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    line = one_error(cli("merge", tmp_path / "base", "--adapter", f"{ad}:0.5", "-o", out), "OFT rotates", key, out=out)
    assert str(ad) in line


def test_a_weighted_diag_oft_merge_names_the_file_and_its_tensor(tmp_path):
    base = unet()
    base.save_pretrained(str(tmp_path / "unet"))
    mod = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    name = "lora_unet_" + mod.replace(".", "_")
    m = DiagOFTModule(name, dict(base.named_modules())[mod], 1.0, lora_dim=2)
    with torch.no_grad():
        m.oft_blocks.normal_(0, 0.3)
    (tmp_path / "k").mkdir()
    sd = {f"{name}.{k}": v.detach().clone().contiguous() for k, v in m.state_dict().items()}
    save_file(sd, str(tmp_path / "k" / "oft.safetensors"), metadata={"ss_network_module": "lycoris.kohya"})
    out = tmp_path / "out"
    res = cli("merge", tmp_path / "unet", "--adapter", f"{tmp_path / 'k'}:0.5", "-o", out)
    line = one_error(res, "Diag-OFT rotates this weight", f"{name}.oft_blocks", out=out)
    assert str(tmp_path / "k") in line


def test_another_tuner_on_an_embedding_is_refused_naming_that_tuner(tmp_path):
    llama().save_pretrained(str(tmp_path / "base"))
    ad = tmp_path / "adapter"
    ad.mkdir()
    mod = "base_model.model.model.embed_tokens"
    save_file(
        {f"{mod}.lokr_w1": torch.ones(4, 4), f"{mod}.lokr_w2": torch.ones(24, 8)}, str(ad / "adapter_model.safetensors")
    )
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LOKR", "r": 2, "alpha": 2}))
    out = tmp_path / "out"
    res = cli("merge", ad, "--base", tmp_path / "base", "-o", out)
    line = one_error(res, "on the embedding", "PEFT builds LoKr only on nn.Linear", f"{mod}.lokr_w1", out=out)
    assert "LoHa" not in line and str(ad) in line
