"""PEFT's HRA checked against PEFT itself: merges (adapter + base, unmerged -> merged) give PEFT's
``merge_and_unload`` logits and tensors, verify knows HRA's merged weight, strip/split/attach give PEFT's own
tensors (and PeftModel loads them), detect and report count PEFT's trainable parameters, and bad input ends in
one error line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import cli, merge_layer_kinds_like_peft, one_error, peft_load
from peft import HRAConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tiny import gpt2, llama, load_merged, logits, qwen2, save_unmerged

import lora_convert as lc

TOL = 1e-5

CASES = {
    # the reflections multiplied as they are (compact WY form), an odd r
    "llama": (llama, dict(r=3, target_modules=["q_proj", "down_proj", "o_proj"])),
    # Gram-Schmidt first (apply_GS); q/k/v biases, tied embeddings
    "qwen2-gs": (qwen2, dict(r=4, apply_GS=True, target_modules=["k_proj", "v_proj", "up_proj"])),
}


def _hra(tmp_path: Path, case: str):
    factory, kw = CASES[case]
    base = factory()
    base.save_pretrained(str(tmp_path / "base"))
    torch.manual_seed(1)
    pm = get_peft_model(base, HRAConfig(init_weights=False, **kw))  # random u: H far from I
    pm.save_pretrained(str(tmp_path / "adapter"))
    return factory, peft_load(factory, tmp_path / "adapter")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("via", ["adapter", "unmerged"])
def test_hra_merge_matches_peft(tmp_path, case, via):
    factory, ref = _hra(tmp_path, case)
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
        f = tmp_path / "adapter" / "adapter_model.safetensors"  # other reflections: verify sees them
        sd = load_file(str(f))
        k = sorted(k for k in sd if ".layers.1." in k and k.endswith(".hra_u"))[0]
        sd[k] = sd[k].flip(1).contiguous()
        sd[k][:, 0] += 0.5
        save_file(sd, str(f), metadata={"format": "pt"})
        v = lc.verify(tmp_path / "merged", base=tmp_path / "base", adapter=tmp_path / "adapter")
        want_bad = k.removeprefix("base_model.model.").replace(".hra_u", ".weight")
        assert [c.tensor for c in v.checks if c.status != "ok"] == [want_bad]


def test_every_layer_kind_merges_to_peft_merge_and_unload(tmp_path):
    """Linear, Conv2d 3×3 (its flattened (out, in·k·k) filter reflected) and 1×1."""
    changed = merge_layer_kinds_like_peft(
        tmp_path, HRAConfig(r=4, target_modules=["lin", "conv", "pw"], init_weights=False)
    )
    assert changed == ["conv.weight", "lin.weight", "pw.weight"]


def test_hra_detect_report_and_attach_split_strip(tmp_path):
    from peft import PeftModel

    factory, ref = _hra(tmp_path, "qwen2-gs")
    trainable = PeftModel.from_pretrained(factory(), str(tmp_path / "adapter"), is_trainable=True)
    trainable = trainable.get_nb_trainable_parameters()[0]
    det = lc.detect(tmp_path / "adapter")
    assert det.dialect == "hra"
    (a,) = det.adapters
    assert a.lora_parameters == trainable == 2 * 4 * (32 + 32 + 32)  # hra_u (in, r) per module
    assert a.tuner == {"peft_type": "HRA", "r": 4, "apply_GS": True}
    rep = lc.report(tmp_path / "adapter", base=tmp_path / "base")
    assert {r.form: r.lora_parameters for r in rep.rows}["adapter"] == trainable
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
    assert set(a1) == set(a2) and all(torch.equal(a1[k], a2[k]) for k in a1)
    assert json.loads((tmp_path / "a2" / "adapter_config.json").read_text())["peft_type"] == "HRA"
    assert (logits(peft_load(factory, tmp_path / "a2")) - want).abs().max().item() <= TOL
    lc.convert(tmp_path / "u", "base", output=tmp_path / "b")
    t0 = load_file(str(tmp_path / "base" / "model.safetensors"))
    t1 = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert set(t0) == set(t1) and all(torch.equal(t0[k], t1[k]) for k in t0)


QU = "base_model.model.model.layers.0.self_attn.q_proj.hra_u"


@pytest.mark.parametrize(
    "tensor, needles",
    [
        (torch.randn(31, 3), ["hra_u [31, 3] is not (in, r) with in = the weight's 32 input columns", QU]),
        (torch.randn(32), ["hra_u of shape [32]", QU]),
        (torch.full((32, 3), float("inf")), ["NaN or Inf", QU]),
    ],
)
def test_hra_bad_input_one_error_nothing_written(tmp_path, tensor, needles):
    _hra(tmp_path, "llama")
    f = tmp_path / "adapter" / "adapter_model.safetensors"
    sd = load_file(str(f))
    sd[QU] = tensor
    save_file(sd, str(f), metadata={"format": "pt"})
    before = f.read_bytes()
    out = tmp_path / "out"
    one_error(cli("merge", tmp_path / "adapter", "--base", tmp_path / "base", "-o", out), *needles, out=out)
    assert f.read_bytes() == before


def test_hra_on_gpt2_conv1d_and_lora_routes_are_refused_by_name(tmp_path):
    """PEFT builds no HRA on GPT-2's Conv1D; W·H has no weight, no sum, and no LoRA factors."""
    base = gpt2()
    base.save_pretrained(str(tmp_path / "base"))
    with pytest.raises(TypeError):
        get_peft_model(gpt2(), HRAConfig(r=2, target_modules=["c_attn"]))
    (tmp_path / "adapter").mkdir()
    key = "base_model.model.transformer.h.0.attn.c_attn.hra_u"
    save_file({key: torch.randn(32, 2)}, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    cfg = HRAConfig(r=2, target_modules=["c_attn"]).to_dict()
    cfg["peft_type"], cfg["target_modules"] = "HRA", ["c_attn"]
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    res = cli("merge", tmp_path / "adapter", "--base", tmp_path / "base", "-o", out)
    one_error(res, "GPT-2's Conv1D", "PEFT builds HRA only on nn.Linear and nn.Conv2d", key, out=out)
    _hra(tmp_path / "l", "llama")
    res = cli("merge", tmp_path / "l" / "base", "--adapter", f"{tmp_path / 'l' / 'adapter'}:0.5", "-o", out)
    one_error(res, "HRA rotates this weight's input side", out=out)
    res = cli("convert", tmp_path / "l" / "adapter", "--to", "gguf", "-o", tmp_path / "out.gguf")
    one_error(res, "HRA module(s)", "does not take them", out=tmp_path / "out.gguf")
    res = cli("combine", tmp_path / "l" / "adapter", tmp_path / "l" / "adapter", "--method", "cat", "-o", out)
    one_error(res, "HRA module(s)", "combining does not take them", out=out)


def test_report_counts_hra_flops_by_its_own_formula(tmp_path):
    """Per token x − ((x·V)·T)·Vᵀ: two (in × r) products and the r × r one; a merge the same per weight row."""
    from lora_convert.costs import lora_module_flops, merge_module_flops
    from lora_convert.inputs import load_source

    _, ref = _hra(tmp_path, "llama")
    ck, inv = load_source(save_unmerged(ref, tmp_path / "u"))
    try:
        mods = inv.modules(inv.adapters[0])
        m = mods["model.layers.0.mlp.down_proj"]
        assert (m.rank, m.in_features, m.out_features) == (3, 48, 32)
        for m in mods.values():
            assert lora_module_flops(m) == 4 * 3 * m.in_features + 2 * 3 * 3, m.module
            assert merge_module_flops(m) == (4 * 3 * m.in_features + 2 * 3 * 3) * m.out_features, m.module
    finally:
        ck.close()
