"""PEFT's other tuners read as LoRA factors — AdaLoRA — checked against PEFT itself: merges give PEFT's
``merge_and_unload`` logits, strip/split/attach give PEFT's own tensors (and PeftModel loads them), detect and
report count PEFT's trainable parameters, bad input ends in one error line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import cli, one_error, peft_load
from safetensors.torch import load_file, save_file
from tiny import gpt2, llama, load_merged, logits, save_unmerged

import lora_convert as lc

TOL = 1e-5


def _same_tensors(p0: Path, p1: Path) -> None:
    """The two safetensors files hold the same names and bit-equal tensors."""
    t0, t1 = load_file(str(p0)), load_file(str(p1))
    assert set(t0) == set(t1) and all(torch.equal(t0[k], t1[k]) for k in t0)


# -- AdaLoRA ---------------------------------------------------------------------------------------------

# (factory, AdaLoraConfig kwargs, the budget's masks per module: rows kept, a layer cut to none)
ADALORA_CASES = {
    "llama": (
        llama,
        dict(init_r=4, target_r=2, lora_alpha=8, total_step=10, target_modules=["q_proj", "v_proj", "down_proj"]),
        {
            "model.layers.0.self_attn.q_proj.lora_E": [True, False, True, True],
            "model.layers.1.mlp.down_proj.lora_E": [False] * 4,
        },
    ),
    "llama-unresized": (
        llama,
        dict(init_r=3, target_r=2, lora_alpha=0, total_step=10, target_modules=["k_proj", "o_proj", "gate_proj"]),
        None,
    ),
    "gpt2-conv1d": (
        gpt2,
        dict(
            init_r=4, target_r=2, lora_alpha=16, total_step=10, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
        ),
        {"transformer.h.1.attn.c_attn.lora_E": [False, True, True, False]},
    ),
}


def _adalora(tmp_path, case):
    """The base saved, an AdaLoRA adapter with random singular values saved as PEFT saves it (its budget's
    masks applied), and PEFT's model loaded from that adapter (the reference)."""
    from peft import AdaLoraConfig, get_peft_model

    factory, kw, masks = ADALORA_CASES[case]
    base = factory()
    base.save_pretrained(str(tmp_path / "base"))
    torch.manual_seed(1)
    pm = get_peft_model(base, AdaLoraConfig(**kw))
    with torch.no_grad():  # PEFT initialises E to zeros: ΔW = 0 would make every test pass
        for name, p in pm.named_parameters():
            if "lora_E" in name:
                p.copy_(torch.randn_like(p))
    if masks is not None:
        pm.peft_config["default"].rank_pattern = {k.replace(".lora_E", ".lora_E.default"): v for k, v in masks.items()}
    pm.save_pretrained(str(tmp_path / "adapter"))
    ref = peft_load(factory, tmp_path / "adapter")
    return factory, ref


@pytest.mark.parametrize("case", sorted(ADALORA_CASES))
@pytest.mark.parametrize("via", ["adapter", "unmerged"])
def test_adalora_merge_matches_peft(tmp_path, case, via):
    factory, ref = _adalora(tmp_path, case)
    want = logits(ref)
    assert (want - logits(factory())).abs().max() > 1e-3  # the adapter changes the model
    if via == "adapter":
        lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    else:  # PEFT's own in-model state dict (base_layer, lora_E.default, ranknum.default)
        lc.merge(save_unmerged(ref, tmp_path / "unmerged"), output=tmp_path / "merged")
    got = logits(load_merged(tmp_path / "merged"))
    assert (got - want).abs().max().item() <= TOL
    peft_merged = logits(ref.merge_and_unload())
    assert (got - peft_merged).abs().max().item() <= TOL


