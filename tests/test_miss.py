"""PEFT's MiSS (a shared block ``miss_block`` tiled over W and added; its ``mini`` variant a narrower block
repeated; its ``bat`` variant W's r×r blocks times (I + B_i) plus B_i) end to end against PEFT itself: detect and
report count PEFT's trainable parameters, merges (adapter + base, unmerged -> merged) give PEFT's
``merge_and_unload`` logits, verify knows the merged weight, strip / split / attach give PEFT's own tensors
(PeftModel loads the split), bad input ends in one error line naming file and tensor, GPT-2's Conv1D is refused
as PEFT refuses it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import cli, one_error, peft_load
from peft import MissConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tiny import gpt2, llama, load_merged, logits, qwen2, save_unmerged

import lora_convert as lc
from lora_convert.additive_math import BatBlocks, TiledDelta

TOL = 1e-5
FACTORIES = {"llama": llama, "qwen2": qwen2}
VARIANTS = {"miss": True, "mini": "mini", "bat": "bat"}
Q = "base_model.model.model.layers.0.self_attn.q_proj"


def test_rows_equal_peft_delta() -> None:
    """Row blocks of the tiled ΔW and of bat's rewritten W equal PEFT's own layer math (a remainder of in mod r too)."""
    from peft.tuners.miss.layer import MissLinear

    torch.manual_seed(0)
    for init, shape in ((True, (3, 24)), ("mini", (3, 8)), ("bat", (8, 4, 4))):
        lin = torch.nn.Linear(22 if init is True else 24, 32 if init == "bat" else 24)
        cfg = MissConfig(r=shape[-1] if init == "bat" else shape[0], mini_r=8, init_weights=init)
        layer = MissLinear(lin, "default", cfg, r=cfg.r)
        layer.miss_block["default"].data = torch.randn(shape)
        w = lin.weight.detach().clone()
        merged = copy.deepcopy(layer)
        merged.merge()
        want = merged.get_base_layer().weight.detach()
        if init == "bat":
            got = BatBlocks(layer.miss_block["default"].detach()).rotate_(w.clone()[5:], 5)
            assert (got - want[5:]).abs().max().item() <= 1e-6
        else:
            d = TiledDelta(layer.miss_block["default"].detach(), *w.shape)
            got = torch.cat([d.rows(0, 5), d.rows(5, w.shape[0])]) + w
            assert torch.equal(got, want)


def _case(tmp_path: Path, arch: str = "llama", variant: str = "miss"):
    base = FACTORIES[arch]()
    base.save_pretrained(str(tmp_path / "base"))
    torch.manual_seed(1)
    cfg = MissConfig(r=4, mini_r=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=VARIANTS[variant])
    pm = get_peft_model(copy.deepcopy(base), cfg).eval()
    for n, p in pm.named_parameters():
        if "miss_block" in n:
            p.data.normal_(0, 0.1)
    pm.save_pretrained(str(tmp_path / "adapter"))
    return pm, logits(copy.deepcopy(pm).merge_and_unload()), logits(base)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_merge_equals_peft_merge_and_unload(tmp_path: Path, arch: str, variant: str) -> None:
    pm, want, before = _case(tmp_path, arch, variant)
    assert (want - before).abs().max().item() > 1e-2
    (a,) = lc.detect(tmp_path / "adapter").adapters
    assert a.tuner == {"peft_type": "MISS", "r": 4, "init_weights": VARIANTS[variant], "mini_r": 8}
    assert a.lora_parameters == pm.get_nb_trainable_parameters()[0]
    row = lc.report(tmp_path / "adapter", base=tmp_path / "base").row("adapter")
    assert (row.lora_parameters, row.total_parameters) == pm.get_nb_trainable_parameters()
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    assert (logits(load_merged(tmp_path / "merged")) - want).abs().max().item() <= TOL
    assert lc.verify(tmp_path / "merged", base=tmp_path / "base", adapter=tmp_path / "adapter").ok
    assert not lc.verify(tmp_path / "base", base=tmp_path / "base", adapter=tmp_path / "adapter").ok
    copy.deepcopy(pm).merge_and_unload().save_pretrained(str(tmp_path / "peft-merged"))
    assert lc.verify(tmp_path / "peft-merged", base=tmp_path / "base", adapter=tmp_path / "adapter").ok
    save_unmerged(pm, tmp_path / "unmerged")
    lc.convert(tmp_path / "unmerged", "merged", output=tmp_path / "merged2")
    assert (logits(load_merged(tmp_path / "merged2")) - want).abs().max().item() <= TOL
    back = tmp_path / "back"
    res = cli("convert", tmp_path / "merged", "--to", "base", "--adapter", tmp_path / "adapter", "-o", back)
    if variant == "bat":  # a product: no unmerge
        one_error(res, "MiSS bat multiplies this weight", "no inverse", out=back)
    else:
        assert res.exit_code == 0, res.output
        got, base = load_file(back / "model.safetensors"), load_file(tmp_path / "base" / "model.safetensors")
        assert got.keys() == base.keys() and max((got[k] - base[k]).abs().max().item() for k in base) <= 1e-6


@pytest.mark.parametrize("variant", ["miss", "bat"])
def test_split_attach_strip_round_trip_as_peft_lays_it_out(tmp_path: Path, variant: str) -> None:
    pm, want, _ = _case(tmp_path, variant=variant)
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


BAD = {  # q_proj is 32×32 at r=4
    "miss-wide": ("miss", torch.ones(4, 40), "is for 40 outputs"),
    "miss-rank": ("miss", torch.ones(3, 32), "(r, out) with r=4"),
    "miss-nan": ("miss", torch.full((4, 32), float("nan")), "NaN"),
    "mini-shape": ("mini", torch.ones(4, 6), "(r, mini_r) = (4, 8)"),
    "bat-blocks": ("bat", torch.ones(6, 4, 4), "is for 24 outputs"),
    "bat-2d": ("bat", torch.ones(4, 32), "(out/r, r, r)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_error_naming_file_and_tensor(tmp_path: Path, case: str) -> None:
    variant, value, needle = BAD[case]
    _case(tmp_path, variant=variant)
    bad = tmp_path / "bad"
    bad.mkdir()
    t = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    t[f"{Q}.miss_block"] = value
    save_file(t, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text((tmp_path / "adapter" / "adapter_config.json").read_text())
    before = (bad / "adapter_model.safetensors").read_bytes()
    out = tmp_path / "o"
    line = one_error(cli("convert", bad, "--to", "merged", "--base", tmp_path / "base", "-o", out), needle, out=out)
    assert str(bad) in line and f"{Q}.miss_block" in line
    assert (bad / "adapter_model.safetensors").read_bytes() == before


def test_bad_config_gpt2_conv1d_and_lora_only_routes(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="not supported"):  # PEFT builds MiSS on nn.Linear only
        get_peft_model(gpt2(), MissConfig(r=4, target_modules=["c_attn"]))
    gpt2().save_pretrained(str(tmp_path / "gpt2"))
    (tmp_path / "g").mkdir()
    m = "base_model.model.transformer.h.0.attn.c_attn"
    save_file({f"{m}.miss_block": torch.ones(4, 96)}, str(tmp_path / "g" / "adapter_model.safetensors"))
    (tmp_path / "g" / "adapter_config.json").write_text(json.dumps({"peft_type": "MISS", "r": 4}))
    one_error(
        cli("convert", tmp_path / "g", "--to", "merged", "--base", tmp_path / "gpt2", "-o", tmp_path / "o"),
        "Conv1D",
        f"{m}.miss_block",
        out=tmp_path / "o",
    )
    _case(tmp_path)
    data = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**data, "init_weights": "half"}))
    one_error(cli("detect", tmp_path / "adapter"), "init_weights is 'half'")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(data))
    for to in ("kohya", "gguf"):
        out = tmp_path / ("o.gguf" if to == "gguf" else "o-kohya")
        one_error(
            cli("convert", tmp_path / "adapter", "--to", to, "--base", tmp_path / "base", "-o", out),
            "does not take them",
            out=out,
        )
