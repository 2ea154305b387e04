"""Mixture-of-experts LoRA: merged logits equal PEFT's unmerged logits (≤ 1e-5, fp32) on tiny Qwen3-MoE,
Qwen2-MoE, Mixtral and gpt-oss models made with transformers, whatever layout the base stores its experts
in and whichever layout the adapter speaks (PEFT target_parameters, per-expert target_modules)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import peft_load
from safetensors.torch import load_file, save_file
from tiny import save_unmerged
from tiny_moe import FF, E, H, load, logits, model, peft_experts, save_base, v4_adapter

import lora_convert as lc

TOL = 1e-5
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _merge_and_compare(tmp_path, name, *, via="adapter", base_kw=None, **lora_kw):
    """Base saved as transformers saves it, PEFT adapter on it; our merge against PEFT's unmerged logits."""
    m = model(name)
    save_base(m, tmp_path / "base", **(base_kw or {}))
    pm = peft_experts(m, **lora_kw)
    ref = logits(pm)
    assert (ref - logits(load(tmp_path / "base"))).abs().max() > 0.05  # the adapter changes the output
    out = tmp_path / "merged"
    if via == "adapter":
        pm.save_pretrained(str(tmp_path / "adapter"))
        res = lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=out)
    else:
        res = lc.merge(save_unmerged(pm, tmp_path / "unmerged"), output=out)
    diff = (logits(load(out)) - ref).abs().max().item()
    assert diff <= TOL, f"max |Δlogits| = {diff}"
    return res


@pytest.mark.parametrize("via", ["adapter", "unmerged"])
@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_target_parameters_merge_matches_peft(tmp_path, name, via):
    res = _merge_and_compare(tmp_path, name, via=via)
    assert res.ops["merge"] > 0


@pytest.mark.parametrize(
    "name,attn",
    [("deepseek_v3", ("o_proj", "kv_b_proj")), ("llama4_text", ("q_proj", "v_proj"))],
)
def test_more_architectures(tmp_path, name, attn):
    """DeepSeek-V3 (a dense first layer, per-expert routed experts); Llama 4 (fused (E, in, out) experts
    without is_transposed, so PEFT's A sits on the output side)."""
    _merge_and_compare(tmp_path, name, attn=attn)


def test_per_expert_base_gets_per_expert_tensors(tmp_path):
    """A Qwen3-MoE base stored per expert is merged per expert: same keys as the base, each changed."""
    _merge_and_compare(tmp_path, "qwen3_moe")
    base, merged = (
        load_file(tmp_path / "base" / "model.safetensors"),
        load_file(tmp_path / "merged" / "model.safetensors"),
    )
    assert set(base) == set(merged)
    for e in range(E):
        for part in ("gate_proj", "up_proj", "down_proj"):
            k = f"model.layers.1.mlp.experts.{e}.{part}.weight"
            assert not torch.equal(base[k], merged[k]), k


