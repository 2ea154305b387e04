"""PEFT's RandLoRA (shared random bases randlora_A/B scaled per layer by λ and γ, ΔW = B·A of rank r·⌈min/r⌉)
end to end against PEFT itself: detect and report count PEFT's trainable parameters, merges (adapter + base,
unmerged -> merged) give PEFT's ``merge_and_unload`` logits on Llama, Qwen2 and GPT-2 (Conv1D), verify knows ΔW,
strip / split / attach give PEFT's own tensors (PeftModel loads the split), bad input ends in one error line
naming file and tensor, an adapter saved without its bases is refused by name."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import cli, one_error, peft_load
from peft import RandLoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tiny import gpt2, llama, load_merged, logits, qwen2, save_unmerged

import lora_convert as lc

TOL = 1e-5
CASES = {
    "llama": (llama, dict(r=4, randlora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "qwen2": (qwen2, dict(r=3, randlora_alpha=6, target_modules=["k_proj", "gate_proj"])),
    "gpt2": (gpt2, dict(r=4, randlora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
}
Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _case(tmp_path: Path, arch: str = "llama"):
    factory, kw = CASES[arch]
    base = factory()
    base.save_pretrained(str(tmp_path / "base"))
    torch.manual_seed(1)
    pm = get_peft_model(copy.deepcopy(base), RandLoraConfig(init_weights=False, **kw)).eval()
    pm.save_pretrained(str(tmp_path / "adapter"))
    return factory, pm, logits(copy.deepcopy(pm).merge_and_unload()), logits(base)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_merge_equals_peft_merge_and_unload(tmp_path: Path, arch: str) -> None:
    _, pm, want, before = _case(tmp_path, arch)
    assert (want - before).abs().max().item() > 1e-2
    (a,) = lc.detect(tmp_path / "adapter").adapters
    kw = CASES[arch][1]
    assert (a.tuner["peft_type"], a.tuner["r"], a.tuner["randlora_alpha"]) == (
        "RANDLORA",
        kw["r"],
        kw["randlora_alpha"],
    )
    assert a.lora_parameters == pm.get_nb_trainable_parameters()[0]  # λ and γ (the bases are frozen)
    r = lc.report(tmp_path / "adapter", base=tmp_path / "base")
    row = r.row("adapter")
    assert (row.lora_parameters, row.total_parameters) == pm.get_nb_trainable_parameters()
    save_unmerged(pm, tmp_path / "unmerged")  # widths from its base weights; the adapter's from the base given
    assert r.row("unmerged").flops_lora == lc.report(tmp_path / "unmerged").row("unmerged").flops_lora > 0
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    assert (logits(load_merged(tmp_path / "merged")) - want).abs().max().item() <= TOL
    assert lc.verify(tmp_path / "merged", base=tmp_path / "base", adapter=tmp_path / "adapter").ok
    assert not lc.verify(tmp_path / "base", base=tmp_path / "base", adapter=tmp_path / "adapter").ok
    lc.convert(tmp_path / "unmerged", "merged", output=tmp_path / "merged2")
    assert (logits(load_merged(tmp_path / "merged2")) - want).abs().max().item() <= TOL


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_split_attach_strip_round_trip_as_peft_lays_it_out(tmp_path: Path, arch: str) -> None:
    factory, pm, want, _ = _case(tmp_path, arch)
    save_unmerged(pm, tmp_path / "unmerged")
    lc.convert(tmp_path / "unmerged", "adapter", output=tmp_path / "split")
    ours, peft_saved = (
        load_file(tmp_path / "split" / "adapter_model.safetensors"),
        load_file(tmp_path / "adapter" / "adapter_model.safetensors"),
    )
    assert ours.keys() == peft_saved.keys() and all(torch.equal(ours[k], peft_saved[k]) for k in ours)
    assert json.loads((tmp_path / "split" / "adapter_config.json").read_text())["peft_type"] == "RANDLORA"
    assert (logits(peft_load(factory, tmp_path / "split")) - want).abs().max().item() <= TOL
    lc.convert(tmp_path / "adapter", "unmerged", base=tmp_path / "base", output=tmp_path / "attached")
    attached = load_file(tmp_path / "attached" / "model.safetensors")
    tied = "base_model.model.lm_head.weight" if arch == "gpt2" else None
    sd = {k: v.detach() for k, v in pm.state_dict().items() if k != tied}  # the bases under every layer too
    assert attached.keys() == sd.keys() and all(torch.equal(attached[k], sd[k]) for k in sd)
    lc.convert(tmp_path / "attached", "base", output=tmp_path / "stripped")
    stripped, base = (
        load_file(tmp_path / "stripped" / "model.safetensors"),
        load_file(tmp_path / "base" / "model.safetensors"),
    )
    assert stripped.keys() == base.keys() and all(torch.equal(stripped[k], base[k]) for k in base)


BAD = {  # llama, r=4: q_proj 32×32 -> λ (4, 8), γ (8, 32); bases A (4, 1, 32), B (48, 8, 4)
    "no-gamma": (lambda t: t.pop(f"{Q}.randlora_gamma"), "randlora_gamma is missing", f"{Q}.randlora_lambda"),
    "bases-count": (
        lambda t: t.update({f"{Q}.randlora_lambda": torch.ones(4, 7), f"{Q}.randlora_gamma": torch.ones(7, 32)}),
        "8 bases",
        f"{Q}.randlora_lambda",
    ),
    "gamma-width": (
        lambda t: t.update({f"{Q}.randlora_lambda": torch.ones(4, 4), f"{Q}.randlora_gamma": torch.ones(4, 16)}),
        "smaller side is 32",
        f"{Q}.randlora_lambda",
    ),
    "short-B": (
        lambda t: t.update({"base_model.randlora_B": torch.ones(40, 8, 4)}),
        "smaller than this layer needs",
        "base_model.randlora_B",
    ),
    "B-rank": (lambda t: t.update({"base_model.randlora_B": torch.ones(48, 8, 3)}), "r=4", "base_model.randlora_B"),
    "nan": (lambda t: t[f"{Q}.randlora_gamma"].fill_(float("nan")), "NaN", f"{Q}.randlora_gamma"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_error_naming_file_and_tensor(tmp_path: Path, case: str) -> None:
    _case(tmp_path)
    edit, needle, tensor = BAD[case]
    bad = tmp_path / "bad"
    bad.mkdir()
    t = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    edit(t)
    save_file(t, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text((tmp_path / "adapter" / "adapter_config.json").read_text())
    out = tmp_path / "o"
    line = one_error(cli("convert", bad, "--to", "merged", "--base", tmp_path / "base", "-o", out), needle, out=out)
    assert str(bad) in line and tensor in line


def test_without_its_bases_refused_by_name_and_lora_only_routes(tmp_path: Path) -> None:
    _case(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    t = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    save_file(
        {k: v for k, v in t.items() if "randlora_A" not in k and "randlora_B" not in k}, str(bare / "a.safetensors")
    )
    (bare / "a.safetensors").rename(bare / "adapter_model.safetensors")
    data = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (bare / "adapter_config.json").write_text(json.dumps({**data, "save_projection": False}))
    one_error(
        cli("convert", bare, "--to", "merged", "--base", tmp_path / "base", "-o", tmp_path / "o"),
        "save_projection false",
        out=tmp_path / "o",
    )
    out = tmp_path / "o.gguf"
    one_error(
        cli("convert", tmp_path / "adapter", "--to", "gguf", "--base", tmp_path / "base", "-o", out),
        "does not take them",
        out=out,
    )
    one_error(
        cli("combine", tmp_path / "adapter", tmp_path / "adapter", "--method", "cat", "-o", tmp_path / "c"),
        "RandLoRA module(s)",
        "combining does not take them",
        out=tmp_path / "c",
    )