def test_adalora_detect_and_report_count_peft_trainable(tmp_path):
    from peft import PeftModel

    factory, _ = _adalora(tmp_path, "llama")
    trainable = PeftModel.from_pretrained(factory(), str(tmp_path / "adapter"), is_trainable=True)
    want = trainable.get_nb_trainable_parameters()[0]
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert want == sum(v.numel() for v in saved.values())  # A, B and E (rows the budget kept)
    det = lc.detect(tmp_path / "adapter")
    assert det.dialect == "adalora"
    (a,) = det.adapters
    assert a.lora_parameters == want
    assert a.tuner == {"peft_type": "ADALORA", "init_r": 4, "target_r": 2, "lora_alpha": 8.0, "rank_pattern": "yes"}
    assert a.ranks == [3, 4]  # q_proj of layer 0 kept 3 rows; layer 1's down_proj (0 rows) adds nothing
    assert a.modules[0].scalings == [round(8 / (4 + 1e-5), 6)]
    rep = lc.report(tmp_path / "adapter", base=tmp_path / "base")
    assert {r.form: r.lora_parameters for r in rep.rows}["adapter"] == want


def test_adalora_attach_split_strip_are_peft_tensors(tmp_path):
    factory, ref = _adalora(tmp_path, "llama")
    want = logits(ref)
    lc.convert(tmp_path / "adapter", "unmerged", base=tmp_path / "base", output=tmp_path / "u")
    got = load_file(str(tmp_path / "u" / "model.safetensors"))
    state = ref.state_dict()  # PEFT's in-model state dict: lora_A/B/E.default, ranknum.default, base_layer
    assert set(got) == set(state)
    for k, v in got.items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k
    lc.convert(tmp_path / "u", "adapter", output=tmp_path / "a2")
    a1 = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    a2 = load_file(str(tmp_path / "a2" / "adapter_model.safetensors"))
    assert set(a1) == set(a2) and all(torch.equal(a1[k], a2[k]) for k in a1)
    cfg = json.loads((tmp_path / "a2" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and cfg["rank_pattern"]["model.layers.1.mlp.down_proj.lora_E"] == [False] * 4
    assert (logits(peft_load(factory, tmp_path / "a2")) - want).abs().max().item() <= TOL
    lc.convert(tmp_path / "u", "base", output=tmp_path / "b")
    _same_tensors(tmp_path / "base" / "model.safetensors", tmp_path / "b" / "model.safetensors")


def _edit_adapter(tmp_path, drop=None, reshape=None, config=None):
    """The llama case's adapter with one tensor dropped or replaced, or its config changed."""
    _adalora(tmp_path, "llama")
    f = tmp_path / "adapter" / "adapter_model.safetensors"
    sd = load_file(str(f))
    if drop:
        del sd[drop]
    if reshape:
        sd[reshape[0]] = torch.randn(*reshape[1])
    save_file(sd, str(f), metadata={"format": "pt"})
    if config:
        p = tmp_path / "adapter" / "adapter_config.json"
        p.write_text(json.dumps({**json.loads(p.read_text()), **config}))
    return f


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
V1 = "base_model.model.model.layers.1.self_attn.v_proj"


@pytest.mark.parametrize(
    "edit, needles",
    [
        (dict(drop=f"{V1}.lora_E"), ["lora_E is missing for AdaLoRA module", f"{V1}.lora_"]),
        (dict(reshape=(f"{V1}.lora_E", (4,))), ["lora_E has shape [4], expected [4, 1]", f"{V1}.lora_E"]),
        (dict(reshape=(f"{V1}.lora_B", (16, 5))), ["lora_A has 4 rows, lora_B has 5 columns", f"{V1}.lora_B"]),
        (dict(reshape=(f"{V1}.lora_A", (4, 31))), ["31", "32"]),
        (dict(config={"init_r": 6}), ["init_r is 6, the tensors have rank 4", "PEFT refuses to load it"]),
        (
            dict(config={"rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [True, True, False, False]}}),
            ["rank_pattern keeps 2 of its rows, the tensors have rank 3", f"{Q0}.lora_A"],
        ),
    ],
)
def test_adalora_bad_input_one_error_nothing_written(tmp_path, edit, needles):
    f = _edit_adapter(tmp_path, **edit)
    before = f.read_bytes()
    out = tmp_path / "out"
    res = cli("merge", tmp_path / "adapter", "--base", tmp_path / "base", "-o", out)
    one_error(res, *needles, out=out)
    assert f.read_bytes() == before


def test_adalora_configs_peft_refuses_are_refused_by_name(tmp_path):
    _edit_adapter(tmp_path, config={"use_dora": True})
    out = tmp_path / "out"
    res = cli("merge", tmp_path / "adapter", "--base", tmp_path / "base", "-o", out)
    one_error(res, "AdaLoRA with use_dora", "PEFT refuses", out=out)


def test_adalora_without_its_config_is_refused(tmp_path):
    _adalora(tmp_path, "llama")
    (tmp_path / "adapter" / "adapter_config.json").unlink()
    out = tmp_path / "out"
    res = cli("merge", tmp_path / "adapter", "--base", tmp_path / "base", "-o", out)
    one_error(res, "AdaLoRA tensors (lora_E) without an adapter_config.json", out=out)


# -- VeRA ------------------------------------------------------------------------------------------------

VERA_CASES = {
    # q_proj/v_proj are 32 wide, down_proj 48: vera_A is cut per layer; v_proj's 16 outputs cut vera_B
    "llama": (llama, dict(r=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2-conv1d": (gpt2, dict(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
}


def _vera(tmp_path, case, **extra):
    """The base saved, a VeRA adapter with random λ vectors saved as PEFT saves it, and PEFT's model loaded
    from it (the reference)."""
    from peft import VeraConfig, get_peft_model

    factory, kw = VERA_CASES[case]
    base = factory()
    base.save_pretrained(str(tmp_path / "base"))
    torch.manual_seed(1)
    pm = get_peft_model(base, VeraConfig(**kw, **extra))
    with torch.no_grad():  # PEFT initialises λ_b to zeros: ΔW = 0 would make every test pass
        for name, p in pm.named_parameters():
            if "vera_lambda" in name:
                p.copy_(torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "adapter"))
    if extra.get("save_projection") is False:
        return factory, None
    return factory, peft_load(factory, tmp_path / "adapter")


@pytest.mark.parametrize("case", sorted(VERA_CASES))
@pytest.mark.parametrize("via", ["adapter", "unmerged"])
def test_vera_merge_matches_peft(tmp_path, case, via):
    factory, ref = _vera(tmp_path, case)
    want = logits(ref)
    assert (want - logits(factory())).abs().max() > 1e-3
    if via == "adapter":
        lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    else:  # PEFT's in-model state dict: λ vectors, the projections under every layer and base_model.vera_A.default
        lc.merge(save_unmerged(ref, tmp_path / "unmerged"), output=tmp_path / "merged")
    got = logits(load_merged(tmp_path / "merged"))
    assert (got - want).abs().max().item() <= TOL
    assert (got - logits(ref.merge_and_unload())).abs().max().item() <= TOL


def test_vera_detect_and_report_count_peft_trainable(tmp_path):
    from peft import PeftModel

    factory, _ = _vera(tmp_path, "llama")
    want = PeftModel.from_pretrained(factory(), str(tmp_path / "adapter"), is_trainable=True)
    want = want.get_nb_trainable_parameters()[0]
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert want == sum(v.numel() for k, v in saved.items() if "vera_lambda" in k)  # the projections are frozen
    det = lc.detect(tmp_path / "adapter")
    assert det.dialect == "vera"
    (a,) = det.adapters
    assert a.lora_parameters == want
    assert a.tuner == {
        "peft_type": "VERA",
        "r": 8,
        "vera_A": [8, 48],
        "vera_B": [32, 8],
        "input_widths": "from the base",
    }
    assert a.modules[0].scalings == [1.0]
    rep = lc.report(tmp_path / "adapter", base=tmp_path / "base")
    assert {r.form: r.lora_parameters for r in rep.rows}["adapter"] == want


@pytest.mark.parametrize("case", sorted(VERA_CASES))
def test_vera_attach_split_strip_are_peft_tensors(tmp_path, case):
    factory, ref = _vera(tmp_path, case)
    want = logits(ref)
    lc.convert(tmp_path / "adapter", "unmerged", base=tmp_path / "base", output=tmp_path / "u")
    got = load_file(str(tmp_path / "u" / "model.safetensors"))
    state = ref.state_dict()
    missing = set(state) - set(got)
    assert all("lm_head" in k for k in missing), sorted(missing)  # a tied head is stored once, as for LoRA
    assert set(got) <= set(state)
    for k, v in got.items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k
    lc.convert(tmp_path / "u", "adapter", output=tmp_path / "a2")
    a1 = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    a2 = load_file(str(tmp_path / "a2" / "adapter_model.safetensors"))
    assert set(a1) == set(a2) and all(torch.equal(a1[k], a2[k]) for k in a1)
    cfg = json.loads((tmp_path / "a2" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "VERA" and "lora_alpha" not in cfg  # VeRA's own config, as PEFT wrote it
    assert (logits(peft_load(factory, tmp_path / "a2")) - want).abs().max().item() <= TOL
    lc.convert(tmp_path / "u", "base", output=tmp_path / "b")
    _same_tensors(tmp_path / "base" / "model.safetensors", tmp_path / "b" / "model.safetensors")


VQ0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "drop, reshape, needles",
    [
        (f"{VQ0}.vera_lambda_d", None, ["vera_lambda_d is missing for VeRA module", f"{VQ0}.vera_lambda_b"]),
        ("base_model.vera_B", None, ["vera_B is missing beside", "base_model.vera_A"]),
        (
            None,
            (f"{VQ0}.vera_lambda_d", (7,)),
            ["vera_lambda_d has 7 values, vera_A has r=8 rows", f"{VQ0}.vera_lambda_d"],
        ),
        (
            None,
            (f"{VQ0}.vera_lambda_b", (40,)),
            ["vera_lambda_b has 40 values, more than vera_B's 32", f"{VQ0}.vera_lambda_b"],
        ),
        (None, ("base_model.vera_A", (8, 40)), ["the layer takes 48 inputs, more than vera_A's 40 columns"]),
        (None, ("base_model.vera_A", (6, 48)), ["do not have r=8 rows", "base_model.vera_A"]),
    ],
)
def test_vera_bad_input_one_error_nothing_written(tmp_path, drop, reshape, needles):
    _vera(tmp_path, "llama")
    f = tmp_path / "adapter" / "adapter_model.safetensors"
    sd = load_file(str(f))
    if drop:
        del sd[drop]
    if reshape:
        sd[reshape[0]] = torch.randn(*reshape[1])
    save_file(sd, str(f), metadata={"format": "pt"})
    before = f.read_bytes()
    out = tmp_path / "out"
    res = cli("merge", tmp_path / "adapter", "--base", tmp_path / "base", "-o", out)
    one_error(res, *needles, out=out)
    assert f.read_bytes() == before


def test_vera_without_saved_projections_is_refused_by_name(tmp_path):
    _vera(tmp_path, "llama", save_projection=False)
    assert "base_model.vera_A" not in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    out = tmp_path / "out"
    res = cli("merge", tmp_path / "adapter", "--base", tmp_path / "base", "-o", out)
    one_error(res, "saved without its projections", "projection_prng_key", out=out)


def test_vera_routes_without_the_base_are_refused(tmp_path):
    """vera_A is as wide as the widest layer: a route that does not read the base cannot cut it per layer."""
    _vera(tmp_path, "llama")
    out = tmp_path / "out"
    res = cli("convert", tmp_path / "adapter", "--to", "mlx", "-o", out)
    one_error(res, "input width comes from the base", out=out)


def test_vera_unprefixed_unmerged_layout(tmp_path):
    """An in-model state dict saved without ``base_model.model.`` (the projections keep ``base_model.``)."""
    factory, ref = _vera(tmp_path, "llama")
    src = save_unmerged(ref, tmp_path / "unmerged", prefixed=False)
    assert "model.layers.0.self_attn.q_proj.vera_lambda_b.default" in load_file(str(src / "model.safetensors"))
    lc.merge(src, output=tmp_path / "merged")
    assert (logits(load_merged(tmp_path / "merged")) - logits(ref)).abs().max().item() <= TOL


def test_two_adalora_adapters_in_one_checkpoint_are_refused(tmp_path):
    """The config beside them is one adapter's: a second one's alpha and init_r would be guessed."""
    _, ref = _adalora(tmp_path, "llama")
    src = save_unmerged(ref, tmp_path / "unmerged")
    f = src / "model.safetensors"
    sd = load_file(str(f))
    sd.update({k.replace(".default", ".other"): v.clone() for k, v in sd.items() if ".default" in k})
    save_file(sd, str(f), metadata={"format": "pt"})
    out = tmp_path / "out"
    one_error(cli("merge", src, "-o", out), "2 AdaLoRA adapters in one checkpoint (default, other)", ".other", out=out)


def test_combine_refuses_vera(tmp_path):
    _vera(tmp_path, "llama")
    out = tmp_path / "out"
    res = cli("combine", tmp_path / "adapter", tmp_path / "adapter", "--method", "cat", "-o", out)
    one_error(res, "input width comes from the base", out=out)


# -- IA³ -------------------------------------------------------------------------------------------------


def gpt2_biased():
    """Tiny GPT-2 with non-zero biases (its init leaves them 0, and IA³ scales c_attn's: 0 · l would pass)."""
    model = gpt2()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model


IA3_CASES = {
    # attention modules scale their outputs (rows), down_proj its inputs (columns)
    "llama": (llama, dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    # Conv1D stores (in, out): c_attn's vector scales its columns and its bias, mlp.c_proj's its rows
    "gpt2-conv1d": (
        gpt2_biased,
        dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True),
    ),
}


def _ia3(tmp_path, case):
    """The base saved, an IA³ adapter with vectors away from 1 saved as PEFT saves it, and PEFT's model loaded
    from it (the reference)."""
    from peft import IA3Config, get_peft_model

    factory, kw = IA3_CASES[case]
    base = factory()
    base.save_pretrained(str(tmp_path / "base"))
    torch.manual_seed(1)
    pm = get_peft_model(base, IA3Config(**kw))
    with torch.no_grad():  # PEFT initialises l to ones: W ⊙ 1 would make every test pass
        for name, p in pm.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + torch.randn_like(p) * 0.5)
    pm.save_pretrained(str(tmp_path / "adapter"))
    return factory, peft_load(factory, tmp_path / "adapter")


@pytest.mark.parametrize("case", sorted(IA3_CASES))
@pytest.mark.parametrize("via", ["adapter", "unmerged"])
def test_ia3_merge_matches_peft(tmp_path, case, via):
    factory, ref = _ia3(tmp_path, case)
    want = logits(ref)
    assert (want - logits(factory())).abs().max() > 1e-3
    if via == "adapter":
        lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    else:
        lc.merge(save_unmerged(ref, tmp_path / "unmerged"), output=tmp_path / "merged")
    got = logits(load_merged(tmp_path / "merged"))
    assert (got - want).abs().max().item() <= TOL
    peft_merged = ref.merge_and_unload()
    assert (got - logits(peft_merged)).abs().max().item() <= TOL
    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for k, v in peft_merged.state_dict().items():  # every tensor, the scaled biases too, within one rounding
        if k in ours:
            assert torch.allclose(ours[k], v, rtol=1e-6, atol=0), k


def test_ia3_detect_and_report_count_peft_trainable(tmp_path):
    from peft import PeftModel

    factory, _ = _ia3(tmp_path, "llama")
    want = PeftModel.from_pretrained(factory(), str(tmp_path / "adapter"), is_trainable=True)
    want = want.get_nb_trainable_parameters()[0]
    det = lc.detect(tmp_path / "adapter")
    assert det.dialect == "ia3"
    (a,) = det.adapters
    assert a.lora_parameters == want == 2 * (16 + 16 + 48)
    assert a.tuner == {"peft_type": "IA3", "feedforward_modules": ["down_proj"]}
    rep = lc.report(tmp_path / "adapter", base=tmp_path / "base")
    assert {r.form: r.lora_parameters for r in rep.rows}["adapter"] == want


@pytest.mark.parametrize("case", sorted(IA3_CASES))
def test_ia3_attach_split_strip_are_peft_tensors(tmp_path, case):
    factory, ref = _ia3(tmp_path, case)
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
    assert json.loads((tmp_path / "a2" / "adapter_config.json").read_text())["peft_type"] == "IA3"
    assert (logits(peft_load(factory, tmp_path / "a2")) - want).abs().max().item() <= TOL
    lc.convert(tmp_path / "u", "base", output=tmp_path / "b")
    _same_tensors(tmp_path / "base" / "model.safetensors", tmp_path / "b" / "model.safetensors")


IK0 = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"


@pytest.mark.parametrize(
    "shape, config, needles",
    [
        ((15, 1), None, ["ia3_l has 15 values, the base layer's side it scales has 16", IK0]),
        ((16,), None, ["ia3_l of shape [16]", IK0]),
        ((1, 32), None, ["is not in feedforward_modules", "(out, 1), not [1, 32]", IK0]),
        (None, {"feedforward_modules": ["down_proj", "k_proj"]}, ["is in feedforward_modules", IK0]),
    ],
)
def test_ia3_bad_input_one_error_nothing_written(tmp_path, shape, config, needles):
    _ia3(tmp_path, "llama")
    f = tmp_path / "adapter" / "adapter_model.safetensors"
    if shape:
        sd = load_file(str(f))
        sd[IK0] = torch.rand(*shape) + 0.5
        save_file(sd, str(f), metadata={"format": "pt"})
    if config:
        p = tmp_path / "adapter" / "adapter_config.json"
        p.write_text(json.dumps({**json.loads(p.read_text()), **config}))
    before = f.read_bytes()
    out = tmp_path / "out"
    one_error(cli("merge", tmp_path / "adapter", "--base", tmp_path / "base", "-o", out), *needles, out=out)
    assert f.read_bytes() == before


def test_ia3_weighted_or_stacked_or_lora_formats_are_refused_by_name(tmp_path):
    """W ⊙ l has no weight, no sum with other adapters, and no LoRA factors."""
    _ia3(tmp_path, "llama")
    out = tmp_path / "out"
    res = cli("merge", tmp_path / "base", "--adapter", f"{tmp_path / 'adapter'}:0.5", "-o", out)
    one_error(res, "IA³ scales this weight", out=out)
    res = cli("combine", tmp_path / "adapter", tmp_path / "adapter", "--method", "cat", "-o", out)
    one_error(res, "combining does not take them", "IA³ modules are merged", out=out)
    res = cli("convert", tmp_path / "adapter", "--to", "mlx", "-o", out)
    one_error(res, "ia3 module", "--to mlx does not take them", out=out)


def test_attach_under_other_module_names_is_refused(tmp_path):
    """A tuner's config keeps the adapter's own paths: attached under the base's other spelling
    (``h.0.attn.c_attn`` -> ``transformer.h.0.attn.c_attn``) it would not describe the unmerged model."""
    _, ref = _vera(tmp_path, "gpt2-conv1d")
    f = tmp_path / "adapter" / "adapter_model.safetensors"
    sd = load_file(str(f))
    save_file({k.replace("model.transformer.", "model."): v for k, v in sd.items()}, str(f), metadata={"format": "pt"})
    out = tmp_path / "out"
    res = cli("convert", tmp_path / "adapter", "--to", "unmerged", "--base", tmp_path / "base", "-o", out)
    one_error(
        res, "h.0.attn.c_attn is transformer.h.0.attn.c_attn in the base", "VERA adapter under other names", out=out
    )
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")  # a merge writes no config
    assert (logits(load_merged(tmp_path / "merged")) - logits(ref)).abs().max().item() <= TOL
