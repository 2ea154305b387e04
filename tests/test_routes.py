"""unmerged -> adapter / base, adapter + base -> unmerged, checked against PEFT itself."""

from __future__ import annotations

import hashlib

import pytest
import torch
from helpers import peft_load
from safetensors.torch import load_file
from tiny import gpt2, llama, load_merged, logits, peft_wrap, qwen2, read_json, save_unmerged

import lora_convert as lc

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


LORA_CASES = {
    "llama-embed-dora": (
        llama,
        {},
        dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"]),
    ),
    "llama-mts-tokens": (
        llama,
        {},
        dict(r=4, lora_alpha=8, target_modules=ATTN, modules_to_save=["norm"], trainable_token_indices=[2, 5]),
    ),
    "qwen2-lora-bias": (qwen2, {"tie": False}, dict(r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True)),
    "gpt2": (gpt2, {}, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    # the base stores the tied head once, as the embedding: attach still finds lm_head (it refused before)
    "qwen2-tied-head": (qwen2, {"tie": True}, dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_unmerged_to_adapter_loads_in_peft(tmp_path, case):
    factory, mkw, lkw = LORA_CASES[case]
    pm = peft_wrap(factory(**mkw), **lkw)
    ref = logits(pm)
    src = save_unmerged(pm, tmp_path / "unmerged")
    res = lc.convert(src, "adapter", output=tmp_path / "adapter")
    assert res.route == "unmerged->adapter"
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    loaded = peft_load(lambda: factory(**mkw), tmp_path / "adapter")
    assert (logits(loaded) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("prefixed", [True, False])
def test_unmerged_to_base_is_bit_identical(tmp_path, prefixed):
    base = llama()
    base.save_pretrained(str(tmp_path / "base"))
    pm = peft_wrap(base, r=4, lora_alpha=8, target_modules=ATTN + ["embed_tokens"], modules_to_save=["norm"])
    src = save_unmerged(pm, tmp_path / "unmerged", prefixed=prefixed)
    lc.convert(src, "base", output=tmp_path / "restored")
    orig = load_file(str(tmp_path / "base" / "model.safetensors"))
    got = load_file(str(tmp_path / "restored" / "model.safetensors"))
    assert set(orig) == set(got)
    for k in orig:
        assert orig[k].dtype == got[k].dtype and torch.equal(orig[k], got[k]), k
    assert read_json(tmp_path / "restored" / "config.json")["model_type"] == "llama"


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_adapter_plus_base_to_unmerged_matches_peft_state_dict(tmp_path, case):
    factory, mkw, lkw = LORA_CASES[case]
    base = factory(**mkw)
    base.save_pretrained(str(tmp_path / "base"))
    pm = peft_wrap(base, **lkw)
    ref = logits(pm)
    pm.save_pretrained(str(tmp_path / "adapter"))
    lc.convert(tmp_path / "adapter", "unmerged", base=tmp_path / "base", output=tmp_path / "unmerged")
    got = load_file(str(tmp_path / "unmerged" / "model.safetensors"))
    want = {k: v for k, v in pm.state_dict().items()}
    # tied weights are stored once, under the embedding's name
    missing = set(want) - set(got)
    assert all("lm_head" in k for k in missing), sorted(missing)[:5]
    assert set(got) <= set(want), sorted(set(got) - set(want))[:5]
    for k, v in got.items():
        assert torch.equal(v, want[k].detach()), k
    # and it loads strictly into a fresh PEFT model, giving the same logits
    from peft import LoraConfig, get_peft_model

    fresh = get_peft_model(factory(**mkw, seed=123), LoraConfig.from_pretrained(str(tmp_path / "unmerged")))
    fresh.load_state_dict(got, strict=False)
    assert (logits(fresh.eval()) - ref).abs().max() <= 1e-5
    assert read_json(tmp_path / "unmerged" / "adapter_config.json")["peft_type"] == "LORA"


def test_round_trip_adapter_unmerged_adapter(tmp_path):
    base = llama()
    base.save_pretrained(str(tmp_path / "base"))
    pm = peft_wrap(base, r=4, lora_alpha=8, target_modules=ATTN + ["lm_head"], use_dora=True)
    pm.save_pretrained(str(tmp_path / "a1"))
    lc.convert(tmp_path / "a1", "unmerged", base=tmp_path / "base", output=tmp_path / "u")
    lc.convert(tmp_path / "u", "adapter", output=tmp_path / "a2")
    a1 = load_file(str(tmp_path / "a1" / "adapter_model.safetensors"))
    a2 = load_file(str(tmp_path / "a2" / "adapter_model.safetensors"))
    # PEFT also saves the untouched base lm_head whole ("save_embedding_layers"); we need not
    assert set(a2) <= set(a1) and all(".base_layer." in k for k in set(a1) - set(a2))
    assert all(torch.equal(a1[k], a2[k]) for k in a2)


def test_impossible_routes_say_what_is_missing(tmp_path):
    base = llama()
    base.save_pretrained(str(tmp_path / "base"))
    pm = peft_wrap(base, r=4, lora_alpha=8, target_modules=ATTN)
    pm.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(lc.RouteError, match="needs the base"):
        lc.convert(tmp_path / "adapter", "merged", output=tmp_path / "x")
    with pytest.raises(lc.RouteError, match="holds no base"):
        lc.convert(tmp_path / "adapter", "base", output=tmp_path / "x")
    with pytest.raises(lc.RouteError, match="no LoRA tensors"):
        lc.convert(tmp_path / "base", "merged", output=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_inputs_untouched_and_carried_files(tmp_path):
    base = llama()
    base.save_pretrained(str(tmp_path / "base"))
    (tmp_path / "base" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (tmp_path / "base" / "chat_template.jinja").write_text("{{ messages }}")
    pm = peft_wrap(base, r=4, lora_alpha=8, target_modules=ATTN)
    pm.save_pretrained(str(tmp_path / "adapter"))
    before = {p: _sha(p) for d in ("base", "adapter") for p in (tmp_path / d).iterdir()}
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "m")
    assert before == {p: _sha(p) for d in ("base", "adapter") for p in (tmp_path / d).iterdir()}
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "README.md",
        "model.safetensors",
    } <= names
    assert not [p for p in tmp_path.iterdir() if ".tmp-lora-convert" in p.name]


def test_tied_head_lora_attach_strip_merge_round_trip(tmp_path):
    """A tied base stores lm_head once, as the embedding; a LoRA on lm_head attaches without a second copy,
    strips back to the base's own bytes, and merges to PEFT's logits."""
    base = qwen2(tie=True)
    base.save_pretrained(str(tmp_path / "base"))
    pm = peft_wrap(base, r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    ref = logits(pm)
    pm.save_pretrained(str(tmp_path / "adapter"))
    lc.convert(tmp_path / "adapter", "unmerged", base=tmp_path / "base", output=tmp_path / "unmerged")
    got = load_file(str(tmp_path / "unmerged" / "model.safetensors"))
    assert "base_model.model.lm_head.lora_A.default.weight" in got
    assert not [k for k in got if k.startswith("base_model.model.lm_head.base_layer")]
    lc.convert(tmp_path / "unmerged", "base", output=tmp_path / "stripped")
    assert _sha(tmp_path / "stripped" / "model.safetensors") == _sha(tmp_path / "base" / "model.safetensors")
    lc.convert(tmp_path / "unmerged", "merged", output=tmp_path / "merged")
    assert (logits(load_merged(tmp_path / "merged")) - ref).abs().max() <= 1e-5
