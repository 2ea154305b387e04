"""PEFT's RoAd (output rows rotated and scaled in pairs: row j of each group with row j + group_size/2, W ← R·W and
b ← R·b) end to end against PEFT itself: detect and report count PEFT's trainable parameters, merges (adapter +
base, unmerged -> merged) give PEFT's ``merge_and_unload`` logits for road_1/2/4 (Qwen2's biased projections
rotated too), verify knows the merged weight (ours and PEFT's), strip / split / attach give PEFT's own tensors
(PeftModel loads the split), bad input ends in one error line naming file and tensor, GPT-2's Conv1D is refused
as PEFT refuses it, and no unmerge is offered."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import cli, one_error, peft_load
from peft import RoadConfig, get_peft_model
from peft.tuners.road.layer import _get_delta_weight
from safetensors.torch import load_file, save_file
from tiny import gpt2, llama, load_merged, logits, qwen2, save_unmerged

import lora_convert as lc
from lora_convert.oft_math import RoadRotation, road_columns

TOL = 1e-5
FACTORIES = {"llama": llama, "qwen2": qwen2}
Q = "base_model.model.model.layers.0.self_attn.q_proj"
SIZES = {"road_1": 8, "road_2": 16, "road_4": 32}  # θ's length for 16 output rows


@pytest.mark.parametrize("variant", sorted(SIZES))
def test_rows_equal_peft_rotation(variant: str) -> None:
    """Whole groups of rows rotated in place equal PEFT's dense R @ W (one group, then the rest)."""
    torch.manual_seed(0)
    theta, alpha, w = torch.randn(SIZES[variant]), torch.randn(SIZES[variant]), torch.randn(16, 5)
    want = _get_delta_weight(variant, 8, theta, alpha) @ w
    rot = RoadRotation(*road_columns(variant, 8, theta, alpha), 8)
    got = torch.cat([rot.rotate_(w[:8].clone(), 0), rot.rotate_(w[8:].clone(), 8)])
    assert (got - want).abs().max().item() <= 1e-6


def _case(tmp_path: Path, arch: str = "llama", variant: str = "road_1"):
    base = FACTORIES[arch]()
    torch.manual_seed(1)
    with torch.no_grad():  # Qwen2's q/k/v biases (zeros in the tiny model) made to count
        for n, p in base.named_parameters():
            if n.endswith(".bias"):
                p.normal_()
    base.save_pretrained(str(tmp_path / "base"))
    cfg = RoadConfig(
        variant=variant, group_size=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False
    )
    pm = get_peft_model(copy.deepcopy(base), cfg).eval()
    pm.save_pretrained(str(tmp_path / "adapter"))
    return pm, logits(copy.deepcopy(pm).merge_and_unload()), logits(base)


@pytest.mark.parametrize("variant", sorted(SIZES))
@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_merge_equals_peft_merge_and_unload(tmp_path: Path, arch: str, variant: str) -> None:
    pm, want, before = _case(tmp_path, arch, variant)
    assert (want - before).abs().max().item() > 1e-2
    (a,) = lc.detect(tmp_path / "adapter").adapters
    assert a.tuner == {"peft_type": "ROAD", "variant": variant, "group_size": 8}
    assert a.lora_parameters == pm.get_nb_trainable_parameters()[0]
    row = lc.report(tmp_path / "adapter", base=tmp_path / "base").row("adapter")
    assert (row.lora_parameters, row.total_parameters) == pm.get_nb_trainable_parameters()
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    assert (logits(load_merged(tmp_path / "merged")) - want).abs().max().item() <= TOL
    if arch == "qwen2":  # the biased projections: PEFT rotates the bias too
        got = load_file(tmp_path / "merged" / "model.safetensors")["model.layers.0.self_attn.q_proj.bias"]
        peft_b = copy.deepcopy(pm).merge_and_unload().state_dict()["model.layers.0.self_attn.q_proj.bias"]
        assert (got - peft_b).abs().max().item() <= 1e-6
        assert not torch.equal(
            got, load_file(tmp_path / "base" / "model.safetensors")["model.layers.0.self_attn.q_proj.bias"]
        )
    assert lc.verify(tmp_path / "merged", base=tmp_path / "base", adapter=tmp_path / "adapter").ok
    assert not lc.verify(tmp_path / "base", base=tmp_path / "base", adapter=tmp_path / "adapter").ok
    copy.deepcopy(pm).merge_and_unload().save_pretrained(str(tmp_path / "peft-merged"))
    assert lc.verify(tmp_path / "peft-merged", base=tmp_path / "base", adapter=tmp_path / "adapter").ok
    save_unmerged(pm, tmp_path / "unmerged")
    lc.convert(tmp_path / "unmerged", "merged", output=tmp_path / "merged2")
    assert (logits(load_merged(tmp_path / "merged2")) - want).abs().max().item() <= TOL


