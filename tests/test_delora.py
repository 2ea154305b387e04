"""PEFT's DeLoRA (ΔW = B·diag(λ/r/(‖Aᵢ‖‖Bⁱ‖))·A, times the base's column norms) end to end against PEFT itself:
detect and report count PEFT's trainable parameters, merges (adapter + base, unmerged -> merged) give PEFT's
``merge_and_unload`` logits, verify knows ΔW, strip / split / attach give PEFT's own tensors (PeftModel loads the
split), bad input ends in one error line naming file and tensor, GPT-2's Conv1D is refused as PEFT refuses it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import cli, one_error, peft_load
from peft import DeloraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tiny import gpt2, llama, load_merged, logits, qwen2, save_unmerged

import lora_convert as lc

TOL = 1e-5
FACTORIES = {"llama": llama, "qwen2": qwen2}
Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _case(tmp_path: Path, arch: str = "llama"):
    base = FACTORIES[arch]()
    base.save_pretrained(str(tmp_path / "base"))
    torch.manual_seed(1)
    cfg = DeloraConfig(
        r=4, delora_lambda=3, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False
    )  # init_weights False: B random, ΔW ≠ 0
    cfg.rank_pattern = {"v_proj": 2}
    pm = get_peft_model(copy.deepcopy(base), cfg).eval()
    pm.save_pretrained(str(tmp_path / "adapter"))
    return pm, logits(copy.deepcopy(pm).merge_and_unload()), logits(base)


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_merge_equals_peft_merge_and_unload(tmp_path: Path, arch: str) -> None:
    pm, want, before = _case(tmp_path, arch)
    assert (want - before).abs().max().item() > 1e-2
    (a,) = lc.detect(tmp_path / "adapter").adapters
    assert a.tuner == {"peft_type": "DELORA", "r": 4, "delora_lambda": 3, "rank_pattern": {"v_proj": 2}}
    assert a.lora_parameters == pm.get_nb_trainable_parameters()[0]  # A, B, λ (the column norms are a buffer)
    row = lc.report(tmp_path / "adapter", base=tmp_path / "base").row("adapter")
    assert (row.lora_parameters, row.total_parameters) == pm.get_nb_trainable_parameters()
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    assert (logits(load_merged(tmp_path / "merged")) - want).abs().max().item() <= TOL
    assert lc.verify(tmp_path / "merged", base=tmp_path / "base", adapter=tmp_path / "adapter").ok
    assert not lc.verify(tmp_path / "base", base=tmp_path / "base", adapter=tmp_path / "adapter").ok
    save_unmerged(pm, tmp_path / "unmerged")
    lc.convert(tmp_path / "unmerged", "merged", output=tmp_path / "merged2")
    assert (logits(load_merged(tmp_path / "merged2")) - want).abs().max().item() <= TOL


def test_split_attach_strip_round_trip_as_peft_lays_it_out(tmp_path: Path) -> None:
    pm, want, _ = _case(tmp_path)
    save_unmerged(pm, tmp_path / "unmerged")
    lc.convert(tmp_path / "unmerged", "adapter", output=tmp_path / "split")
    ours, peft_saved = (
        load_file(tmp_path / "split" / "adapter_model.safetensors"),
        load_file(tmp_path / "adapter" / "adapter_model.safetensors"),
    )
    assert ours.keys() == peft_saved.keys() and all(torch.equal(ours[k], peft_saved[k]) for k in ours)
    assert (logits(peft_load(llama, tmp_path / "split")) - want).abs().max().item() <= TOL
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


def _set(key: str, value: torch.Tensor):
    return lambda t: t.update({key: value})


BAD = {  # q_proj is 32×32 at r=4
    "no-norm": (lambda t: t.pop(f"{Q}.delora_w_norm"), "delora_w_norm is missing", f"{Q}.delora_A"),
    "ranks": (_set(f"{Q}.delora_B", torch.ones(32, 3)), "do not multiply", f"{Q}.delora_B"),
    "lambda": (_set(f"{Q}.delora_lambda", torch.ones(2)), "PEFT's is [1]", f"{Q}.delora_lambda"),
    "norm-length": (_set(f"{Q}.delora_w_norm", torch.ones(31)), "PEFT's is [32]", f"{Q}.delora_w_norm"),
    "wider": (
        lambda t: t.update({f"{Q}.delora_A": torch.ones(4, 40), f"{Q}.delora_w_norm": torch.ones(40)}),
        "the base weight is [32, 32]",
        f"{Q}.delora_A",
    ),
    "nan": (_set(f"{Q}.delora_lambda", torch.tensor([float("nan")])), "NaN", f"{Q}.delora_lambda"),
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


def test_gpt2_conv1d_and_lora_only_routes_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="not supported"):  # PEFT builds DeLoRA on nn.Linear only
        get_peft_model(gpt2(), DeloraConfig(r=2, target_modules=["c_attn"]))
    gpt2().save_pretrained(str(tmp_path / "gpt2"))
    (tmp_path / "g").mkdir()
    m = "base_model.model.transformer.h.0.attn.c_attn"
    t = {f"{m}.delora_A": torch.ones(2, 32), f"{m}.delora_B": torch.ones(96, 2)}
    t |= {f"{m}.delora_lambda": torch.ones(1), f"{m}.delora_w_norm": torch.ones(32)}
    save_file(t, str(tmp_path / "g" / "adapter_model.safetensors"))
    (tmp_path / "g" / "adapter_config.json").write_text(json.dumps({"peft_type": "DELORA", "r": 2}))
    one_error(
        cli("convert", tmp_path / "g", "--to", "merged", "--base", tmp_path / "gpt2", "-o", tmp_path / "o"),
        "Conv1D",
        f"{m}.delora_A",
        out=tmp_path / "o",
    )
    _case(tmp_path)
    out = tmp_path / "o.gguf"
    one_error(
        cli("convert", tmp_path / "adapter", "--to", "gguf", "--base", tmp_path / "base", "-o", out),
        "does not take them",
        out=out,
    )
