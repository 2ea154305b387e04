"""PEFT's FourierFT (ΔW = Re(ifft2(S))·scaling, S the trained spectrum at places drawn from random_loc_seed) end
to end against PEFT itself: detect and report count PEFT's trainable parameters, merges (adapter + base,
unmerged -> merged) give PEFT's ``merge_and_unload`` logits on Llama, Qwen2 and GPT-2 (Conv1D, fan_in_fan_out),
verify knows ΔW, strip / split / attach give PEFT's own tensors (PeftModel loads the split), bad input ends in
one error line naming file and tensor."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import cli, one_error, peft_load
from peft import FourierFTConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tiny import gpt2, llama, load_merged, logits, qwen2, save_unmerged

import lora_convert as lc

TOL = 1e-5
CASES = {  # factory, FourierFTConfig kwargs
    "llama": (
        llama,
        dict(n_frequency=20, scaling=150.0, target_modules=["q_proj", "v_proj", "down_proj"])
        | dict(n_frequency_pattern={"down_proj": 30}, random_loc_seed=5),
    ),
    "qwen2": (qwen2, dict(n_frequency=16, scaling=90.0, target_modules=["k_proj", "o_proj", "up_proj"])),
    "gpt2": (gpt2, dict(n_frequency=24, scaling=120.0, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
}
Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _case(tmp_path: Path, arch: str = "llama"):
    factory, kw = CASES[arch]
    base = factory()
    base.save_pretrained(str(tmp_path / "base"))
    torch.manual_seed(1)
    pm = get_peft_model(copy.deepcopy(base), FourierFTConfig(init_weights=False, **kw)).eval()
    pm.save_pretrained(str(tmp_path / "adapter"))
    return factory, pm, logits(copy.deepcopy(pm).merge_and_unload()), logits(base)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_merge_equals_peft_merge_and_unload(tmp_path: Path, arch: str) -> None:
    _, pm, want, before = _case(tmp_path, arch)
    assert (want - before).abs().max().item() > 1e-2  # the adapter does something
    d = lc.detect(tmp_path / "adapter")
    (a,) = d.adapters
    kw = CASES[arch][1]
    assert a.tuner["peft_type"] == "FOURIERFT"
    assert (a.tuner["n_frequency"], a.tuner["scaling"]) == (kw["n_frequency"], kw["scaling"])
    assert a.tuner["random_loc_seed"] == kw.get("random_loc_seed", 777)
    assert a.lora_parameters == pm.get_nb_trainable_parameters()[0]
    row = lc.report(tmp_path / "adapter", base=tmp_path / "base").row("adapter")
    assert (row.lora_parameters, row.total_parameters) == pm.get_nb_trainable_parameters()
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    assert (logits(load_merged(tmp_path / "merged")) - want).abs().max().item() <= TOL
    assert lc.verify(tmp_path / "merged", base=tmp_path / "base", adapter=tmp_path / "adapter").ok
    assert not lc.verify(tmp_path / "base", base=tmp_path / "base", adapter=tmp_path / "adapter").ok
    lc.convert(tmp_path / "merged", "base", adapters=[str(tmp_path / "adapter")], output=tmp_path / "back")  # unmerge
    back, base = load_file(tmp_path / "back" / "model.safetensors"), load_file(tmp_path / "base" / "model.safetensors")
    assert back.keys() == base.keys() and max((back[k] - base[k]).abs().max().item() for k in base) <= 1e-6
    save_unmerged(pm, tmp_path / "unmerged")
    lc.convert(tmp_path / "unmerged", "merged", output=tmp_path / "merged2")
    assert (logits(load_merged(tmp_path / "merged2")) - want).abs().max().item() <= TOL
    got = load_file(tmp_path / "merged2" / "model.safetensors")
    sd = copy.deepcopy(pm).merge_and_unload().state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in got)  # fp32: the same ifft2, the same sum


def test_report_flops_from_the_layer_widths(tmp_path: Path) -> None:
    """FourierFT does not store its layers' widths: the in-model state dict's base weights give them, and an
    adapter's come from the base it is reported on. The unmerged forward costs x @ ΔWᵀ per token; the merge an
    inverse 2-D FFT (~5·N·log₂N), the scaling and the add."""
    import math

    _, pm, _, _ = _case(tmp_path)
    save_unmerged(pm, tmp_path / "unmerged")
    widths = {"q_proj": (32, 32), "v_proj": (16, 32), "down_proj": (32, 48)}
    want = sum(2 * o * i for o, i in widths.values()) * 2  # two layers
    merge = sum(round(5 * o * i * math.log2(o * i)) + 2 * o * i for o, i in widths.values()) * 2
    assert lc.report(tmp_path / "unmerged").row("unmerged").flops_lora == want
    r = lc.report(tmp_path / "adapter", base=tmp_path / "base")
    assert (r.row("unmerged").flops_lora, r.row("adapter").merge_flops) == (want, merge)


def test_split_attach_strip_round_trip_as_peft_lays_it_out(tmp_path: Path) -> None:
    factory, pm, want, _ = _case(tmp_path, "gpt2")
    save_unmerged(pm, tmp_path / "unmerged")
    lc.convert(tmp_path / "unmerged", "adapter", output=tmp_path / "split")
    ours, peft_saved = (
        load_file(tmp_path / "split" / "adapter_model.safetensors"),
        load_file(tmp_path / "adapter" / "adapter_model.safetensors"),
    )
    assert ours.keys() == peft_saved.keys() and all(torch.equal(ours[k], peft_saved[k]) for k in ours)
    assert json.loads((tmp_path / "split" / "adapter_config.json").read_text())["peft_type"] == "FOURIERFT"
    assert (logits(peft_load(factory, tmp_path / "split")) - want).abs().max().item() <= TOL
    lc.convert(tmp_path / "adapter", "unmerged", base=tmp_path / "base", output=tmp_path / "attached")
    attached = load_file(tmp_path / "attached" / "model.safetensors")
    sd = {k: v.detach() for k, v in pm.state_dict().items() if k != "base_model.model.lm_head.weight"}  # tied
    assert attached.keys() == sd.keys() and all(torch.equal(attached[k], sd[k]) for k in sd)
    lc.convert(tmp_path / "attached", "base", output=tmp_path / "stripped")
    stripped, base = (
        load_file(tmp_path / "stripped" / "model.safetensors"),
        load_file(tmp_path / "base" / "model.safetensors"),
    )
    assert stripped.keys() == base.keys() and all(torch.equal(stripped[k], base[k]) for k in base)


def _edit(src: Path, dst: Path, edit, config=None) -> Path:
    dst.mkdir()
    t = load_file(src / "adapter_model.safetensors")
    edit(t)
    save_file(t, str(dst / "adapter_model.safetensors"))
    data = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**data, **(config or {})}))
    return dst


BAD = {  # q_proj takes n_frequency 20
    "length": (lambda t: t.update({f"{Q}.fourierft_spectrum": torch.ones(21)}), None, "n_frequency for it is 20"),
    "2d": (lambda t: t.update({f"{Q}.fourierft_spectrum": torch.ones(4, 5)}), None, "1-D floating-point"),
    "pattern": (lambda t: None, {"n_frequency_pattern": {"q_proj": 21, "down_proj": 30}}, "n_frequency for it is 21"),
    "nan": (lambda t: t[f"{Q}.fourierft_spectrum"].fill_(float("nan")), None, "NaN"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_error_naming_file_and_tensor(tmp_path: Path, case: str) -> None:
    _case(tmp_path)
    edit, config, needle = BAD[case]
    bad = _edit(tmp_path / "adapter", tmp_path / "bad", edit, config)
    before = (bad / "adapter_model.safetensors").read_bytes()
    out = tmp_path / "o"
    line = one_error(cli("convert", bad, "--to", "merged", "--base", tmp_path / "base", "-o", out), needle, out=out)
    assert str(bad) in line and f"{Q}.fourierft_spectrum" in line
    assert (bad / "adapter_model.safetensors").read_bytes() == before


def test_more_frequencies_than_entries_and_bad_config(tmp_path: Path) -> None:
    _case(tmp_path)
    big = _edit(
        tmp_path / "adapter",
        tmp_path / "big",
        lambda t: t.update({f"{Q}.fourierft_spectrum": torch.ones(1025)}),
        {"n_frequency_pattern": {"q_proj": 1025, "down_proj": 30}},
    )
    one_error(
        cli("convert", big, "--to", "merged", "--base", tmp_path / "base", "-o", tmp_path / "o"),
        "more than the (32, 32) weight's entries",
        f"{Q}.fourierft_spectrum",
        out=tmp_path / "o",
    )
    bad = _edit(tmp_path / "adapter", tmp_path / "seed", lambda t: None, {"random_loc_seed": "x"})
    one_error(cli("detect", bad), "random_loc_seed is 'x'", str(bad / "adapter_config.json"))
    one_error(
        cli("combine", tmp_path / "adapter", tmp_path / "adapter", "--method", "cat", "-o", tmp_path / "c"),
        "FourierFT module(s)",
        "combining does not take them",
        out=tmp_path / "c",
    )
    out = tmp_path / "o.gguf"
    one_error(
        cli("convert", tmp_path / "adapter", "--to", "gguf", "--base", tmp_path / "base", "-o", out),
        "does not take them",
        out=out,
    )
