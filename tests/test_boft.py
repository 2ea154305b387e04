"""PEFT's BOFT checked against PEFT itself: merges (adapter + base, unmerged -> merged) give PEFT's
``merge_and_unload`` logits and tensors, verify knows BOFT's merged weight, strip/split/attach give PEFT's own
tensors (and PeftModel loads them), detect and report count PEFT's trainable parameters, several butterfly
factors equal PEFT's own butterfly algebra, and bad input ends in one error line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import cli, merge_layer_kinds_like_peft, one_error, peft_load
from peft import BOFTConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tiny import gpt2, llama, load_merged, logits, qwen2, save_unmerged

import lora_convert as lc
from lora_convert.oft_math import ButterflyRotation

TOL = 1e-5

CASES = {
    "llama": (llama, dict(boft_block_size=4, target_modules=["q_proj", "down_proj", "o_proj"])),
    # the number of blocks given instead of their size; q/k/v biases, tied embeddings
    "qwen2": (qwen2, dict(boft_block_num=4, boft_block_size=0, target_modules=["k_proj", "v_proj", "up_proj"])),
}


def _boft(tmp_path: Path, case: str):
    factory, kw = CASES[case]
    base = factory()
    base.save_pretrained(str(tmp_path / "base"))
    torch.manual_seed(1)
    pm = get_peft_model(base, BOFTConfig(init_weights=False, **kw))  # R ~ N(0, 0.1), s ~ N(1, 0.1)
    pm.save_pretrained(str(tmp_path / "adapter"))
    return factory, peft_load(factory, tmp_path / "adapter")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("via", ["adapter", "unmerged"])
def test_boft_merge_matches_peft(tmp_path, case, via):
    factory, ref = _boft(tmp_path, case)
    want = logits(ref)
    assert (want - logits(factory())).abs().max() > 1e-3
    if via == "adapter":
        lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    else:
        lc.merge(save_unmerged(ref, tmp_path / "unmerged"), output=tmp_path / "merged")
    got = logits(load_merged(tmp_path / "merged"))
    assert (got - want).abs().max().item() <= TOL
    peft_merged = copy.deepcopy(ref).merge_and_unload()
    assert (got - logits(peft_merged)).abs().max().item() <= TOL
    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for k, v in peft_merged.state_dict().items():
        if k in ours:
            assert torch.allclose(ours[k], v, rtol=1e-5, atol=1e-6), k
    if via == "adapter":
        v = lc.verify(tmp_path / "merged", base=tmp_path / "base", adapter=tmp_path / "adapter")
        assert v.ok, v
        f = tmp_path / "adapter" / "adapter_model.safetensors"  # another scale: verify sees it
        sd = load_file(str(f))
        k = sorted(k for k in sd if ".layers.1." in k and k.endswith(".boft_s"))[0]
        sd[k] = sd[k] * 1.01
        save_file(sd, str(f), metadata={"format": "pt"})
        v = lc.verify(tmp_path / "merged", base=tmp_path / "base", adapter=tmp_path / "adapter")
        want_bad = k.removeprefix("base_model.model.").replace(".boft_s", ".weight")
        assert [c.tensor for c in v.checks if c.status != "ok"] == [want_bad]


def test_every_layer_kind_merges_to_peft_merge_and_unload(tmp_path):
    """Linear, Conv2d 3×3 (its flattened (out, in·k·k) filter rotated, boft_s (1, out)) and 1×1."""
    changed = merge_layer_kinds_like_peft(
        tmp_path, BOFTConfig(boft_block_size=4, target_modules=["lin", "conv", "pw"], init_weights=False)
    )
    assert changed == ["conv.weight", "lin.weight", "pw.weight"]


@pytest.mark.parametrize("m, d, b", [(1, 8, 4), (2, 8, 4), (3, 8, 2), (2, 4, 6)])
def test_butterfly_factors_are_peft_butterfly(m, d, b):
    """Several butterfly factors (PEFT's CUDA path; its CPU path builds one): R = F_(m-1)···F_0 with
    F_i = P_i·blockdiag(cayley(B_i))·P_iᵀ from PEFT's own block_butterfly_perm, perm2mat and cayley_batch."""
    from peft.tuners.boft.layer import BOFTLayer

    layer = BOFTLayer.__new__(BOFTLayer)
    torch.manual_seed(m * 100 + d)
    n = d * b
    r, s = torch.randn(m, d, b, b) * 0.2, 1 + torch.randn(10, 1) * 0.1
    q = layer.cayley_batch(r.view(m * d, b, b)).view(m, d, b, b)
    p = torch.stack([layer.perm2mat(layer.block_butterfly_perm(n, int(d / 2**i), int(b / 2), m - 1)) for i in range(m)])
    factors = torch.bmm(p, torch.bmm(torch.stack([torch.block_diag(*q[i]) for i in range(m)]), p.permute(0, 2, 1)))
    dense = factors[0]
    for i in range(1, m):
        dense = factors[i] @ dense
    w = torch.randn(10, n)
    want = torch.mm(dense, w.t()).t() * s
    rot = ButterflyRotation.build(r, s, n)
    got = torch.cat([rot.rotate_(w[i : i + 3].clone(), i) for i in range(0, 10, 3)])
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_boft_detect_and_report_count_peft_trainable(tmp_path):
    from peft import PeftModel

    factory, _ = _boft(tmp_path, "qwen2")
    want = PeftModel.from_pretrained(factory(), str(tmp_path / "adapter"), is_trainable=True)
    want = want.get_nb_trainable_parameters()[0]
    det = lc.detect(tmp_path / "adapter")
    assert det.dialect == "boft"
    (a,) = det.adapters
    # k/v: 4 blocks of 8×8 and 16 scales each; up_proj: 4 blocks of 8×8 and 48 scales; two layers
    assert a.lora_parameters == want == 2 * (2 * (256 + 16) + 256 + 48)
    assert a.tuner == {
        "peft_type": "BOFT",
        "boft_block_size": 0,
        "boft_block_num": 4,
        "boft_n_butterfly_factor": 1,
        "butterfly_factors": [1],
    }
    rep = lc.report(tmp_path / "adapter", base=tmp_path / "base")
    assert {r.form: r.lora_parameters for r in rep.rows}["adapter"] == want


def test_boft_attach_split_strip_are_peft_tensors(tmp_path):
    factory, ref = _boft(tmp_path, "llama")
    want = logits(ref)
    lc.convert(tmp_path / "adapter", "unmerged", base=tmp_path / "base", output=tmp_path / "u")
    got = load_file(str(tmp_path / "u" / "model.safetensors"))
    state = ref.state_dict()
    assert set(got) == set(state)
    for k, v in got.items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k
    lc.convert(tmp_path / "u", "adapter", output=tmp_path / "a2")
    a1 = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    a2 = load_file(str(tmp_path / "a2" / "adapter_model.safetensors"))
    assert set(a1) == set(a2) and all(torch.equal(a1[k], a2[k]) for k in a1)
    assert json.loads((tmp_path / "a2" / "adapter_config.json").read_text())["peft_type"] == "BOFT"
    assert (logits(peft_load(factory, tmp_path / "a2")) - want).abs().max().item() <= TOL
    lc.convert(tmp_path / "u", "base", output=tmp_path / "b")
    t0 = load_file(str(tmp_path / "base" / "model.safetensors"))
    t1 = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert set(t0) == set(t1) and all(torch.equal(t0[k], t1[k]) for k in t0)


QR = "base_model.model.model.layers.0.self_attn.q_proj.boft_R"
QS = "base_model.model.model.layers.0.self_attn.q_proj.boft_s"


@pytest.mark.parametrize(
    "edit, needles",
    [
        ({QR: torch.zeros(1, 7, 4, 4)}, ["7 block(s) of 4×4 do not cover the weight's 32 input columns", QR]),
        ({QR: torch.zeros(1, 8, 4, 3)}, ["boft_R of shape [1, 8, 4, 3]", QR]),
        ({QS: torch.ones(31, 1)}, ["boft_s [31, 1] is not one scale per output row", QS]),
        ({QS: None}, ["boft_s is missing", QR]),
    ],
)
def test_boft_bad_input_one_error_nothing_written(tmp_path, edit, needles):
    _boft(tmp_path, "llama")
    f = tmp_path / "adapter" / "adapter_model.safetensors"
    sd = load_file(str(f))
    for k, v in edit.items():
        if v is None:
            del sd[k]
        else:
            sd[k] = v
    save_file(sd, str(f), metadata={"format": "pt"})
    before = f.read_bytes()
    out = tmp_path / "out"
    one_error(cli("merge", tmp_path / "adapter", "--base", tmp_path / "base", "-o", out), *needles, out=out)
    assert f.read_bytes() == before


def test_boft_on_gpt2_conv1d_and_lora_routes_are_refused_by_name(tmp_path):
    """PEFT builds no BOFT on GPT-2's Conv1D; W·Rᵀ ⊙ s has no weight, no sum, and no LoRA factors."""
    base = gpt2()
    base.save_pretrained(str(tmp_path / "base"))
    with pytest.raises(TypeError, match="not supported"):
        get_peft_model(gpt2(), BOFTConfig(boft_block_size=8, target_modules=["c_attn"]))
    (tmp_path / "adapter").mkdir()
    key = "base_model.model.transformer.h.0.attn.c_attn.boft_R"
    sd = {key: torch.randn(1, 4, 8, 8) * 0.1, key.replace("boft_R", "boft_s"): torch.ones(96, 1)}
    save_file(sd, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    cfg = BOFTConfig(boft_block_size=8, target_modules=["c_attn"]).to_dict()
    cfg["peft_type"], cfg["target_modules"] = "BOFT", ["c_attn"]
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    res = cli("merge", tmp_path / "adapter", "--base", tmp_path / "base", "-o", out)
    one_error(res, "GPT-2's Conv1D", "PEFT builds BOFT only on nn.Linear and nn.Conv2d", key, out=out)
    _boft(tmp_path / "l", "llama")
    res = cli("merge", tmp_path / "l" / "base", "--adapter", f"{tmp_path / 'l' / 'adapter'}:0.5", "-o", out)
    one_error(res, "BOFT rotates this weight's input side", out=out)
    res = cli("convert", tmp_path / "l" / "adapter", "--to", "mlx", "-o", out)
    one_error(res, "BOFT module(s)", "does not take them", out=out)
    res = cli("combine", tmp_path / "l" / "adapter", tmp_path / "l" / "adapter", "--method", "cat", "-o", out)
    one_error(res, "BOFT module(s)", "combining does not take them", out=out)


def test_report_counts_boft_flops_by_its_own_formula(tmp_path):
    """Per token PEFT's forward multiplies x by the rotated, scaled weight it rebuilds (one x @ W'ᵀ); a merge makes
    every weight entry a b-long dot product."""
    from lora_convert.costs import lora_module_flops, merge_module_flops
    from lora_convert.inputs import load_source

    _, ref = _boft(tmp_path, "llama")
    ck, inv = load_source(save_unmerged(ref, tmp_path / "u"))
    try:
        mods = inv.modules(inv.adapters[0])
        m = mods["model.layers.0.mlp.down_proj"]
        assert (m.rank, m.in_features, m.out_features) == (4, 48, 32)
        for m in mods.values():
            assert lora_module_flops(m) == 2 * m.in_features * m.out_features, m.module
            assert merge_module_flops(m) == 2 * 4 * m.in_features * m.out_features, m.module
    finally:
        ck.close()
