"""A folder where PEFT saved several adapters: detect lists every one, under the name --adapter takes."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from peft import LoraConfig
from tiny import llama, load_merged, logits, peft_wrap

import lora_convert as lc
from lora_convert.cli import main

EXPECTED = {  # name: (ranks, targets, scaling)
    "default": ([16], ["q_proj", "v_proj"], 2.0),
    "second": ([4], ["o_proj"], 1.0),
    "third": ([2], ["k_proj"], 2.0),
}


def _three(tmp_path):
    base = llama()
    base.save_pretrained(str(tmp_path / "base"))
    pm = peft_wrap(base, r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    pm.add_adapter("second", LoraConfig(r=4, lora_alpha=4, target_modules=["o_proj"], init_lora_weights=False))
    pm.add_adapter("third", LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"], init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "a"))  # default at the top, second/ and third/ beside it
    assert (tmp_path / "a" / "second" / "adapter_model.safetensors").is_file()
    return pm


def test_detect_lists_every_adapter_and_each_name_merges(tmp_path):
    pm = _three(tmp_path)
    r = CliRunner().invoke(main, ["detect", str(tmp_path / "a"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    got = {a["name"]: (a["ranks"], a["target_modules"], a["modules"][0]["scalings"][0]) for a in d["adapters"]}
    assert got == EXPECTED
    assert d["files"] == [
        "adapter_model.safetensors",
        "second/adapter_model.safetensors",
        "third/adapter_model.safetensors",
    ]
    r = CliRunner().invoke(main, ["detect", str(tmp_path / "a")])
    assert r.exit_code == 0 and all(f"adapter '{n}'" in r.stdout for n in EXPECTED), r.output
    for name in EXPECTED:  # each listed name is one --adapter takes, and merges that adapter
        assert [a.name for a in lc.detect(tmp_path / "a", adapter=name).adapters] == [name]
        lc.merge(tmp_path / "a", base=tmp_path / "base", adapter=name, output=tmp_path / f"m-{name}")
        pm.set_adapter(name)
        assert (logits(load_merged(tmp_path / f"m-{name}")) - logits(pm)).abs().max() < 1e-5, name


def test_folder_of_named_adapters_only(tmp_path):
    _three(tmp_path)
    only = tmp_path / "only"
    only.mkdir()
    for name in ("second", "third"):
        shutil.copytree(tmp_path / "a" / name, only / name)
    d = lc.detect(only)
    assert [a.name for a in d.adapters] == ["second", "third"]
    assert d.files == ["second/adapter_model.safetensors", "third/adapter_model.safetensors"]
    assert d.tensors == 8
    with pytest.raises(lc.CheckpointError, match="several named adapters: second, third"):  # conversions: choose
        lc.merge(only, base=tmp_path / "base", output=tmp_path / "m")