def test_mixtral_keeps_block_sparse_moe_names(tmp_path):
    _merge_and_compare(tmp_path, "mixtral", params=[*EXPERTS, "mlp.gate.weight"])
    keys = set(load_file(tmp_path / "merged" / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.3.w3.weight" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys and not any(".mlp." in k for k in keys)


@pytest.mark.parametrize(
    "name,params",
    [
        ("qwen3_moe", ["mlp.experts.down_proj"]),  # one parameter: the plain experts.lora_A key
        ("qwen3_moe", ["gate_up_proj", "down_proj", "mlp.gate.weight"]),  # bare names, and the router
        ("gpt_oss", ["gate_up_proj", "mlp.router.weight"]),
    ],
)
def test_target_parameter_choices(tmp_path, name, params):
    _merge_and_compare(tmp_path, name, params=params)


def test_rslora_and_patterns_on_experts(tmp_path):
    _merge_and_compare(
        tmp_path,
        "qwen3_moe",
        r=2,
        alpha=5,
        use_rslora=True,
        rank_pattern={"mlp.experts.down_proj": 3, "layers.1.mlp.experts.gate_up_proj": 4},
        alpha_pattern={"down_proj": 7},
    )
    sd = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    pre = "base_model.model.model.layers"
    assert sd[f"{pre}.1.mlp.experts.lora_A.weight"].shape == (E * 3, FF)  # the patterns took effect
    assert sd[f"{pre}.1.mlp.experts.base_layer.lora_A.weight"].shape == (E * 4, H)
    assert sd[f"{pre}.0.mlp.experts.base_layer.lora_A.weight"].shape == (E * 2, H)
    d = lc.detect(tmp_path / "adapter")
    assert not d.warnings  # ranks per expert agree with the config: no false warning


def test_shared_experts_and_fused_base(tmp_path):
    """Qwen2-MoE's shared expert is plain nn.Linear (target_modules); a base saved fused stays fused.
    gate_proj and up_proj are targeted together: PEFT 0.22 refuses one without the other, as the routed
    experts fuse them into gate_up_proj."""
    res = _merge_and_compare(
        tmp_path,
        "qwen2_moe",
        attn=("q_proj", "gate_proj", "up_proj", "down_proj"),
        base_kw={"save_original_format": False},
    )
    keys = set(load_file(tmp_path / "merged" / "model.safetensors"))
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys
    assert "model.layers.0.mlp.shared_expert.gate_proj.weight" in keys
    assert res.ops["merge"] == 2 * (1 + 3 + 2)  # q_proj, shared gate/up/down, fused gate_up/down per layer


def test_bf16_base_rounded_once(tmp_path):
    """A bf16 base: every merged tensor is round(fp32(W) + ΔW), compared with PEFT's fp32 delta."""
    m = model("mixtral").to(torch.bfloat16)
    save_base(m, tmp_path / "base")
    pm = peft_experts(model("mixtral"), attn=())
    pm.save_pretrained(str(tmp_path / "adapter"))
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    base = load_file(tmp_path / "base" / "model.safetensors")
    wrapper = pm.base_model.model.model.layers[1].mlp.experts
    gate_up = wrapper.base_layer.get_delta_weight("default")  # inner wrapper: gate_up_proj (E, 2I, H)
    for e in range(E):
        k = f"model.layers.1.block_sparse_moe.experts.{e}.w3.weight"
        want = (base[k].float() + gate_up[e, FF:]).to(torch.bfloat16)
        assert merged[k].dtype == torch.bfloat16 and torch.equal(merged[k], want), k


def _unsloth_grouped(adapter, marker: dict | None):
    """The same adapter with B packed block-per-expert (legacy Unsloth), and the marker that says so."""
    sd = load_file(adapter / "adapter_model.safetensors")
    for k, v in sd.items():
        if ".experts." in k and "lora_B" in k:
            out, er = v.shape
            sd[k] = v.reshape(out, er // E, E).permute(0, 2, 1).reshape(out, er).contiguous()
    save_file(sd, str(adapter / "adapter_model.safetensors"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(marker or {})
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))


def test_unsloth_grouped_b_layout(tmp_path):
    m = model("qwen3_moe")
    save_base(m, tmp_path / "base")
    pm = peft_experts(m)
    ref = logits(pm)
    pm.save_pretrained(str(tmp_path / "adapter"))
    _unsloth_grouped(tmp_path / "adapter", {"lora_B_layout": "grouped_by_expert"})
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    assert (logits(load(tmp_path / "merged")) - ref).abs().max() <= TOL
    # without the marker PEFT's rank-major packing is assumed (and detect says so): a different model
    _unsloth_grouped(tmp_path / "adapter", None)  # packs again: still grouped, marker removed below
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    del cfg["lora_B_layout"]
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "m2")
    assert (logits(load(tmp_path / "m2")) - ref).abs().max() > 1e-3


def test_square_experts_need_the_peft_version(tmp_path):
    """2I == H: the shapes cannot say which way PEFT read the parameter; the recorded version can."""
    m = model("qwen3_moe", moe_intermediate_size=H // 2)
    save_base(m, tmp_path / "base")
    pm = peft_experts(m)
    ref = logits(pm)
    pm.save_pretrained(str(tmp_path / "adapter"))
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    assert (logits(load(tmp_path / "merged")) - ref).abs().max() <= TOL
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["peft_version"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(lc.AdapterError, match="square 32×32 expert matrices.*peft_version"):
        lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "m2")
    assert not (tmp_path / "m2").exists()


def test_wrong_expert_count_is_refused(tmp_path):
    m = model("qwen3_moe")
    pm = peft_experts(m)
    pm.save_pretrained(str(tmp_path / "adapter"))
    save_base(model("qwen3_moe", num_experts=3), tmp_path / "base3")
    with pytest.raises(lc.AdapterError, match="LoRA for 4 experts of rank 2 .* has 3 experts"):
        lc.merge(tmp_path / "adapter", base=tmp_path / "base3", output=tmp_path / "m")


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_per_expert_adapter_matches_peft(tmp_path, name):
    """A transformers-v4 per-expert adapter (one LoRA per expert and projection, router too): PEFT converts
    it on load; our merge folds each pair into its own per-expert tensor."""
    m = model(name)
    save_base(m, tmp_path / "base")
    v4_adapter(name, m, tmp_path / "adapter", router=True)
    ref = logits(peft_load(load(tmp_path / "base"), tmp_path / "adapter"))
    assert (ref - logits(m)).abs().max() > 0.05
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    assert (logits(load(tmp_path / "merged")) - ref).abs().max() <= TOL


def test_per_expert_adapter_on_fused_base(tmp_path):
    """The same adapter on a base saved fused: each expert's gate and up land in their rows of gate_up_proj."""
    m = model("qwen3_moe")
    save_base(m, tmp_path / "base")
    save_base(m, tmp_path / "fused", save_original_format=False)
    v4_adapter("qwen3_moe", m, tmp_path / "adapter")
    ref = logits(peft_load(load(tmp_path / "base"), tmp_path / "adapter"))
    res = lc.merge(tmp_path / "adapter", base=tmp_path / "fused", output=tmp_path / "merged")
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(tmp_path / "merged" / "model.safetensors")
    assert res.ops["merge"] == 2 * 3  # q_proj, gate_up_proj, down_proj per layer
    assert (logits(load(tmp_path / "merged")) - ref).abs().max() <= TOL


def test_adapter_for_another_model_is_refused(tmp_path):
    pm = peft_experts(model("qwen3_moe"))
    pm.save_pretrained(str(tmp_path / "adapter"))
    save_base(model("qwen3_moe", moe_intermediate_size=16), tmp_path / "base")
    with pytest.raises(lc.AdapterError, match="does not fit the expert parameter"):
        lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "m")
    shutil.rmtree(tmp_path / "base")


def test_expert_lora_into_mxfp4_gpt_oss(tmp_path):
    """PEFT target_parameters LoRA on gpt-oss's MXFP4 experts (the quantized base read through its
    dequantized view): merged to PEFT's logits in fp32; with --requantize the merged experts go back
    to MXFP4 and the error that adds is reported per expert tensor."""
    from quant_models import gpt_oss, load_dequantized, save_mxfp4

    save_mxfp4(gpt_oss(), tmp_path / "base")
    pm = peft_experts(load_dequantized(tmp_path / "base"), attn=("q_proj",))
    want = logits(pm)
    pm.save_pretrained(str(tmp_path / "adapter"))
    res = lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "m", dtype="fp32")
    assert res.ops["merge"] == 2 * 3
    assert (logits(load_dequantized(tmp_path / "m")) - want).abs().max() <= TOL
    res = lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "rq", requantize=True)
    stored = load_file(tmp_path / "rq" / "model.safetensors")
    assert "model.layers.1.mlp.experts.gate_up_proj_blocks" in stored
    assert len(res.report.modules) == 4  # gate_up_proj and down_proj of both layers
