"""A LoHa/LoKr adapter_config.json is no reason to refuse by itself: the tuner table (routes.TUNER_TAKES) refuses
LoHa/LoKr modules by name, route by route, and an adapter whose config says LOHA but holds none is treated as its
tensors say (here: a modules_to_save copy, which mlx-lm's format cannot hold, as for a LoRA config)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import cli, one_error
from peft import LoHaConfig, get_peft_model
from safetensors.torch import save_file
from tiny import llama


@pytest.mark.parametrize("peft_type", ["LOHA", "LOKR", "LORA"])
def test_a_tuner_config_without_its_modules_reads_as_its_tensors(tmp_path, peft_type):
    ad = tmp_path / "adapter"
    ad.mkdir()
    save_file(
        {"base_model.model.lm_head.modules_to_save.default.weight": torch.ones(256, 32)},
        str(ad / "adapter_model.safetensors"),
    )
    cfg = {"peft_type": peft_type, "r": 2, "alpha": 2, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    line = one_error(
        cli("convert", ad, "--to", "mlx", "-o", out), "modules_to_save", "cannot be written as mlx", out=out
    )
    assert "LoRA only" not in line


def test_loha_modules_are_refused_by_the_tuner_table_naming_one(tmp_path):
    get_peft_model(llama(), LoHaConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "adapter"))
    out = tmp_path / "out"
    res = cli("convert", tmp_path / "adapter", "--to", "mlx", "-o", out)
    one_error(res, "loha module model.layers.0.self_attn.q_proj", "LoHa module(s)", "does not take them", out=out)
