"""Merged output must give the logits of PEFT's *unmerged* model (max |Δ| ≤ 1e-5 in fp32)."""

from __future__ import annotations

import pytest
import torch
from helpers import ALL_LINEARS as ALL
from helpers import ATTN, PEFT_CASES
from rounding import assert_rounded_once, peft_deltas, ulps_apart
from tiny import llama, load_merged, logits, peft_wrap, qwen2, read_json, save_unmerged

import lora_convert as lc

TOL = 1e-5


def _check(tmp_path, pm, *, via="adapter", name="default", expect_untied=None):
    """Merge ``pm``'s adapter into the base ``_fresh_base`` saved, and compare logits with PEFT's unmerged model."""
    ref = logits(pm)
    base_dir = tmp_path / "base"
    out = tmp_path / "merged"
    if via == "adapter":
        pm.save_pretrained(str(tmp_path / "adapter"))
        src = tmp_path / "adapter" / (name if name != "default" else "")
        res = lc.merge(src, base=base_dir, output=out)
    else:
        src = save_unmerged(pm, tmp_path / "unmerged", prefixed=(via == "unmerged"))
        res = lc.merge(src, output=out)
    got = logits(load_merged(out))
    assert got.shape == ref.shape
    diff = (got - ref).abs().max().item()
    assert diff <= TOL, f"max |Δlogits| = {diff}"
    if expect_untied is not None:
        cfg = read_json(out / "config.json")
        assert (cfg.get("tie_word_embeddings") is False) == expect_untied
    return res


def _fresh_base(factory, tmp_path, **kw):
    """Save the base before PEFT wraps it (get_peft_model modifies the model in place)."""
    m = factory(**kw)
    m.save_pretrained(str(tmp_path / "base"))
    return m


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
@pytest.mark.parametrize("via", ["adapter", "unmerged"])
def test_merge_matches_peft_unmerged_logits(tmp_path, case, via):
    factory, model_kw, lora_kw = PEFT_CASES[case]
    base = _fresh_base(factory, tmp_path, **model_kw)
    pm = peft_wrap(base, **lora_kw)
    _check(tmp_path, pm, via=via)


def test_merge_old_unprefixed_unmerged_layout(tmp_path):
    base = _fresh_base(llama, tmp_path)
    pm = peft_wrap(base, r=4, lora_alpha=8, target_modules=ATTN)
    _check(tmp_path, pm, via="unprefixed")


def test_named_adapter_subfolder(tmp_path):
    base = _fresh_base(llama, tmp_path)
    pm = peft_wrap(base, adapter_name="mine", r=4, lora_alpha=8, target_modules=ATTN)
    _check(tmp_path, pm, via="adapter", name="mine")


def test_tied_embedding_lora_unties_and_peft_merge_does_not(tmp_path):
    """PEFT's merge_and_unload writes the embedding delta into the shared tensor; we untie."""
    base = _fresh_base(qwen2, tmp_path)
    pm = peft_wrap(base, r=4, lora_alpha=8, target_modules=["embed_tokens"])
    ref = logits(pm)
    _check(tmp_path, pm, expect_untied=True)
    peft_merged = pm.merge_and_unload()
    assert (logits(peft_merged) - ref).abs().max() > 1e-3  # the bug we fix is real


@pytest.mark.parametrize("targets", [["embed_tokens", "q_proj"], ["lm_head", "v_proj"], ["embed_tokens", "lm_head"]])
def test_ensure_weight_tying(tmp_path, targets):
    """With ensure_weight_tying PEFT gives the tied head the embedding's adapter in the unmerged model:
    the merged model must follow that (both sides changed alike), whatever PEFT's merge does."""
    base = _fresh_base(qwen2, tmp_path)
    pm = peft_wrap(base, r=4, lora_alpha=8, target_modules=targets, ensure_weight_tying=True)
    with torch.no_grad():  # PEFT shares these with the head: a random-init delta on both sides makes
        for n, p in pm.named_parameters():  # logits ~250, where 1e-5 is below one fp32 ulp
            if "lora_embedding" in n:
                p.mul_(0.1)
    head = pm.base_model.model.lm_head
    assert (
        head.lora_A["default"].weight.data_ptr()
        == pm.base_model.model.model.embed_tokens.lora_embedding_B["default"].data_ptr()
    ), "PEFT ties the head's adapter to the embedding's"
    assert logits(pm).abs().max() < 5
    res = _check(tmp_path, pm, expect_untied=False)
    assert "tie_word_embeddings" not in res.config_changes
    from safetensors import safe_open

    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys(), "both sides changed alike: they stay one tied tensor"


