"""PEFT's VB-LoRA (A and B assembled from a shared vector bank by each sub-vector's top-k logits, ΔW = B·A) end to
end against PEFT itself: detect and report count PEFT's trainable parameters (the bank once), merges (adapter +
base, unmerged -> merged) give PEFT's ``merge_and_unload`` logits on Llama, Qwen2 and GPT-2 (Conv1D), with full
logits and with ``save_only_topk_weights`` files; verify knows ΔW; strip / split / attach give PEFT's own
tensors (PeftModel loads the split); bad input ends in one error line naming file and tensor."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import cli, one_error, peft_load
from peft import VBLoRAConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tiny import gpt2, llama, load_merged, logits, qwen2, save_unmerged

import lora_convert as lc

TOL = 1e-5
CASES = {  # factory, VBLoRAConfig kwargs
    "llama": (
        llama,
        dict(r=4, num_vectors=16, vector_length=8, topk=2, target_modules=["q_proj", "v_proj", "down_proj"]),
    ),
    "llama-topk": (
        llama,
        dict(r=2, num_vectors=12, vector_length=16, topk=3, target_modules=["k_proj", "up_proj"])
        | dict(save_only_topk_weights=True),
    ),
    "qwen2": (qwen2, dict(r=3, num_vectors=10, vector_length=8, topk=2, target_modules=["o_proj", "gate_proj"])),
    "gpt2": (
        gpt2,
        dict(r=2, num_vectors=8, vector_length=16, topk=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    ),
}
Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _case(tmp_path: Path, arch: str = "llama"):
    """The base saved, a VB-LoRA adapter saved by PEFT (logits and bank made large enough to move the logits),
    PEFT's model loaded from that file and its merged logits."""
    factory, kw = CASES[arch]
    base = factory()
    base.save_pretrained(str(tmp_path / "base"))
    torch.manual_seed(1)
    pm = get_peft_model(copy.deepcopy(base), VBLoRAConfig(init_logits_std=1.0, **kw)).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "vector_bank" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    pm.save_pretrained(str(tmp_path / "adapter"))
    ref = peft_load(factory, tmp_path / "adapter")  # a top-k file: PEFT's logits rebuilt from it
    return factory, pm, ref, logits(copy.deepcopy(ref).merge_and_unload()), logits(base)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_merge_equals_peft_merge_and_unload(tmp_path: Path, arch: str) -> None:
    _, pm, ref, want, before = _case(tmp_path, arch)
    assert (want - before).abs().max().item() > 1e-2  # the adapter does something
    kw = CASES[arch][1]
    d = lc.detect(tmp_path / "adapter")
    (a,) = d.adapters
    assert a.tuner == {
        "peft_type": "VBLORA",
        **{k: kw[k] for k in ("r", "topk", "num_vectors", "vector_length")},
        "save_only_topk_weights": kw.get("save_only_topk_weights", False),
    }
    assert a.lora_parameters == pm.get_nb_trainable_parameters()[0]  # the bank counted once
    row = lc.report(tmp_path / "adapter", base=tmp_path / "base").row("adapter")
    assert (row.lora_parameters, row.total_parameters) == pm.get_nb_trainable_parameters()
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    assert (logits(load_merged(tmp_path / "merged")) - want).abs().max().item() <= TOL
    assert lc.verify(tmp_path / "merged", base=tmp_path / "base", adapter=tmp_path / "adapter").ok
    assert not lc.verify(tmp_path / "base", base=tmp_path / "base", adapter=tmp_path / "adapter").ok
    save_unmerged(pm, tmp_path / "unmerged")  # the trained model's own logits
    lc.convert(tmp_path / "unmerged", "merged", output=tmp_path / "merged2")
    unmerged_want = logits(copy.deepcopy(pm).merge_and_unload())
    assert (logits(load_merged(tmp_path / "merged2")) - unmerged_want).abs().max().item() <= TOL


