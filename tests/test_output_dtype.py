"""--dtype changes config.json's dtype with the tensors: transformers' ``dtype="auto"`` loads what was asked for."""

from __future__ import annotations

import json

import pytest
import torch
from rounding import assert_rounded_once, peft_deltas, read_tensors
from tiny import llama, logits, peft_wrap, save_unmerged
from transformers import AutoModelForCausalLM

import lora_convert as lc
from lora_convert.folder import update_config
from lora_convert.routes.plan import dtype_config_changes

TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NAME = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _auto_dtypes(path) -> set[torch.dtype]:
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto")
    return {p.dtype for p in model.parameters()}


def _base(tmp_path, dtype: torch.dtype, key: str = "dtype"):
    base = llama(dtype=dtype)
    base.save_pretrained(str(tmp_path / "base"))
    cfg_path = tmp_path / "base" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["dtype"] == str(dtype).removeprefix("torch.")
    if key != "dtype":  # a config written by transformers < 4.56
        cfg[key] = cfg.pop("dtype")
        cfg_path.write_text(json.dumps(cfg))
    return base


@pytest.mark.parametrize(
    ("base_dtype", "out", "key"),
    [("fp32", "fp16", "dtype"), ("bf16", "fp32", "dtype"), ("bf16", "fp32", "torch_dtype"), ("fp16", "bf16", "dtype")],
)
def test_merge_dtype_loads_as_asked(tmp_path, base_dtype, out, key):
    base = _base(tmp_path, TORCH[base_dtype], key)
    pm = peft_wrap(base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    pm.save_pretrained(str(tmp_path / "a"))
    res = lc.merge(tmp_path / "a", base=tmp_path / "base", output=tmp_path / "m", dtype=out)
    assert res.config_changes == {key: NAME[out]}
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg[key] == NAME[out] and ({"dtype", "torch_dtype"} - {key}).isdisjoint(cfg)
    assert _auto_dtypes(tmp_path / "m") == {TORCH[out]}
    if out != "fp32":  # each tensor rounded once from the fp32 merge
        assert_rounded_once(tmp_path / "m", tmp_path / "base", peft_deltas(tmp_path / "a"), TORCH[out])


def test_merge_to_fp32_keeps_the_precision_of_the_fp32_merge(tmp_path):
    """The case of the issue: an fp32 output of a bf16 base used to load as bf16."""
    base = _base(tmp_path, torch.bfloat16)
    pm = peft_wrap(base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    pm.save_pretrained(str(tmp_path / "a"))
    lc.merge(tmp_path / "a", base=tmp_path / "base", output=tmp_path / "m", dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype="auto").eval()
    assert merged.dtype == torch.float32
    ref = logits(pm.float())  # PEFT's unmerged forward, in fp32
    assert (logits(merged) - ref).abs().max() < 1e-4


def test_auto_leaves_config_alone(tmp_path):
    base = _base(tmp_path, torch.bfloat16)
    peft_wrap(base, r=4, lora_alpha=8, target_modules=["q_proj"]).save_pretrained(str(tmp_path / "a"))
    res = lc.merge(tmp_path / "a", base=tmp_path / "base", output=tmp_path / "m")
    assert res.config_changes == {}
    assert (tmp_path / "m" / "config.json").read_bytes() == (tmp_path / "base" / "config.json").read_bytes()
    assert _auto_dtypes(tmp_path / "m") == {torch.bfloat16}


@pytest.mark.parametrize("to", ["base", "unmerged"])
def test_strip_and_attach_honour_dtype(tmp_path, to):
    base = _base(tmp_path, torch.float32)
    pm = peft_wrap(base, r=4, lora_alpha=8, target_modules=["q_proj"])
    if to == "base":
        save_unmerged(pm, tmp_path / "src")
        kw = {}
    else:
        pm.save_pretrained(str(tmp_path / "src"))
        kw = {"base": tmp_path / "base"}
    res = lc.convert(tmp_path / "src", to, output=tmp_path / "out", dtype="bf16", **kw)
    assert res.config_changes == {"dtype": "bfloat16"}
    got = read_tensors(tmp_path / "out")
    # nothing is computed, only cast: each tensor is bf16 of its source, exactly (the base's for strip,
    # the unmerged state dict PEFT holds, base and adapter, for attach)
    want = read_tensors(tmp_path / "base") if to == "base" else pm.state_dict()
    assert set(got) == set(want)
    for k, t in got.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, want[k].to(torch.bfloat16)), k
    if to == "base":
        assert _auto_dtypes(tmp_path / "out") == {torch.bfloat16}


def test_sub_configs_follow(tmp_path):
    """A multimodal config (transformers < 4.56 style) states the dtype at the top and per tower."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    cfg = LlavaConfig(
        text_config=LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4).to_dict(),
        vision_config=CLIPVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4).to_dict(),
    ).to_dict()
    for c in (cfg, cfg["text_config"], cfg["vision_config"]):
        c.pop("dtype", None)
        c["torch_dtype"] = "bfloat16"
    changes = dtype_config_changes("fp16", cfg)
    assert changes == {"torch_dtype": "float16"}
    assert dtype_config_changes("auto", cfg) == {} and dtype_config_changes("bf16", cfg) == {}
    cfg["text_config"]["torch_dtype"] = "float32"  # one tower disagrees: still rewritten
    assert dtype_config_changes("bf16", cfg) == {"torch_dtype": "bfloat16"}
    assert dtype_config_changes("fp32", {"model_type": "llama"}) == {"dtype": "float32"}  # neither key: added
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    update_config(tmp_path, changes)
    got = json.loads((tmp_path / "config.json").read_text())
    assert got["torch_dtype"] == got["text_config"]["torch_dtype"] == got["vision_config"]["torch_dtype"] == "float16"
    assert "dtype" not in got and "dtype" not in got["text_config"]
