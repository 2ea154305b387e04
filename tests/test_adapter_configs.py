"""Which adapter_config.json describes which adapter: never merge an adapter with another one's scaling."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from peft import LoraConfig, PeftModel
from tiny import llama, load_merged, logits, peft_wrap, save_unmerged

import lora_convert as lc
from lora_convert.cli import main

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture
def two(tmp_path):
    """The issue's checkpoint: unmerged, adapters default (r=16, α=32) and second (r=4, α=4), and only
    default's adapter_config.json (what saving the state dict plus one config gives)."""
    base = llama()
    pm = peft_wrap(base, r=16, lora_alpha=32, target_modules=TARGETS)
    pm.add_adapter("second", LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    save_unmerged(pm, tmp_path / "u")
    assert json.loads((tmp_path / "u" / "adapter_config.json").read_text())["r"] == 16
    return pm, tmp_path


def test_second_adapter_without_its_config_is_refused(two):
    pm, tmp = two
    out = tmp / "m"
    r = CliRunner().invoke(main, ["merge", str(tmp / "u"), "--adapter", "second", "-o", str(out)])
    assert r.exit_code == 1, r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "adapter 'second' has no adapter_config.json of its own" in lines[0]
    assert "belongs to adapter 'default'" in lines[0]
    assert str(tmp / "u" / "second" / "adapter_config.json") in lines[0]  # where the missing config goes
    assert not out.exists()
    for to in ("adapter", "base"):  # every conversion of that adapter, not only merge
        with pytest.raises(lc.AdapterError, match="adapter 'second' has no adapter_config.json"):
            lc.convert(tmp / "u", to, adapter="second", output=tmp / to)
    # detect keeps working: it reports the problem and leaves second's alpha and scaling unknown
    d = lc.detect(tmp / "u")
    ads = {a.name: a for a in d.adapters}
    assert ads["second"].ranks == [4] and ads["second"].lora_alpha is None
    assert all(g.scalings == [] for g in ads["second"].modules)
    assert ads["default"].modules[0].scalings == [2.0]
    assert any("adapter 'second' has no adapter_config.json" in w for w in d.warnings)
    # the adapter whose config it is still merges exactly
    lc.merge(tmp / "u", adapter="default", output=tmp / "md")
    pm.set_adapter("default")
    assert (logits(load_merged(tmp / "md")) - logits(pm)).abs().max() < 1e-5


def test_second_adapter_with_its_config_in_its_subfolder_merges_exactly(two):
    pm, tmp = two
    pm.peft_config["second"].save_pretrained(str(tmp / "u" / "second"))  # PEFT's place for a named adapter's
    d = lc.detect(tmp / "u")
    assert d.warnings == []
    assert {a.name: a.modules[0].scalings for a in d.adapters} == {"default": [2.0], "second": [1.0]}
    lc.merge(tmp / "u", adapter="second", output=tmp / "m")
    pm.set_adapter("second")
    assert (logits(load_merged(tmp / "m")) - logits(pm)).abs().max() < 1e-5


def test_several_adapters_none_default_share_one_config(tmp_path):
    pm = peft_wrap(llama(), adapter_name="chat", r=8, lora_alpha=16, target_modules=TARGETS)
    pm.add_adapter("code", LoraConfig(r=8, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    save_unmerged(pm, tmp_path / "u")
    for name in ("chat", "code"):
        with pytest.raises(lc.AdapterError, match="belongs to one of chat, code and does not say which"):
            lc.merge(tmp_path / "u", adapter=name, output=tmp_path / name)


def test_rank_disagreement_is_refused_as_peft_refuses_it(tmp_path):
    base = llama()
    base.save_pretrained(str(tmp_path / "base"))
    peft_wrap(base, r=8, lora_alpha=16, target_modules=TARGETS).save_pretrained(str(tmp_path / "a"))
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rank_pattern"] = {"v_proj": 4}  # v_proj's tensors have rank 8
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="size mismatch"):  # the reference refuses the adapter
        PeftModel.from_pretrained(llama(), str(tmp_path / "a"))
    with pytest.raises(lc.AdapterError, match="config says r=4, the tensors have rank 8") as info:
        lc.merge(tmp_path / "a", base=tmp_path / "base", output=tmp_path / "m")
    assert info.value.path == str(cfg_path) and not (tmp_path / "m").exists()
    d = lc.detect(tmp_path / "a")  # detect reports it; the disagreeing modules' scaling is unknown
    groups = {g.name: g for g in d.adapters[0].modules}
    assert groups["v_proj"].scalings == [] and groups["q_proj"].scalings == [2.0]
    assert any("config says r=4, the tensors have rank 8" in w for w in d.warnings)
