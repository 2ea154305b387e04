"""PEFT's SHiRA (a sparse ΔW: trained values at fixed places) end to end against PEFT itself: detect and report
count PEFT's trainable parameters, merges (adapter + base, unmerged -> merged) give PEFT's ``merge_and_unload``
logits, verify knows ΔW, strip / split / attach give PEFT's own tensors (PeftModel loads the split), and bad
input (indices out of range or of the wrong shape, a missing or miscounted tensor, GPT-2's Conv1D that PEFT
refuses) ends in one error line naming file and tensor."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import cli, one_error, peft_load
from peft import ShiraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tiny import gpt2, llama, load_merged, logits, qwen2, save_unmerged

import lora_convert as lc

TOL = 1e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]
FACTORIES = {"llama": llama, "qwen2": qwen2}
Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _case(tmp_path: Path, arch: str = "llama", seed: int | None = 3):
    """The base saved, a SHiRA adapter with random values saved by PEFT, PEFT's merged logits and the base's."""
    base = FACTORIES[arch]()
    base.save_pretrained(str(tmp_path / "base"))
    torch.manual_seed(1)
    cfg = ShiraConfig(r=2, target_modules=TARGETS, init_weights=False, random_seed=seed)
    pm = get_peft_model(copy.deepcopy(base), cfg).eval()
    pm.save_pretrained(str(tmp_path / "adapter"))
    return pm, logits(copy.deepcopy(pm).merge_and_unload()), logits(base)


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_merge_equals_peft_merge_and_unload(tmp_path: Path, arch: str) -> None:
    pm, want, before = _case(tmp_path, arch)
    assert (want - before).abs().max().item() > 1e-2  # the adapter does something
    d = lc.detect(tmp_path / "adapter")
    (a,) = d.adapters
    assert a.tuner == {"peft_type": "SHIRA", "r": 2, "mask_type": "random", "random_seed": 3}
    assert a.lora_parameters == pm.get_nb_trainable_parameters()[0]
    assert not [w for w in d.warnings if "not plain LoRA" in w]
    row = lc.report(tmp_path / "adapter", base=tmp_path / "base").row("adapter")
    assert (row.lora_parameters, row.total_parameters) == pm.get_nb_trainable_parameters()
    assert row.merge_flops == 2 * a.lora_parameters  # a product and an add per stored value
    res = lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    assert res.ops.get("merge") == 2 * len(TARGETS)
    assert (logits(load_merged(tmp_path / "merged")) - want).abs().max().item() <= TOL
    assert lc.verify(tmp_path / "merged", base=tmp_path / "base", adapter=tmp_path / "adapter").ok
    assert not lc.verify(tmp_path / "base", base=tmp_path / "base", adapter=tmp_path / "adapter").ok
    lc.convert(tmp_path / "merged", "base", adapters=[str(tmp_path / "adapter")], output=tmp_path / "back")  # unmerge
    back, base = load_file(tmp_path / "back" / "model.safetensors"), load_file(tmp_path / "base" / "model.safetensors")
    assert back.keys() == base.keys() and max((back[k] - base[k]).abs().max().item() for k in base) <= 1e-6
    # unmerged -> merged: PEFT's in-model state dict holds no indices (a plain dict on the layer): the mask is
    # drawn from random_seed as PEFT's random_mask draws it
    save_unmerged(pm, tmp_path / "unmerged")
    assert not [k for k in load_file(tmp_path / "unmerged" / "model.safetensors") if "shira_indices" in k]
    lc.convert(tmp_path / "unmerged", "merged", output=tmp_path / "merged2")
    assert (logits(load_merged(tmp_path / "merged2")) - want).abs().max().item() <= TOL


def test_merged_tensors_rounded_once_and_seedless_mask(tmp_path: Path) -> None:
    """bf16 output: each merged weight is round(fp32(W) + ΔW); a config without random_seed draws PEFT's mask
    from a fresh generator, as PEFT does."""
    pm, want, _ = _case(tmp_path, seed=None)
    save_unmerged(pm, tmp_path / "unmerged")
    lc.convert(tmp_path / "unmerged", "merged", output=tmp_path / "merged")
    assert (logits(load_merged(tmp_path / "merged")) - want).abs().max().item() <= TOL
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "bf16", dtype="bf16")
    got = load_file(tmp_path / "bf16" / "model.safetensors")
    sd = copy.deepcopy(pm).merge_and_unload().state_dict()
    for k, v in got.items():
        assert torch.equal(v, sd[k].to(torch.bfloat16)), k  # fp32 W + ΔW (exact for PEFT too) rounded once


def test_split_attach_strip_round_trip_as_peft_lays_it_out(tmp_path: Path) -> None:
    pm, want, _ = _case(tmp_path)
    save_unmerged(pm, tmp_path / "unmerged")
    lc.convert(tmp_path / "unmerged", "adapter", output=tmp_path / "split")  # the indices drawn, as PEFT saves them
    ours, peft_saved = (
        load_file(tmp_path / "split" / "adapter_model.safetensors"),
        load_file(tmp_path / "adapter" / "adapter_model.safetensors"),
    )
    assert ours.keys() == peft_saved.keys() and all(torch.equal(ours[k], peft_saved[k]) for k in ours)
    assert ours[f"{Q}.shira_indices"].dtype == torch.int32
    cfg = json.loads((tmp_path / "split" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SHIRA" and "lora_alpha" not in cfg
    assert (logits(peft_load(llama, tmp_path / "split")) - want).abs().max().item() <= TOL  # PEFT loads it
    lc.convert(tmp_path / "adapter", "unmerged", base=tmp_path / "base", output=tmp_path / "attached")
    attached = load_file(tmp_path / "attached" / "model.safetensors")
    sd = {k: v.detach() for k, v in pm.state_dict().items()}
    indices = {k for k in attached if ".shira_indices." in k}  # beside PEFT's state dict: the mask is kept
    assert len(indices) == 2 * len(TARGETS) and attached.keys() - indices == sd.keys()
    assert all(torch.equal(attached[k], sd[k]) for k in sd)
    assert torch.equal(attached[f"{Q}.shira_indices.default"], peft_saved[f"{Q}.shira_indices"])
    lc.convert(tmp_path / "attached", "merged", output=tmp_path / "merged")
    assert (logits(load_merged(tmp_path / "merged")) - want).abs().max().item() <= TOL
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


def _set(key: str, value: torch.Tensor):
    return lambda t: t.update({key: value})


BAD = {  # q_proj is 32×32 at r=2: 128 values
    "out-of-range": (
        _set(f"{Q}.shira_indices", torch.full((2, 128), 32, dtype=torch.int32)),
        "out of range",
        "indices",
    ),
    "indices-shape": (_set(f"{Q}.shira_indices", torch.zeros(3, 128, dtype=torch.int32)), "[2, 128]", "indices"),
    "count": (_set(f"{Q}.shira_weight", torch.ones(100)), "r·(in+out) = 128", "shira_weight"),
    "no-indices": (lambda t: t.pop(f"{Q}.shira_indices"), "shira_indices is missing", "shira_weight"),
    "no-weight": (lambda t: t.pop(f"{Q}.shira_weight"), "shira_weight is missing", "shira_indices"),
    "weight-2d": (_set(f"{Q}.shira_weight", torch.ones(2, 64)), "1-D floating-point", "shira_weight"),
    "fractional": (_set(f"{Q}.shira_indices", torch.full((2, 128), 0.5)), "not whole numbers", "indices"),
    "nan": (_set(f"{Q}.shira_weight", torch.full((128,), float("nan"))), "NaN", "shira_weight"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_error_naming_file_and_tensor(tmp_path: Path, case: str) -> None:
    _case(tmp_path)
    edit, needle, tensor = BAD[case]
    bad = _edit(tmp_path / "adapter", tmp_path / "bad", edit)
    before = (bad / "adapter_model.safetensors").read_bytes()
    out = tmp_path / "o"
    line = one_error(cli("convert", bad, "--to", "merged", "--base", tmp_path / "base", "-o", out), needle, out=out)
    assert str(bad) in line and f"{Q}.shira_{tensor.removeprefix('shira_')}" in line
    assert (bad / "adapter_model.safetensors").read_bytes() == before


def test_bad_config_and_lora_only_routes(tmp_path: Path) -> None:
    _case(tmp_path)
    bad = _edit(tmp_path / "adapter", tmp_path / "r", lambda t: None, {"r": "two"})
    one_error(cli("detect", bad), "r is 'two'", str(bad / "adapter_config.json"))
    one_error(
        cli("combine", tmp_path / "adapter", tmp_path / "adapter", "--method", "cat", "-o", tmp_path / "c"),
        "SHiRA module(s)",
        "combining does not take them",
        out=tmp_path / "c",
    )
    for to in ("kohya", "gguf"):
        out = tmp_path / ("o.gguf" if to == "gguf" else "o-kohya")
        one_error(
            cli("convert", tmp_path / "adapter", "--to", to, "--base", tmp_path / "base", "-o", out),
            "does not take them",
            out=out,
        )
    (tmp_path / "noconf").mkdir()
    (tmp_path / "noconf" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    )
    one_error(cli("detect", tmp_path / "noconf"), "without an adapter_config.json saying peft_type SHIRA")


def test_gpt2_conv1d_peft_refuses_and_so_do_we(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="not supported"):  # PEFT builds SHiRA on nn.Linear only
        get_peft_model(gpt2(), ShiraConfig(r=1, target_modules=["c_attn"]))
    gpt2().save_pretrained(str(tmp_path / "base"))
    (tmp_path / "adapter").mkdir()
    m = "base_model.model.transformer.h.0.attn.c_attn"
    n = 1 * (32 + 96)
    idx = torch.stack([torch.arange(n) % 96, torch.arange(n) % 32]).to(torch.int32)
    save_file(
        {f"{m}.shira_weight": torch.ones(n), f"{m}.shira_indices": idx},
        str(tmp_path / "adapter" / "adapter_model.safetensors"),
    )
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "SHIRA", "r": 1, "target_modules": ["c_attn"], "fan_in_fan_out": True})
    )
    one_error(
        cli("convert", tmp_path / "adapter", "--to", "merged", "--base", tmp_path / "base", "-o", tmp_path / "o"),
        "Conv1D",
        f"{m}.shira_weight",
        out=tmp_path / "o",
    )