def test_split_attach_strip_round_trip_as_peft_lays_it_out(tmp_path: Path) -> None:
    pm, want, _ = _case(tmp_path, variant="road_4")
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


BAD = {  # q_proj has 32 output rows: road_1 θ and α have 16 numbers
    "rows": ({"road_theta": torch.ones(20), "road_alpha": torch.ones(20)}, "road_theta", "is for 40 output rows"),
    "lengths": ({"road_alpha": torch.ones(12)}, "road_alpha", "road_theta has 16 numbers and road_alpha 12"),
    "2d": ({"road_theta": torch.ones(4, 4)}, "road_theta", "1-D floating-point"),
    "missing": ({"road_alpha": None}, "road_theta", "road_alpha is missing"),
    "nan": ({"road_alpha": torch.full((16,), float("nan"))}, "road_alpha", "NaN"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_error_naming_file_and_tensor(tmp_path: Path, case: str) -> None:
    _case(tmp_path)
    edits, tensor, needle = BAD[case]
    bad = tmp_path / "bad"
    bad.mkdir()
    t = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for k, v in edits.items():
        if v is None:
            t.pop(f"{Q}.{k}")
        else:
            t[f"{Q}.{k}"] = v
    save_file(t, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text((tmp_path / "adapter" / "adapter_config.json").read_text())
    before = (bad / "adapter_model.safetensors").read_bytes()
    out = tmp_path / "o"
    line = one_error(cli("convert", bad, "--to", "merged", "--base", tmp_path / "base", "-o", out), needle, out=out)
    assert str(bad) in line and f"{Q}.{tensor}" in line
    assert (bad / "adapter_model.safetensors").read_bytes() == before


def test_bad_config_gpt2_conv1d_unmerge_and_lora_only_routes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not supported"):  # PEFT builds RoAd on nn.Linear only
        get_peft_model(gpt2(), RoadConfig(group_size=8, target_modules=["c_attn"]))
    gpt2().save_pretrained(str(tmp_path / "gpt2"))
    (tmp_path / "g").mkdir()
    m = "base_model.model.transformer.h.0.attn.c_attn"
    save_file(
        {f"{m}.road_theta": torch.ones(48), f"{m}.road_alpha": torch.ones(48)},
        str(tmp_path / "g" / "adapter_model.safetensors"),
    )
    (tmp_path / "g" / "adapter_config.json").write_text(json.dumps({"peft_type": "ROAD", "group_size": 8}))
    one_error(
        cli("convert", tmp_path / "g", "--to", "merged", "--base", tmp_path / "gpt2", "-o", tmp_path / "o"),
        "Conv1D",
        f"{m}.road_theta",
        out=tmp_path / "o",
    )
    _case(tmp_path)
    data = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**data, "group_size": 3}))
    one_error(cli("detect", tmp_path / "adapter"), "group_size is 3")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**data, "group_size": 64}))
    out = tmp_path / "o64"  # 32 output rows are no whole groups of 64: PEFT refuses the layer
    one_error(
        cli("convert", tmp_path / "adapter", "--to", "merged", "--base", tmp_path / "base", "-o", out),
        "group_size",
        out=out,
    )
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(data))
    out = tmp_path / "weighted"  # R·W has no weight (PEFT's RoAd has no scale)
    res = cli("merge", tmp_path / "base", "--adapter", f"{tmp_path / 'adapter'}:0.5", "-o", out)
    one_error(res, "RoAd rotates this weight's output rows", out=out)
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    for to, out in (("kohya", tmp_path / "o-kohya"), ("gguf", tmp_path / "o.gguf"), ("base", tmp_path / "back")):
        args = ("--adapter", tmp_path / "adapter") if to == "base" else ("--base", tmp_path / "base")
        src = tmp_path / ("merged" if to == "base" else "adapter")
        one_error(cli("convert", src, "--to", to, *args, "-o", out), "does not take them", out=out)
