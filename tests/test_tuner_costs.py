"""report's FLOPs for VeRA and IA³, counted from first principles on tiny models (each layer's widths read off
the PEFT model itself), and torch's own FlopCounterMode for VeRA's matrix products.

VeRA (PEFT's ``vera.Linear.forward``): ``λ_b ⊙ (B_s (λ_d ⊙ (A_s x)))``, ``A_s = vera_A[:, :in]`` and
``B_s = vera_B[:out, :]``: two products of 2·r·in and 2·r·out FLOPs and r + out multiplies per token; merge
``(λ_b ⊙ B_s) @ (λ_d ⊙ A_s)`` then the add.  IA³: x ⊙ l (feed-forward) or (W x) ⊙ l, one multiply per scaled
feature; merge W ⊙ l, one per weight element, and b ⊙ l on an output-side module with a bias."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, VeraConfig, get_peft_model
from tiny import SEQ, gpt2, llama

import lora_convert as lc
from lora_convert.costs import TUNER_CONVENTIONS


def _gpt2_biased():
    model = gpt2()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.add_(0.5)  # IA³ scales c_attn's bias: make it matter
    return model


def _layers(pm, kind: str):
    """(base layer, module name) of every PEFT layer of ``kind`` ("vera_lambda_b" / "ia3_l") in ``pm``."""
    out = []
    for name, mod in pm.named_modules():
        if hasattr(mod, kind) and mod.get_base_layer() is not mod:
            out.append((mod, name.removeprefix("base_model.model.")))
    assert out
    return out


def _rows(rep):
    return {r.form: r for r in rep.rows}


VERA = {
    # q_proj 32 -> 32, v_proj 32 -> 16, down_proj 48 -> 32: vera_A is 48 wide, so narrower layers are cut
    "llama": (llama, dict(r=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    # Conv1D stores (in, out): c_attn 32 -> 96, c_fc 32 -> 128
    "gpt2": (gpt2, dict(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
}


@pytest.mark.parametrize("case", sorted(VERA))
def test_vera_flops_per_token_and_merge_from_first_principles(tmp_path, case):
    factory, kw = VERA[case]
    factory().save_pretrained(str(tmp_path / "base"))
    pm = get_peft_model(factory(), VeraConfig(**kw))
    pm.save_pretrained(str(tmp_path / "adapter"))
    r = kw["r"]
    per_token = merge = matmul = 0
    for layer, _ in _layers(pm, "vera_lambda_b"):
        i, o = layer.in_features, layer.out_features
        matmul += 2 * r * i + 2 * r * o
        per_token += 2 * r * i + 2 * r * o + r + o  # A_s x, B_s (·), then λ_d (r values) and λ_b (out values)
        merge += o * r + r * i + 2 * r * i * o + i * o  # λ_b ⊙ B_s, λ_d ⊙ A_s, the product, the add
    # the products are what torch counts: the PEFT model's forward less the base's, one token
    from torch.utils.flop_counter import FlopCounterMode

    token = SEQ[:, :1]
    counted = []
    for model in (pm, factory()):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(token)
        counted.append(fc.get_total_flops())
    assert counted[0] - counted[1] == matmul
    rep = lc.report(tmp_path / "adapter", base=tmp_path / "base")
    rows = _rows(rep)
    assert rows["unmerged"].flops_lora == per_token
    assert rows["adapter"].merge_flops == merge
    assert sum(k.extra_flops for k in rep.modules) == per_token
    assert sum(k.merge_flops for k in rep.modules) == merge
    assert any(c.startswith("VeRA per token") for c in rep.conventions)
    # an unmerged checkpoint carries its base: the same numbers
    lc.convert(tmp_path / "adapter", "unmerged", base=tmp_path / "base", output=tmp_path / "u")
    rows = _rows(lc.report(tmp_path / "u"))
    assert (rows["unmerged"].flops_lora, rows["adapter"].merge_flops) == (per_token, merge)


def test_vera_without_a_base_says_its_widths_are_an_upper_bound(tmp_path):
    factory, kw = VERA["llama"]
    pm = get_peft_model(factory(), VeraConfig(**kw))
    pm.save_pretrained(str(tmp_path / "adapter"))
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        (tmp_path / "adapter" / "adapter_config.json").read_text().replace(str(tmp_path), "/nowhere")
    )
    rep = lc.report(tmp_path / "adapter")
    assert any("VeRA's input widths" in n and "upper bound" in n for n in rep.notes), rep.notes


IA3 = {
    # attention modules scale their outputs (no bias in Llama), down_proj its inputs
    "llama": (llama, dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    # c_attn (output side, with a bias: b ⊙ l too), mlp.c_proj (feed-forward: input side)
    "gpt2": (
        _gpt2_biased,
        dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True),
    ),
}


@pytest.mark.parametrize("case", sorted(IA3))
def test_ia3_flops_per_token_and_merge_from_first_principles(tmp_path, case):
    factory, kw = IA3[case]
    factory().save_pretrained(str(tmp_path / "base"))
    pm = get_peft_model(factory(), IA3Config(**kw))
    pm.save_pretrained(str(tmp_path / "adapter"))
    per_token = merge = 0
    for layer, _ in _layers(pm, "ia3_l"):
        base = layer.get_base_layer()
        per_token += layer.in_features if layer.is_feedforward else layer.out_features
        merge += base.weight.numel()  # W ⊙ l
        if not layer.is_feedforward and base.bias is not None:
            merge += base.bias.numel()  # b ⊙ l
    assert case != "gpt2" or merge > sum(layer.get_base_layer().weight.numel() for layer, _ in _layers(pm, "ia3_l"))
    rep = lc.report(tmp_path / "adapter", base=tmp_path / "base")
    rows = _rows(rep)
    assert rows["unmerged"].flops_lora == per_token
    assert rows["adapter"].merge_flops == merge
    assert sum(k.merge_flops for k in rep.modules) == merge
    assert [c for c in rep.conventions if "VeRA" in c or "IA³" in c] == [TUNER_CONVENTIONS["ia3"]]
    # without the base, the merge is not counted and a note says why
    no_base = lc.report(tmp_path / "adapter", base=tmp_path / "nowhere")
    assert _rows(no_base)["adapter"].merge_flops == 0
    assert any("IA³'s merge" in n for n in no_base.notes), no_base.notes
