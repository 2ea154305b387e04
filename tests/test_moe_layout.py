"""Mixture-of-experts checkpoints through the layout routes: attach and split give PEFT's own tensors, strip
gives the base, and ``convert --to adapter --moe-layout per-expert|fused`` moves expert LoRA between PEFT's
target_parameters layout and one module per expert — loading in PEFT with no unexpected or missing keys and
the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import peft_load
from safetensors.torch import load_file
from tiny import save_unmerged
from tiny_moe import FF, E, H, load, load_clean, logits, model, peft_experts, save_base, v4_adapter

import lora_convert as lc
from lora_convert.cli import main

WITH_ROUTER = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]


def _tensors(path):
    return load_file(
        str(
            path
            / ("adapter_model.safetensors" if (path / "adapter_model.safetensors").exists() else "model.safetensors")
        )
    )


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name,params", [("qwen3_moe", WITH_ROUTER), ("mixtral", WITH_ROUTER), ("gpt_oss", None)])
def test_attach_split_strip_match_peft(tmp_path, name, params):
    m = model(name)
    save_base(m, tmp_path / "base")
    pm = peft_experts(m, **({"params": params} if params else {}))
    pm.save_pretrained(str(tmp_path / "adapter"))
    un = save_unmerged(pm, tmp_path / "unmerged")
    lc.convert(tmp_path / "adapter", "unmerged", base=tmp_path / "base", output=tmp_path / "attached")
    _same(_tensors(tmp_path / "attached"), _tensors(un))  # PEFT's in-model state dict, experts fused
    lc.convert(un, "adapter", output=tmp_path / "split")
    _same(_tensors(tmp_path / "split"), _tensors(tmp_path / "adapter"))
    lc.convert(un, "base", output=tmp_path / "stripped")
    assert torch.equal(logits(load(tmp_path / "stripped")), logits(load(tmp_path / "base")))


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_moe_layout_round_trip(tmp_path, name):
    """fused -> per-expert: slices that PEFT (converting them back on load) runs to the same logits;
    per-expert -> fused: PEFT's own target_parameters layout, same logits again."""
    m = model(name)
    save_base(m, tmp_path / "base")
    pm = peft_experts(m, params=WITH_ROUTER, rank_pattern={"mlp.experts.down_proj": 3})
    ref = logits(pm)
    pm.save_pretrained(str(tmp_path / "adapter"))
    res = lc.convert(
        tmp_path / "adapter", "adapter", base=tmp_path / "base", output=tmp_path / "per", moe_layout="per-expert"
    )
    assert res.ops == {"copy": 8, "per-expert": 4 + 2 * 2 * E * 3}  # routers renamed; A and B per expert and part
    per = _tensors(tmp_path / "per")
    src = _tensors(tmp_path / "adapter")
    pre = "base_model.model.model.layers.1"
    moe = "block_sparse_moe" if name == "mixtral" else "mlp"
    up = "w3" if name == "mixtral" else "up_proj"
    r = 2
    b_gate_up = src[f"{pre}.mlp.experts.base_layer.lora_B.weight"].reshape(2 * FF, r, E)
    assert torch.equal(per[f"{pre}.{moe}.experts.3.{up}.lora_B.weight"], b_gate_up[FF:, :, 3])
    assert torch.equal(
        per[f"{pre}.{moe}.experts.3.{up}.lora_A.weight"],
        src[f"{pre}.mlp.experts.base_layer.lora_A.weight"][3 * r : 4 * r],
    )
    cfg = json.loads((tmp_path / "per" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] is None and {"q_proj", "v_proj", "gate"} <= set(cfg["target_modules"])
    assert (logits(load_clean(tmp_path / "base", tmp_path / "per")) - ref).abs().max() <= 1e-5
    lc.merge(tmp_path / "per", base=tmp_path / "base", output=tmp_path / "merged")
    assert (logits(load(tmp_path / "merged")) - ref).abs().max() <= 1e-5
    lc.convert(tmp_path / "per", "adapter", base=tmp_path / "base", output=tmp_path / "fused", moe_layout="fused")
    cfg = json.loads((tmp_path / "fused" / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == sorted(WITH_ROUTER)
    assert (logits(load_clean(tmp_path / "base", tmp_path / "fused")) - ref).abs().max() <= 1e-5


def test_per_expert_adapter_to_fused_matches_peft_conversion(tmp_path):
    """A v4 per-expert adapter made fused equals what PEFT's own conversion makes of it at load time."""
    m = model("qwen3_moe")
    save_base(m, tmp_path / "base")
    v4_adapter("qwen3_moe", m, tmp_path / "v4", router=True)
    pm = peft_load(load(tmp_path / "base"), tmp_path / "v4")
    ref = logits(pm)
    res = CliRunner().invoke(
        main,
        [
            "convert",
            str(tmp_path / "v4"),
            "--to",
            "adapter",
            "--base",
            str(tmp_path / "base"),
            "--moe-layout",
            "fused",
            "-o",
            str(tmp_path / "fused"),
        ],
    )
    assert res.exit_code == 0, res.output
    from peft.utils import get_peft_model_state_dict

    _same(_tensors(tmp_path / "fused"), {k: v.contiguous() for k, v in get_peft_model_state_dict(pm).items()})
    assert (logits(load_clean(tmp_path / "base", tmp_path / "fused")) - ref).abs().max() <= 1e-5


def test_moe_layout_refusals(tmp_path):
    m = model("gpt_oss")
    save_base(m, tmp_path / "base")
    peft_experts(m).save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(lc.UnsupportedError, match="gpt_oss has no per-expert layout"):
        lc.convert(
            tmp_path / "adapter", "adapter", base=tmp_path / "base", output=tmp_path / "o", moe_layout="per-expert"
        )
    with pytest.raises(lc.RouteError, match="is already a PEFT adapter.*--moe-layout"):
        lc.convert(tmp_path / "adapter", "adapter", base=tmp_path / "base", output=tmp_path / "o")
    with pytest.raises(lc.RouteError, match="--moe-layout applies to adapter outputs"):
        lc.convert(tmp_path / "adapter", "merged", base=tmp_path / "base", output=tmp_path / "o", moe_layout="fused")
    assert not (tmp_path / "o").exists()
    assert H  # the tiny shapes are imported for the slicing checks above
