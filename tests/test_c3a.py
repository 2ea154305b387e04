"""PEFT's C3A (ΔW block-circulant: block (m, n) the circulant matrix of c3a_kernel[m, n], divided by the input
size) end to end against PEFT itself: detect and report count PEFT's trainable parameters, merges (adapter + base,
unmerged -> merged) give PEFT's ``merge_and_unload`` logits, verify knows ΔW (and accepts PEFT's own FFT-made
merge), strip / split / attach give PEFT's own tensors (PeftModel loads the split), bad input ends in one error
line naming file and tensor, GPT-2's Conv1D is refused as PEFT refuses it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import cli, one_error, peft_load
from peft import C3AConfig, get_peft_model
from peft.tuners.c3a.utils import get_circulant_fast
from safetensors.torch import load_file, save_file
from tiny import gpt2, llama, load_merged, logits, qwen2, save_unmerged

import lora_convert as lc
from lora_convert.additive_math import CirculantDelta

TOL = 1e-5
FACTORIES = {"llama": llama, "qwen2": qwen2}
Q = "base_model.model.model.layers.0.self_attn.q_proj"


def test_rows_equal_peft_circulant() -> None:
    """Block rows of ΔW from the kernel, entry by entry, equal PEFT's FFT-built matrix within fp32 rounding."""
    torch.manual_seed(0)
    w = torch.randn(3, 5, 8)
    want = get_circulant_fast(w) / 40
    d = CirculantDelta(w, 1 / 40)
    got = torch.cat([d.rows(0, 7), d.rows(7, 24)])
    assert got.shape == want.shape == (24, 40)
    assert (got - want).abs().max().item() <= 1e-6


def _case(tmp_path: Path, arch: str = "llama"):
    base = FACTORIES[arch]()
    base.save_pretrained(str(tmp_path / "base"))
    torch.manual_seed(1)
    cfg = C3AConfig(
        block_size=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_weights="gaussian",
        block_size_pattern={"down_proj": 16},
    )
    pm = get_peft_model(copy.deepcopy(base), cfg).eval()
    pm.save_pretrained(str(tmp_path / "adapter"))
    return pm, logits(copy.deepcopy(pm).merge_and_unload()), logits(base)


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_merge_equals_peft_merge_and_unload(tmp_path: Path, arch: str) -> None:
    pm, want, before = _case(tmp_path, arch)
    assert (want - before).abs().max().item() > 1e-2
    (a,) = lc.detect(tmp_path / "adapter").adapters
    assert a.tuner == {"peft_type": "C3A", "block_size": 8, "block_size_pattern": {"down_proj": 16}}
    assert a.lora_parameters == pm.get_nb_trainable_parameters()[0]
    row = lc.report(tmp_path / "adapter", base=tmp_path / "base").row("adapter")
    assert (row.lora_parameters, row.total_parameters) == pm.get_nb_trainable_parameters()
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    assert (logits(load_merged(tmp_path / "merged")) - want).abs().max().item() <= TOL
    assert lc.verify(tmp_path / "merged", base=tmp_path / "base", adapter=tmp_path / "adapter").ok
    assert not lc.verify(tmp_path / "base", base=tmp_path / "base", adapter=tmp_path / "adapter").ok
    save_unmerged(pm, tmp_path / "unmerged")
    lc.convert(tmp_path / "unmerged", "merged", output=tmp_path / "merged2")
    assert (logits(load_merged(tmp_path / "merged2")) - want).abs().max().item() <= TOL
    # PEFT's own merge (its FFTs) passes verify too
    copy.deepcopy(pm).merge_and_unload().save_pretrained(str(tmp_path / "peft-merged"))
    assert lc.verify(tmp_path / "peft-merged", base=tmp_path / "base", adapter=tmp_path / "adapter").ok


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


BAD = {  # q_proj is 32×32 at block 8: a (4, 4, 8) kernel
    "wider": (torch.ones(4, 5, 8), "(32, 40) ΔW, the base weight is [32, 32]"),
    "2d": (torch.ones(4, 32), "PEFT's is 3-D floating-point"),
    "nan": (torch.full((4, 4, 8), float("nan")), "NaN"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_error_naming_file_and_tensor(tmp_path: Path, case: str) -> None:
    _case(tmp_path)
    value, needle = BAD[case]
    bad = tmp_path / "bad"
    bad.mkdir()
    t = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    t[f"{Q}.c3a_kernel"] = value
    save_file(t, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text((tmp_path / "adapter" / "adapter_config.json").read_text())
    out = tmp_path / "o"
    line = one_error(cli("convert", bad, "--to", "merged", "--base", tmp_path / "base", "-o", out), needle, out=out)
    assert str(bad) in line and f"{Q}.c3a_kernel" in line


def test_gpt2_conv1d_and_lora_only_routes_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="not supported"):  # PEFT builds C3A on nn.Linear only
        get_peft_model(gpt2(), C3AConfig(block_size=8, target_modules=["c_attn"]))
    gpt2().save_pretrained(str(tmp_path / "gpt2"))
    (tmp_path / "g").mkdir()
    m = "base_model.model.transformer.h.0.attn.c_attn"
    save_file({f"{m}.c3a_kernel": torch.ones(12, 4, 8)}, str(tmp_path / "g" / "adapter_model.safetensors"))
    (tmp_path / "g" / "adapter_config.json").write_text(json.dumps({"peft_type": "C3A", "block_size": 8}))
    one_error(
        cli("convert", tmp_path / "g", "--to", "merged", "--base", tmp_path / "gpt2", "-o", tmp_path / "o"),
        "Conv1D",
        f"{m}.c3a_kernel",
        out=tmp_path / "o",
    )
    _case(tmp_path)
    out = tmp_path / "o-kohya"
    one_error(
        cli("convert", tmp_path / "adapter", "--to", "kohya", "--base", tmp_path / "base", "-o", out),
        "does not take them",
        out=out,
    )
