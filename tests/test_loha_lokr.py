"""PEFT's LoHa and LoKr adapters end to end: detect, merge (adapter + base, unmerged -> merged) equal to PEFT's
``merge_and_unload``, verify, strip / split / attach tensor for tensor as PEFT lays them out, and the inputs
that are refused (shapes that do not fit, a missing factor, a config of another type, LoRA-only routes,
GPT-2's Conv1D which PEFT itself refuses)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import cli, merge_layer_kinds_like_peft, one_error, peft_load
from peft import LoHaConfig, LoKrConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tiny import UNET_TARGETS, gpt2, llama, load_merged, logits, qwen2, save_unmerged, unet, unet_out

import lora_convert as lc

TOL = 1e-5
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "loha": lambda t: LoHaConfig(
        r=4,
        alpha=8,
        target_modules=t,
        init_weights=False,
        rank_pattern={"k_proj": 2},
        alpha_pattern={"v_proj": 3},
    ),
    "lokr": lambda t: LoKrConfig(r=4, alpha=6, target_modules=t, init_weights=False, rank_pattern={"o_proj": 2}),
    "lokr-both": lambda t: LoKrConfig(r=2, alpha=5, target_modules=t, init_weights=False, decompose_both=True),
    "loha-conv": lambda t: LoHaConfig(r=3, alpha=4, target_modules=t, init_weights=False, use_effective_conv2d=True),
    "lokr-conv": lambda t: LoKrConfig(
        r=1, alpha=3, target_modules=t, init_weights=False, decompose_both=True, use_effective_conv2d=True
    ),
}


def _peft(model, kind: str, targets: list[str]):
    torch.manual_seed(1)
    pm = get_peft_model(model, CONFIGS[kind](targets))
    with torch.no_grad():  # PEFT's random init is small: make ΔW visible in the logits
        for n, p in pm.named_parameters():
            if "hada_" in n or "lokr_" in n:
                p.mul_(2.0)
    return pm.eval()


def _llama_case(tmp_path: Path, kind: str):
    base = llama()
    base.save_pretrained(str(tmp_path / "base"))
    pm = _peft(copy.deepcopy(base), kind, LLAMA_TARGETS)
    pm.save_pretrained(str(tmp_path / "adapter"))
    want = logits(copy.deepcopy(pm).merge_and_unload())
    return pm, want, logits(base)


@pytest.mark.parametrize("kind", ["loha", "lokr", "lokr-both"])
def test_llama_merge_equals_peft_merge_and_unload(tmp_path: Path, kind: str) -> None:
    pm, want, before = _llama_case(tmp_path, kind)
    assert (want - before).abs().max().item() > 1e-2  # the adapter does something
    torch.testing.assert_close(logits(pm), want, rtol=0, atol=TOL)  # PEFT's unmerged forward agrees
    d = lc.detect(tmp_path / "adapter")
    (a,) = d.adapters
    assert a.tuner["peft_type"] == kind.split("-")[0].upper()
    assert a.lora_parameters == pm.get_nb_trainable_parameters()[0]
    assert not [w for w in d.warnings if "not plain LoRA" in w]
    trainable, everything = pm.get_nb_trainable_parameters()
    row = lc.report(tmp_path / "adapter", base=tmp_path / "base").row("adapter")
    assert (row.lora_parameters, row.total_parameters) == (trainable, everything)
    res = lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    assert res.ops.get("merge") == 2 * len(LLAMA_TARGETS)
    assert (logits(load_merged(tmp_path / "merged")) - want).abs().max().item() <= TOL
    v = lc.verify(tmp_path / "merged", base=tmp_path / "base", adapter=tmp_path / "adapter")
    assert v.ok, v
    # unmerged -> merged: PEFT's in-model state dict, base_layer beside the factors
    save_unmerged(pm, tmp_path / "unmerged")
    lc.convert(tmp_path / "unmerged", "merged", output=tmp_path / "merged2")
    assert (logits(load_merged(tmp_path / "merged2")) - want).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_split_attach_strip_round_trip_as_peft_lays_it_out(tmp_path: Path, kind: str) -> None:
    pm, want, _ = _llama_case(tmp_path, kind)
    save_unmerged(pm, tmp_path / "unmerged")
    lc.convert(tmp_path / "unmerged", "adapter", output=tmp_path / "split")
    ours, peft_saved = (
        load_file(tmp_path / "split" / "adapter_model.safetensors"),
        load_file(tmp_path / "adapter" / "adapter_model.safetensors"),
    )
    assert ours.keys() == peft_saved.keys() and all(torch.equal(ours[k], peft_saved[k]) for k in ours)
    cfg = json.loads((tmp_path / "split" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == kind.upper() and "lora_alpha" not in cfg
    assert (logits(peft_load(llama, tmp_path / "split")) - want).abs().max().item() <= TOL  # PEFT loads it
    lc.convert(tmp_path / "adapter", "unmerged", base=tmp_path / "base", output=tmp_path / "attached")
    attached = load_file(tmp_path / "attached" / "model.safetensors")
    sd = {k: v.detach() for k, v in pm.state_dict().items()}
    assert attached.keys() == sd.keys() and all(torch.equal(attached[k], sd[k]) for k in sd)
    lc.convert(tmp_path / "attached", "base", output=tmp_path / "stripped")
    stripped, base = (
        load_file(tmp_path / "stripped" / "model.safetensors"),
        load_file(tmp_path / "base" / "model.safetensors"),
    )
    assert stripped.keys() == base.keys() and all(torch.equal(stripped[k], base[k]) for k in base)


@pytest.mark.parametrize("kind", ["loha-conv", "lokr-conv", "lokr"])
def test_unet_conv_merge_equals_peft(tmp_path: Path, kind: str) -> None:
    model = unet()
    model.save_pretrained(str(tmp_path / "unet"))
    pm = _peft(model, kind, UNET_TARGETS)
    (tmp_path / "adapter").mkdir()
    sd = get_peft_model_state_dict(pm)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    pm.peft_config["default"].save_pretrained(str(tmp_path / "adapter"))
    if kind.endswith("-conv"):  # Tucker cores on the 3×3 convs
        assert any("hada_t1" in k or "lokr_t2" in k for k in sd)
    merged_ref = copy.deepcopy(pm).merge_and_unload()
    want = unet_out(merged_ref)
    assert (want - unet_out(unet())).abs().max().item() > 1e-3
    lc.merge(tmp_path / "adapter", base=tmp_path / "unet", output=tmp_path / "merged")
    got = unet_out(UNet2DConditionModel.from_pretrained(str(tmp_path / "merged")).eval())
    assert (got - want).abs().max().item() <= TOL
    d = lc.detect(tmp_path / "adapter")
    assert d.adapters[0].lora_parameters == pm.get_nb_trainable_parameters()[0]


def _edit_adapter(src: Path, dst: Path, edit) -> None:
    dst.mkdir()
    t = load_file(src / "adapter_model.safetensors")
    edit(t)
    save_file(t, str(dst / "adapter_model.safetensors"))
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())


def test_bad_inputs_one_error_naming_file_and_tensor(tmp_path: Path) -> None:
    _llama_case(tmp_path, "loha")
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    _edit_adapter(tmp_path / "adapter", tmp_path / "missing", lambda t: t.pop(f"{q}.hada_w2_b"))
    one_error(
        cli("convert", tmp_path / "missing", "--to", "merged", "--base", tmp_path / "base", "-o", tmp_path / "o1"),
        "hada_w2_b is missing",
        f"{q}.hada_",
        "missing",
        out=tmp_path / "o1",
    )

    def wider(t):
        t[f"{q}.hada_w1_b"] = torch.zeros(4, 40)
        t[f"{q}.hada_w2_b"] = torch.zeros(4, 40)

    _edit_adapter(tmp_path / "adapter", tmp_path / "wide", wider)
    one_error(
        cli("convert", tmp_path / "wide", "--to", "merged", "--base", tmp_path / "base", "-o", tmp_path / "o2"),
        "is not the base weight's (32, 32)",
        f"{q}.hada_w1_a",
        str(tmp_path / "wide"),
        out=tmp_path / "o2",
    )
    _edit_adapter(tmp_path / "adapter", tmp_path / "rank", lambda t: t.update({f"{q}.hada_w2_a": torch.zeros(32, 3)}))
    one_error(
        cli("convert", tmp_path / "rank", "--to", "merged", "--base", tmp_path / "base", "-o", tmp_path / "o3"),
        "ranks that differ",
        f"{q}.hada_w2_a",
        out=tmp_path / "o3",
    )
    # a LoRA config beside LoHa tensors: its lora_alpha is not theirs
    (tmp_path / "lora-config").mkdir()
    (tmp_path / "lora-config" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    )
    (tmp_path / "lora-config" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8})
    )
    one_error(
        cli("convert", tmp_path / "lora-config", "--to", "merged", "--base", tmp_path / "base", "-o", tmp_path / "o4"),
        "peft_type LORA",
        "LoHa",
        out=tmp_path / "o4",
    )


@pytest.mark.parametrize("to", ["kohya", "gguf", "mlx", "diffusers"])
def test_lora_only_routes_refuse_a_loha_adapter_by_name(tmp_path: Path, to: str) -> None:
    _llama_case(tmp_path, "loha")
    out = tmp_path / ("o.gguf" if to == "gguf" else "o")
    one_error(
        cli("convert", tmp_path / "adapter", "--to", to, "--base", tmp_path / "base", "-o", out),
        "LoHa",
        "does not take them",
        out=out,
    )


def test_gpt2_conv1d_peft_refuses_and_so_do_we(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="not supported"):  # PEFT builds LoHa on nn.Linear/Conv1d/Conv2d only
        get_peft_model(gpt2(), LoHaConfig(r=2, target_modules=["c_attn"]))
    gpt2().save_pretrained(str(tmp_path / "base"))
    (tmp_path / "adapter").mkdir()
    m = "base_model.model.transformer.h.0.attn.c_attn"
    t = {f"{m}.hada_w1_a": torch.ones(96, 2), f"{m}.hada_w1_b": torch.ones(2, 32)}
    t |= {f"{m}.hada_w2_a": torch.ones(96, 2), f"{m}.hada_w2_b": torch.ones(2, 32)}
    save_file(t, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LOHA", "r": 2, "alpha": 2, "target_modules": ["c_attn"]})
    )
    one_error(
        cli("convert", tmp_path / "adapter", "--to", "merged", "--base", tmp_path / "base", "-o", tmp_path / "o"),
        "Conv1D",
        f"{m}.hada_w1_a",
        out=tmp_path / "o",
    )


def test_unmerge_verify_and_a_lora_beside_a_lokr(tmp_path: Path) -> None:
    """merged - ΔW gives the base back (within rounding); verify catches the wrong adapter; a LoRA and a LoKr
    merged in one pass (one fp32 tile) equal the two merged one after the other."""
    from peft import LoraConfig

    pm, want, _ = _llama_case(tmp_path, "lokr")
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    lc.convert(tmp_path / "merged", "base", adapters=[str(tmp_path / "adapter")], output=tmp_path / "unmerged-base")
    back, base = (
        load_file(tmp_path / "unmerged-base" / "model.safetensors"),
        load_file(tmp_path / "base" / "model.safetensors"),
    )
    assert max((back[k] - base[k]).abs().max().item() for k in base) <= 1e-5
    torch.manual_seed(4)
    other = get_peft_model(
        llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    )
    other.save_pretrained(str(tmp_path / "lora"))
    assert not lc.verify(tmp_path / "merged", base=tmp_path / "base", adapter=tmp_path / "lora").ok
    lc.merge(tmp_path / "base", adapters=[str(tmp_path / "adapter"), str(tmp_path / "lora")], output=tmp_path / "both")
    lc.merge(tmp_path / "lora", base=tmp_path / "merged", output=tmp_path / "seq")
    both, seq = load_file(tmp_path / "both" / "model.safetensors"), load_file(tmp_path / "seq" / "model.safetensors")
    assert max((both[k] - seq[k]).abs().max().item() for k in seq) <= 1e-6
    assert max((both[k] - base[k]).abs().max().item() for k in base) > 1e-2
    assert lc.verify(
        tmp_path / "both", base=tmp_path / "base", adapters=[str(tmp_path / "adapter"), str(tmp_path / "lora")]
    ).ok


Q = "base_model.model.model.layers.0.self_attn.q_proj"
BAD_FACTORS = {  # q_proj is 32×32: LoKr w1 (4, 4) ⊗ w2 (8, 8)
    "no-w1": ({"lokr_w2": (8, 8)}, "LOKR", "lokr_w1 is missing", "lokr_w2"),
    "whole-and-halves": (
        {"lokr_w1": (4, 4), "lokr_w1_a": (4, 2), "lokr_w1_b": (2, 4), "lokr_w2": (8, 8)},
        "LOKR",
        "holds lokr_w1 and its low-rank halves",
        "lokr_w1",
    ),
    "kron-too-big": ({"lokr_w1": (4, 4), "lokr_w2": (8, 9)}, "LOKR", "elements", "lokr_w1"),
    "t2-beside-whole": (
        {"lokr_w1": (4, 4), "lokr_w2": (8, 8), "lokr_t2": (2, 2, 1, 1)},
        "LOKR",
        "lokr_t2 beside a whole lokr_w2",
        "lokr_t2",
    ),
    "halves-do-not-multiply": (
        {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (3, 8)},
        "LOKR",
        "do not multiply",
        "lokr_w2_a",
    ),
    "one-tucker-core": (
        {
            "hada_w1_a": (2, 32),
            "hada_w1_b": (2, 32),
            "hada_w2_a": (2, 32),
            "hada_w2_b": (2, 32),
            "hada_t1": (2, 2, 1, 1),
        },
        "LOHA",
        "hada_t2 is missing",
        "hada_",
    ),
    "embedding": (
        {"hada_w1_a": (96, 2), "hada_w1_b": (2, 32), "hada_w2_a": (96, 2), "hada_w2_b": (2, 32)},
        "LOHA",
        "PEFT builds LoHa only on nn.Linear",
        "hada_w1_a",
    ),
    "nan": ({"lokr_w1": (4, 4), "lokr_w2": (8, 8), "nan": ()}, "LOKR", "NaN", "lokr_w2"),
}


@pytest.mark.parametrize("case", sorted(BAD_FACTORS))
def test_bad_factors_one_error_naming_file_and_tensor(tmp_path: Path, case: str) -> None:
    shapes, peft_type, needle, tensor = BAD_FACTORS[case]
    llama().save_pretrained(str(tmp_path / "base"))
    ad = tmp_path / "adapter"
    ad.mkdir()
    mod = "base_model.model.model.embed_tokens" if case == "embedding" else Q
    t = {f"{mod}.{n}": torch.ones(s) for n, s in shapes.items() if n != "nan"}
    if "nan" in shapes:
        t[f"{Q}.lokr_w2"][0, 0] = float("nan")
    save_file(t, str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "r": 2, "alpha": 2}))
    before = {p.name: p.read_bytes() for p in ad.iterdir()}
    line = one_error(
        cli("convert", ad, "--to", "merged", "--base", tmp_path / "base", "-o", tmp_path / "o"),
        needle,
        f"{mod}.{tensor}",
        out=tmp_path / "o",
    )
    assert str(ad) in line
    assert {p.name: p.read_bytes() for p in ad.iterdir()} == before  # inputs untouched


CONV_CONFIGS = {
    "loha": LoHaConfig(r=3, alpha=5, target_modules=["lin", "conv", "pw", "c1", "c1p"], init_weights=False),
    "loha-tucker": LoHaConfig(
        r=2, alpha=3, target_modules=["lin", "conv", "pw", "c1", "c1p"], init_weights=False, use_effective_conv2d=True
    ),
    "lokr": LoKrConfig(r=3, alpha=5, target_modules=["lin", "conv", "pw", "c1", "c1p"], init_weights=False),
    "lokr-both": LoKrConfig(
        r=1, alpha=2, target_modules=["lin", "conv", "pw", "c1", "c1p"], init_weights=False, decompose_both=True
    ),
    "lokr-tucker": LoKrConfig(  # not c1: PEFT's own get_delta_weight fails there (torch.kron on its layout)
        r=1,
        alpha=4,
        target_modules=["lin", "conv", "pw", "c1p"],
        init_weights=False,
        decompose_both=True,
        use_effective_conv2d=True,
    ),
    "lokr-factor": LoKrConfig(
        r=2, alpha=3, target_modules=["lin", "conv", "pw", "c1", "c1p"], init_weights=False, decompose_factor=4
    ),
}


@pytest.mark.parametrize("kind", sorted(CONV_CONFIGS))
def test_every_layer_kind_merges_to_peft_merge_and_unload(tmp_path: Path, kind: str) -> None:
    changed = merge_layer_kinds_like_peft(tmp_path, CONV_CONFIGS[kind])
    assert len(changed) == len(CONV_CONFIGS[kind].target_modules)


@pytest.mark.parametrize("kind", ["loha", "lokr-both"])
def test_qwen2_tied_merge_equals_peft(tmp_path: Path, kind: str) -> None:
    """Qwen2 (q/k/v biases, tied embeddings): the merge gives PEFT's merge_and_unload logits, the head stays tied."""
    base = qwen2()
    base.save_pretrained(str(tmp_path / "base"))
    pm = _peft(copy.deepcopy(base), kind, LLAMA_TARGETS)
    pm.save_pretrained(str(tmp_path / "adapter"))
    want = logits(copy.deepcopy(pm).merge_and_unload())
    assert (want - logits(base)).abs().max().item() > 1e-2
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    assert (logits(load_merged(tmp_path / "merged")) - want).abs().max().item() <= TOL
    assert "lm_head.weight" not in load_file(tmp_path / "merged" / "model.safetensors")