@pytest.mark.parametrize("arch", ["llama", "llama-topk", "gpt2"])
def test_split_attach_strip_round_trip_as_peft_lays_it_out(tmp_path: Path, arch: str) -> None:
    factory, pm, ref, want, _ = _case(tmp_path, arch)
    save_unmerged(pm, tmp_path / "unmerged")
    lc.convert(tmp_path / "unmerged", "adapter", output=tmp_path / "split")  # top-k taken as PEFT's save takes it
    ours, peft_saved = (
        load_file(tmp_path / "split" / "adapter_model.safetensors"),
        load_file(tmp_path / "adapter" / "adapter_model.safetensors"),
    )
    assert ours.keys() == peft_saved.keys() and all(torch.equal(ours[k], peft_saved[k]) for k in ours)
    assert all(ours[k].dtype == peft_saved[k].dtype for k in ours)
    assert json.loads((tmp_path / "split" / "adapter_config.json").read_text())["peft_type"] == "VBLORA"
    assert (logits(peft_load(factory, tmp_path / "split")) - want).abs().max().item() <= TOL
    lc.convert(tmp_path / "adapter", "unmerged", base=tmp_path / "base", output=tmp_path / "attached")
    attached = load_file(tmp_path / "attached" / "model.safetensors")
    tied = "base_model.model.lm_head.weight" if arch == "gpt2" else None
    sd = {k: v.detach() for k, v in ref.state_dict().items() if k != tied}  # PEFT's model loaded from the file
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


K = "base_model.model.model.layers.0.self_attn.k_proj"  # llama-topk: k_proj is 16×32, r=2, L=16, V=12, k=3
BAD = {
    "llama": {
        "no-bank": (
            lambda t: t.pop("base_model.vblora_vector_bank"),
            "vblora_vector_bank (the bank every layer's vectors come from) is missing",
            ".vblora_logits_",
        ),
        "no-B": (lambda t: t.pop(f"{Q}.vblora_logits_B"), "vblora_logits_B is missing", f"{Q}.vblora_logits_A"),
        "ranks": (
            lambda t: t.update({f"{Q}.vblora_logits_B": torch.zeros(4, 3, 16)}),
            "rank 4, the B logits 3",
            f"{Q}.vblora_logits_A",
        ),
        "bank-width": (
            lambda t: t.update({f"{Q}.vblora_logits_A": torch.zeros(4, 4, 15)}),
            "a bank of 16 vectors",
            f"{Q}.vblora_logits_A",
        ),
        "wider-than-base": (
            lambda t: t.update({f"{Q}.vblora_logits_A": torch.zeros(4, 5, 16)}),
            "(32, 40) ΔW, the base weight is [32, 32]",
            f"{Q}.vblora_logits_A",
        ),
        "nan-bank": (
            lambda t: t["base_model.vblora_vector_bank"].fill_(float("nan")),
            "NaN",
            "base_model.vblora_vector_bank",
        ),
    },
    "llama-topk": {
        "index-range": (
            lambda t: t[f"{K}.vblora_logits_A_topk_indices"].fill_(12),
            "out of range for a bank of 12",
            f"{K}.vblora_logits_A_topk_indices",
        ),
        "weights-shape": (
            lambda t: t.update({f"{K}.vblora_logits_A_topk_weights": torch.zeros(2, 2, 3)}),
            "PEFT's is [2, 2, 2]",
            f"{K}.vblora_logits_A_topk_weights",
        ),
        "float-indices": (
            lambda t: t.update({f"{K}.vblora_logits_B_topk_indices": torch.zeros(1, 2, 3)}),
            "an integer 3-D tensor",
            f"{K}.vblora_logits_B_topk_indices",
        ),
    },
}


@pytest.mark.parametrize("arch,case", [(a, c) for a, cases in BAD.items() for c in sorted(cases)])
def test_bad_input_one_error_naming_file_and_tensor(tmp_path: Path, arch: str, case: str) -> None:
    _case(tmp_path, arch)
    edit, needle, tensor = BAD[arch][case]
    bad = _edit(tmp_path / "adapter", tmp_path / "bad", edit)
    before = (bad / "adapter_model.safetensors").read_bytes()
    out = tmp_path / "o"
    line = one_error(cli("convert", bad, "--to", "merged", "--base", tmp_path / "base", "-o", out), needle, out=out)
    assert str(bad) in line and tensor in line
    assert (bad / "adapter_model.safetensors").read_bytes() == before


def test_bad_config_and_lora_only_routes(tmp_path: Path) -> None:
    _case(tmp_path)
    bad = _edit(tmp_path / "adapter", tmp_path / "topk", lambda t: None, {"topk": 0})
    one_error(cli("detect", bad), "topk is 0", str(bad / "adapter_config.json"))
    one_error(
        cli("combine", tmp_path / "adapter", tmp_path / "adapter", "--method", "cat", "-o", tmp_path / "c"),
        "VB-LoRA module(s)",
        "combining does not take them",
        out=tmp_path / "c",
    )
    for to in ("kohya", "mlx"):
        out = tmp_path / f"o-{to}"
        one_error(
            cli("convert", tmp_path / "adapter", "--to", to, "--base", tmp_path / "base", "-o", out),
            "does not take them",
            out=out,
        )