def test_tied_without_change_stays_tied(tmp_path):
    base = _fresh_base(qwen2, tmp_path)
    pm = peft_wrap(base, r=4, lora_alpha=8, target_modules=["q_proj"])
    _check(tmp_path, pm, expect_untied=False)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()


def test_resized_vocabulary(tmp_path):
    """An adapter saved with resized embeddings carries the new embed_tokens/lm_head whole."""
    base = _fresh_base(llama, tmp_path)
    base.resize_token_embeddings(VOCAB2 := 112)
    pm = peft_wrap(base, r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens", "lm_head"])
    ref = logits(pm, torch.tensor([[1, 100, 111, 5]]))
    pm.save_pretrained(str(tmp_path / "adapter"), save_embedding_layers=True)
    res = lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    assert read_json(tmp_path / "merged" / "config.json")["vocab_size"] == VOCAB2
    assert res.config_changes["vocab_size"] == VOCAB2
    got = logits(load_merged(tmp_path / "merged"), torch.tensor([[1, 100, 111, 5]]))
    assert (got - ref).abs().max() <= TOL


def test_bf16_rounded_once(tmp_path):
    """bf16 output equals bf16(fp32(W) + ΔW); PEFT-style double rounding must not pass."""
    base = _fresh_base(llama, tmp_path, dtype=torch.bfloat16)
    pm = peft_wrap(base, r=8, lora_alpha=16, target_modules=["q_proj"])
    pm.save_pretrained(str(tmp_path / "adapter"))
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    from safetensors.torch import load_file

    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    basew = load_file(str(tmp_path / "base" / "model.safetensors"))
    ad = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    key = "model.layers.0.self_attn.q_proj"
    A = ad[f"base_model.model.{key}.lora_A.weight"].float()
    B = ad[f"base_model.model.{key}.lora_B.weight"].float()
    delta = (B @ A) * 2.0
    W = basew[f"{key}.weight"]
    once = (W.float() + delta).to(torch.bfloat16)
    twice = W + delta.to(torch.bfloat16)
    got = merged[f"{key}.weight"]
    assert got.dtype == torch.bfloat16
    # another fp32 summation order than ours may move an element across a rounding boundary: 1 ulp, no more
    assert ulps_apart(got, once).max() <= 1
    assert ulps_apart(twice, once).max() > 1, "test data must tell single from double rounding"
    assert (got != twice).sum() > (got != once).sum()
    assert_rounded_once(tmp_path / "merged", tmp_path / "base", peft_deltas(tmp_path / "adapter"), torch.bfloat16)


def test_dtype_option_and_sharding(tmp_path):
    base = _fresh_base(llama, tmp_path)
    pm = peft_wrap(base, r=4, lora_alpha=8, target_modules=ATTN)
    pm.save_pretrained(str(tmp_path / "adapter"))
    res = lc.merge(
        tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "m16", dtype="fp16", max_shard_size="20KB"
    )
    idx = read_json(tmp_path / "m16" / "model.safetensors.index.json")
    assert len(set(idx["weight_map"].values())) == len(res.files) > 1
    m = load_merged(tmp_path / "m16")
    from safetensors import safe_open

    first = sorted(idx["weight_map"].values())[0]
    with safe_open(str(tmp_path / "m16" / first), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
        assert f.metadata() == {"format": "pt"}
    # every tensor is fp16(fp32(W) + ΔW), ΔW from the adapter file as PEFT defines it; untouched ones fp16(W)
    assert_rounded_once(tmp_path / "m16", tmp_path / "base", peft_deltas(tmp_path / "adapter"), torch.float16)
    assert (logits(m) - logits(pm)).abs().max() < 5e-2  # and the model runs: fp16 rounding only


VOCAB = 96


def test_bin_base_streams_through_the_pipeline(tmp_path):
    """A base saved as pytorch_model.bin (weights_only load) is read block by block like safetensors."""
    base = _fresh_base(llama, tmp_path)
    pm = peft_wrap(base, r=4, lora_alpha=8, target_modules=ALL + ["embed_tokens", "lm_head"], use_dora=True)
    pm.save_pretrained(str(tmp_path / "adapter"))
    bin_dir = tmp_path / "binbase"
    bin_dir.mkdir()
    from safetensors.torch import load_file

    torch.save(load_file(str(tmp_path / "base" / "model.safetensors")), bin_dir / "pytorch_model.bin")
    (bin_dir / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    lc.merge(tmp_path / "adapter", base=bin_dir, output=tmp_path / "merged")
    assert (logits(load_merged(tmp_path / "merged")) - logits(pm)).abs().max() <= TOL
