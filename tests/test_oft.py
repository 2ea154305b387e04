"""PEFT's OFT checked against PEFT itself: merges (adapter + base, unmerged -> merged) give PEFT's
``merge_and_unload`` logits and tensors, verify knows OFT's merged weight, strip/split/attach give PEFT's own
tensors (and PeftModel loads them), detect and report count PEFT's trainable parameters, and bad input or a
layer PEFT gives no OFT ends in one error line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import cli, merge_layer_kinds_like_peft, one_error, peft_load
from peft import OFTConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tiny import gpt2, llama, load_merged, logits, qwen2, save_unmerged

import lora_convert as lc
from lora_convert.oft_math import BlockRotation

TOL = 1e-5

# (factory, OFTConfig kwargs): every switch that changes the rotation PEFT builds
CASES = {
    # Cayley-Neumann (PEFT's default), block size given, an embedding (W·R) beside linear layers (W·Rᵀ)
    "llama": (llama, dict(oft_block_size=8, target_modules=["q_proj", "down_proj", "embed_tokens"])),
    # r given instead of the block size, the exact Cayley (solve), COFT's projection
    "llama-exact-coft": (
        llama,
        dict(r=4, oft_block_size=0, target_modules=["k_proj", "o_proj", "up_proj"], use_cayley_neumann=False),
    ),
    # one block shared by the whole input side, 3 Neumann terms; q/k/v biases, tied embeddings
    "qwen2-share": (
        qwen2,
        dict(
            oft_block_size=4,
            target_modules=["q_proj", "v_proj", "gate_proj"],
            block_share=True,
            num_cayley_neumann_terms=3,
        ),
    ),
}


def _oft(tmp_path: Path, case: str):
    """The base saved, an OFT adapter with a visible rotation saved as PEFT saves it, and PEFT's model loaded
    from it (the reference)."""
    factory, kw = CASES[case]
    base = factory()
    base.save_pretrained(str(tmp_path / "base"))
    torch.manual_seed(1)
    coft = dict(coft=True, eps=0.05) if "coft" in case else {}
    pm = get_peft_model(base, OFTConfig(init_weights=False, **kw, **coft))
    with torch.no_grad():  # PEFT's non-default init is N(0, 0.1): rotations far enough from I to see
        for n, p in pm.named_parameters():
            if "oft_" in n:
                p.mul_(2.0)
    pm.save_pretrained(str(tmp_path / "adapter"))
    return factory, peft_load(factory, tmp_path / "adapter")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("via", ["adapter", "unmerged"])
def test_oft_merge_matches_peft(tmp_path, case, via):
    factory, ref = _oft(tmp_path, case)
    want = logits(ref)
    assert (want - logits(factory())).abs().max() > 1e-3  # the rotation changes the model
    if via == "adapter":
        lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    else:
        lc.merge(save_unmerged(ref, tmp_path / "unmerged"), output=tmp_path / "merged")
    got = logits(load_merged(tmp_path / "merged"))
    assert (got - want).abs().max().item() <= TOL
    peft_merged = copy.deepcopy(ref).merge_and_unload()
    assert (got - logits(peft_merged)).abs().max().item() <= TOL
    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for k, v in peft_merged.state_dict().items():  # every tensor within fp32 rounding of PEFT's dense R·Wᵀ
        if k in ours:
            assert torch.allclose(ours[k], v, rtol=1e-5, atol=1e-6), k
    if via == "adapter":
        v = lc.verify(tmp_path / "merged", base=tmp_path / "base", adapter=tmp_path / "adapter")
        assert v.ok, v
        # PEFT's own merge is a correct one too: within verify's bound of ours
        save_file({k: t.contiguous() for k, t in peft_merged.state_dict().items() if k in ours}, tmp_path / "p.st")
        (tmp_path / "merged" / "model.safetensors").unlink()
        (tmp_path / "p.st").rename(tmp_path / "merged" / "model.safetensors")
        v = lc.verify(tmp_path / "merged", base=tmp_path / "base", adapter=tmp_path / "adapter")
        assert v.ok, v


def test_oft_verify_catches_a_rotation_not_applied(tmp_path):
    """A merge of another rotation (the adapter's rows swapped) is not OFT's merged weight."""
    _oft(tmp_path, "llama")
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    f = tmp_path / "adapter" / "adapter_model.safetensors"
    sd = load_file(str(f))
    k = "base_model.model.model.layers.1.self_attn.q_proj.oft_R.weight"
    sd[k] = sd[k].flip(0).contiguous()
    save_file(sd, str(f), metadata={"format": "pt"})
    v = lc.verify(tmp_path / "merged", base=tmp_path / "base", adapter=tmp_path / "adapter")
    assert not v.ok
    bad = [c for c in v.checks if c.status != "ok"]
    assert [c.tensor for c in bad] == ["model.layers.1.self_attn.q_proj.weight"], bad


def test_every_layer_kind_merges_to_peft_merge_and_unload(tmp_path):
    """Linear, Conv2d 3×3 (its flattened (out, in·k·k) filter rotated) and 1×1; detect counts PEFT's trainables."""
    changed = merge_layer_kinds_like_peft(
        tmp_path, OFTConfig(oft_block_size=4, target_modules=["lin", "conv", "pw"], init_weights=False)
    )
    assert changed == ["conv.weight", "lin.weight", "pw.weight"]


def test_rotation_by_row_blocks_is_peft_dense_rotation():
    """BlockRotation on any block of rows equals PEFT's get_weight (the dense block-diagonal R) times Wᵀ."""
    from peft.tuners.oft.layer import OFTRotationModule

    torch.manual_seed(0)
    for share, coft, neumann in [(False, False, True), (True, True, False), (False, True, True)]:
        mod = OFTRotationModule(1 if share else 5, 15, 6, 30, coft=coft, eps=0.1, block_share=share)
        mod.use_cayley_neumann = neumann
        with torch.no_grad():
            mod.weight.normal_(0, 0.3)
        vec = mod.weight.detach().clone()
        w = torch.randn(11, 30)
        want = torch.mm(mod.get_weight().detach(), w.t()).t()
        rot = BlockRotation.build(vec, 30, transposed=True, coft=coft, eps=0.1, neumann=neumann)
        got = torch.cat([rot.rotate_(w[s : s + 4].clone()) for s in range(0, 11, 4)])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_oft_detect_and_report_count_peft_trainable(tmp_path):
    from peft import PeftModel

    factory, _ = _oft(tmp_path, "qwen2-share")
    want = PeftModel.from_pretrained(factory(), str(tmp_path / "adapter"), is_trainable=True)
    want = want.get_nb_trainable_parameters()[0]
    det = lc.detect(tmp_path / "adapter")
    assert det.dialect == "oft"
    (a,) = det.adapters
    assert a.lora_parameters == want == 2 * 3 * 6  # one 4×4 block's 6 parameters per module (block_share)
    assert a.tuner == {
        "peft_type": "OFT",
        "r": 0,
        "oft_block_size": 4,
        "coft": False,
        "eps": 6e-5,
        "block_share": True,
        "use_cayley_neumann": True,
        "num_cayley_neumann_terms": 3,
    }
    rep = lc.report(tmp_path / "adapter", base=tmp_path / "base")
    assert {r.form: r.lora_parameters for r in rep.rows}["adapter"] == want


@pytest.mark.parametrize("case", ["llama", "qwen2-share"])
def test_oft_attach_split_strip_are_peft_tensors(tmp_path, case):
    factory, ref = _oft(tmp_path, case)
    want = logits(ref)
    lc.convert(tmp_path / "adapter", "unmerged", base=tmp_path / "base", output=tmp_path / "u")
    got = load_file(str(tmp_path / "u" / "model.safetensors"))
    state = ref.state_dict()
    assert all("lm_head" in k for k in set(state) - set(got)) and set(got) <= set(state)
    for k, v in got.items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k
    lc.convert(tmp_path / "u", "adapter", output=tmp_path / "a2")
    a1 = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    a2 = load_file(str(tmp_path / "a2" / "adapter_model.safetensors"))
    # PEFT also saves a targeted embedding's base weight (save_embedding_layers); a split holds the adapter's own
    a1 = {k: v for k, v in a1.items() if ".base_layer." not in k}
    assert set(a1) == set(a2) and all(torch.equal(a1[k], a2[k]) for k in a1)
    assert json.loads((tmp_path / "a2" / "adapter_config.json").read_text())["peft_type"] == "OFT"
    assert (logits(peft_load(factory, tmp_path / "a2")) - want).abs().max().item() <= TOL
    lc.convert(tmp_path / "u", "base", output=tmp_path / "b")
    t0, t1 = (
        load_file(str(tmp_path / "base" / "model.safetensors")),
        load_file(str(tmp_path / "b" / "model.safetensors")),
    )
    assert set(t0) == set(t1) and all(torch.equal(t0[k], t1[k]) for k in t0)


QK = "base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight"


@pytest.mark.parametrize(
    "edit, needles",
    [
        # 3 blocks of 8×8 where q_proj takes 32 inputs
        ({QK: torch.zeros(3, 28)}, ["3 block(s) of 8×8 do not cover the weight's 32 input columns", QK]),
        # 27 values are no b(b-1)/2 triangle
        ({QK: torch.zeros(4, 27)}, ["oft_R of shape [4, 27]", QK]),
        ({QK: torch.zeros(4, 28, dtype=torch.int32)}, ["oft_R of shape [4, 28] (I32)", QK]),
        ({QK: torch.full((4, 28), float("nan"))}, ["NaN", QK]),
        # PEFT before 0.14 stored whole blocks under oft_r
        ({QK.replace("oft_R.weight", "oft_r"): torch.zeros(4, 8, 8)}, ["PEFT before 0.14", "oft_r"]),
    ],
)
def test_oft_bad_input_one_error_nothing_written(tmp_path, edit, needles):
    _oft(tmp_path, "llama")
    f = tmp_path / "adapter" / "adapter_model.safetensors"
    sd = load_file(str(f))
    sd.update(edit)
    save_file(sd, str(f), metadata={"format": "pt"})
    before = f.read_bytes()
    out = tmp_path / "out"
    one_error(cli("merge", tmp_path / "adapter", "--base", tmp_path / "base", "-o", out), *needles, out=out)
    assert f.read_bytes() == before


def test_oft_configs_peft_refuses_are_refused_by_name(tmp_path):
    """A config without oft_block_size (PEFT < 0.14) and no config at all: PEFT loads neither."""
    _oft(tmp_path, "llama")
    p = tmp_path / "adapter" / "adapter_config.json"
    data = json.loads(p.read_text())
    p.write_text(json.dumps({k: v for k, v in data.items() if k != "oft_block_size"}))
    out = tmp_path / "out"
    one_error(
        cli("merge", tmp_path / "adapter", "--base", tmp_path / "base", "-o", out), "without oft_block_size", out=out
    )
    p.unlink()
    one_error(cli("merge", tmp_path / "adapter", "--base", tmp_path / "base", "-o", out), "peft_type OFT", out=out)


def test_oft_on_gpt2_conv1d_is_refused_by_name(tmp_path):
    """PEFT builds no OFT on GPT-2's Conv1D (it raises TypeError): a file that puts one there is refused by name."""
    base = gpt2()
    base.save_pretrained(str(tmp_path / "base"))
    with pytest.raises(TypeError, match="not supported"):
        get_peft_model(gpt2(), OFTConfig(oft_block_size=8, target_modules=["c_attn"]))
    (tmp_path / "adapter").mkdir()
    key = "base_model.model.transformer.h.0.attn.c_attn.oft_R.weight"
    save_file({key: torch.randn(4, 28) * 0.1}, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    cfg = OFTConfig(oft_block_size=8, target_modules=["c_attn"]).to_dict()
    cfg["peft_type"], cfg["target_modules"] = "OFT", ["c_attn"]
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    res = cli("merge", tmp_path / "adapter", "--base", tmp_path / "base", "-o", out)
    one_error(res, "GPT-2's Conv1D", "PEFT builds OFT only on nn.Linear, nn.Conv2d and nn.Embedding", key, out=out)


def test_oft_weighted_or_stacked_or_lora_formats_are_refused_by_name(tmp_path):
    """W·Rᵀ has no weight (PEFT's OFT has no scale), no sum with other adapters, and no LoRA factors."""
    _oft(tmp_path, "llama")
    out = tmp_path / "out"
    res = cli("merge", tmp_path / "base", "--adapter", f"{tmp_path / 'adapter'}:0.5", "-o", out)
    one_error(res, "OFT rotates this weight's input side", out=out)
    res = cli("convert", tmp_path / "adapter", "--to", "mlx", "-o", out)
    one_error(res, "OFT module(s)", "does not take them", out=out)
    res = cli("combine", tmp_path / "adapter", tmp_path / "adapter", "--method", "cat", "-o", out)
    one_error(res, "OFT module(s)", "combining does not take them", out=out)


def test_report_counts_oft_flops_by_its_own_formula(tmp_path):
    """Per token the input (an embedding: its output) is rotated, b multiply-adds per feature; a merge makes every
    weight entry a b-long dot product.  The unmerged checkpoint gives each module its base weight's sides."""
    from lora_convert.costs import lora_module_flops, merge_module_flops
    from lora_convert.inputs import load_source

    _, ref = _oft(tmp_path, "llama")
    ck, inv = load_source(save_unmerged(ref, tmp_path / "u"))
    try:
        mods = inv.modules(inv.adapters[0])
        sides = {k: (m.rank, m.in_features, m.out_features) for k, m in mods.items() if k.startswith("model.layers.0")}
        assert sides == {"model.layers.0.self_attn.q_proj": (8, 32, 32), "model.layers.0.mlp.down_proj": (8, 48, 32)}
        assert (mods["model.embed_tokens"].in_features, mods["model.embed_tokens"].out_features) == (32, 96)
        for m in mods.values():
            assert lora_module_flops(m) == 2 * 8 * m.in_features, m.module
            assert merge_module_flops(m) == 2 * 8 * m.in_features * m.out_features, m.module
    finally:
        ck.close()
