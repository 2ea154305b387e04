"""Adapters meet vision-language models: the text decoder is ``model.layers`` in a text-only model (and in
Qwen2-VL as saved), ``model.language_model.layers`` in PEFT adapters trained on a VLM, and
``language_model.model.layers`` in a Gemma 3 or Llava as ``save_pretrained`` writes it.  Each reading is
matched automatically and reported; merged logits equal PEFT's unmerged ones; two possible readings are
refused; zero matched modules stays an error.  Tiny real models from transformers configs."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import VLM_SEQ, llama, logits, peft_wrap, read_json, vlm

import lora_convert as lc

TOL = 1e-5
VLMS = ["qwen2_vl", "gemma3", "llava"]
TEXT_ON_DISK = {"qwen2_vl": "model.", "gemma3": "language_model.model.", "llava": "language_model.model."}


def _vlm_class(name):
    from transformers import (
        Gemma3ForConditionalGeneration,
        LlavaForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
    )

    return {
        "qwen2_vl": Qwen2VLForConditionalGeneration,
        "gemma3": Gemma3ForConditionalGeneration,
        "llava": LlavaForConditionalGeneration,
    }[name]


def _load_vlm(name, path):
    return _vlm_class(name).from_pretrained(str(path), dtype=torch.float32).eval()


def _rekey(folder, fn) -> None:
    """Rewrite an adapter's keys (``fn`` returns None to drop a key)."""
    f = folder / "adapter_model.safetensors"
    sd = load_file(str(f))
    save_file({fn(k): v for k, v in sd.items() if fn(k) is not None}, str(f), metadata={"format": "pt"})


def _vlm_with_adapter(tmp_path, name, **lora):
    model = vlm(name)
    model.save_pretrained(str(tmp_path / "base"))  # the layout save_pretrained writes (legacy for all three)
    pm = peft_wrap(model, **lora)
    pm.save_pretrained(str(tmp_path / "adapter"))
    return pm


@pytest.mark.parametrize("name", VLMS)
def test_vlm_adapter_merges_into_the_vlm_as_saved(tmp_path, name):
    pm = _vlm_with_adapter(tmp_path, name, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    keys = load_file(str(tmp_path / "base" / "model.safetensors"))
    assert any(k.startswith(TEXT_ON_DISK[name] + "layers.0.") for k in keys)  # what this test is about
    assert lc.detect(tmp_path / "adapter").module_prefixes["text decoder"] == "model.language_model."
    want = logits(pm, VLM_SEQ)
    res = lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    assert f"adapter modules under 'model.language_model.' matched the base's {TEXT_ON_DISK[name]!r} (6 modules)" in (
        res.warnings
    )
    merged = _load_vlm(name, tmp_path / "merged")
    got = logits(merged, VLM_SEQ)
    assert (got - want).abs().max().item() <= TOL
    # every tensor, vision tower included (text-only logits never reach it), equals PEFT's own merge
    peft_merged = pm.merge_and_unload().state_dict()
    ours = merged.state_dict()
    assert set(ours) == set(peft_merged)
    worst = max((ours[k] - peft_merged[k]).abs().max().item() for k in ours)
    assert worst <= 1e-6
    assert set(load_file(str(tmp_path / "merged" / "model.safetensors"))) == set(keys)  # the base's layout kept


@pytest.mark.parametrize("name", VLMS)
def test_text_only_layout_adapter_merges_into_a_vlm(tmp_path, name):
    """An adapter whose keys say ``model.layers`` (trained on the text model) onto the saved VLM."""
    pm = _vlm_with_adapter(tmp_path, name, r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"])
    text_only = {n: p for n, p in pm.named_parameters() if "lora_B" in n and "language_model" not in n}
    with torch.no_grad():  # a text-only adapter has no vision-tower LoRA: make it a no-op in the reference
        for p in text_only.values():
            p.zero_()
    want = logits(pm, VLM_SEQ)
    pm.save_pretrained(str(tmp_path / "adapter"))

    def text_layout(k):
        if "language_model" not in k:
            return None
        return k.replace("base_model.model.model.language_model.", "base_model.model.model.")

    _rekey(tmp_path / "adapter", text_layout)
    assert lc.detect(tmp_path / "adapter").module_prefixes == {"text decoder": "model."}
    d = lc.detect(tmp_path / "adapter", base=tmp_path / "base")
    assert d.base_match["matched"] == 4 and not d.base_match["unmatched"]
    res = lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    if name == "qwen2_vl":  # Qwen2-VL is saved with the text-only names: nothing to rename
        assert not res.warnings
    else:
        assert "adapter modules under 'model.' matched the base's 'language_model.model.' (4 modules)" in res.warnings
    got = logits(_load_vlm(name, tmp_path / "merged"), VLM_SEQ)
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("layout", ["model.language_model.", "language_model.model."])
def test_vlm_layout_adapter_merges_into_a_text_only_model(tmp_path, layout):
    """The reverse: keys in a VLM's layout (lm_head too: ``language_model.lm_head`` in the legacy one)."""
    model = llama(vocab=64)
    model.save_pretrained(str(tmp_path / "base"))
    pm = peft_wrap(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"])
    want = logits(pm, VLM_SEQ)
    pm.save_pretrained(str(tmp_path / "adapter"))
    head = "base_model.model.language_model.lm_head." if layout.startswith("language_model") else None

    def vlm_layout(k):
        k = k.replace("base_model.model.model.", "base_model.model." + layout)
        return k.replace("base_model.model.lm_head.", head) if head else k

    _rekey(tmp_path / "adapter", vlm_layout)
    res = lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    assert f"adapter modules under {layout!r} matched the base's 'model.' (4 modules)" in res.warnings
    assert any("'language_model.lm_head.' matched the base's 'lm_head.'" in w for w in res.warnings) == bool(head)
    from tiny import load_merged

    assert (logits(load_merged(tmp_path / "merged"), VLM_SEQ) - want).abs().max().item() <= TOL


def test_vision_tower_lora_is_left_out_of_a_text_only_base(tmp_path):
    """A Llava adapter whose q_proj/v_proj targets caught the vision tower too, merged into the Llava's own
    language model saved as a text-only Llama: the vision modules have nowhere to go and are reported."""
    from transformers import LlamaConfig, LlamaForCausalLM

    pm = _vlm_with_adapter(tmp_path, "llava", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    want = logits(pm, VLM_SEQ)
    vlm_model = pm.get_base_model()
    text = LlamaForCausalLM(LlamaConfig(**vlm_model.config.text_config.to_dict())).eval()
    with torch.no_grad():
        sd = {
            k.replace(".base_layer", "").replace("model.language_model.", "model."): v
            for k, v in vlm_model.state_dict().items()
            if ("language_model" in k or k.startswith("lm_head")) and "lora_" not in k
        }
        text.load_state_dict(sd)
    text.save_pretrained(str(tmp_path / "text_base"))
    res = lc.merge(tmp_path / "adapter", base=tmp_path / "text_base", output=tmp_path / "merged")
    assert any(w.startswith("2 modules of 'model.vision_tower' left out") for w in res.warnings), res.warnings
    from tiny import load_merged

    assert (logits(load_merged(tmp_path / "merged"), VLM_SEQ) - want).abs().max().item() <= TOL


def test_attached_to_the_vlm_as_saved_the_config_follows_the_new_names(tmp_path):
    """adapter + base -> unmerged renames the modules to the base's; an alpha_pattern anchored on the
    adapter's path must follow, or the unmerged checkpoint would change scaling."""
    pattern = {"^model.language_model.layers.0.self_attn.q_proj": 3}
    pm = _vlm_with_adapter(tmp_path, "llava", r=4, lora_alpha=8, target_modules=["q_proj"], alpha_pattern=pattern)
    want = logits(pm, VLM_SEQ)
    lc.convert(tmp_path / "adapter", "unmerged", base=tmp_path / "base", output=tmp_path / "unmerged")
    cfg = read_json(tmp_path / "unmerged" / "adapter_config.json")
    # a pattern built from a module name is that name escaped (issue 23): it matches this module only
    assert cfg["alpha_pattern"] == {re.escape("language_model.model.layers.0.self_attn.q_proj"): 3.0}
    lc.merge(tmp_path / "unmerged", output=tmp_path / "merged")
    assert (logits(_load_vlm("llava", tmp_path / "merged"), VLM_SEQ) - want).abs().max().item() <= TOL


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_gemma3_tied_head_or_embedding_lora(tmp_path, target):
    """Gemma 3 ties its head to the embedding and saves neither ``lm_head`` nor the VLM prefixes PEFT
    uses: the LoRA'd side is matched through the prefixes, the two untied, and the logits are PEFT's."""
    pm = _vlm_with_adapter(tmp_path, "gemma3", r=4, lora_alpha=8, target_modules=["q_proj", target])
    want = logits(pm, VLM_SEQ)
    res = lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    assert res.config_changes == {"tie_word_embeddings": False}
    assert (logits(_load_vlm("gemma3", tmp_path / "merged"), VLM_SEQ) - want).abs().max().item() <= TOL


def test_two_readings_are_refused(tmp_path):
    """A base holding the decoder under two prefixes: ``model.language_model.layers`` could be either."""
    _vlm_with_adapter(tmp_path, "llava", r=4, lora_alpha=8, target_modules=["q_proj"])
    f = tmp_path / "base" / "model.safetensors"
    sd = load_file(str(f))
    sd.update({k.replace("language_model.model.", "model.", 1): v.clone() for k, v in sd.items() if "layers" in k})
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(lc.AdapterError, match="can be read as more than one module of the base") as e:
        lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")
    assert "language_model.model.layers.0.self_attn.q_proj or model.layers.0.self_attn.q_proj" in str(e.value)
    assert not (tmp_path / "merged").exists()
    d = lc.detect(tmp_path / "adapter", base=tmp_path / "base")
    assert d.base_match["ambiguous"]


def test_zero_matched_modules_stays_an_error(tmp_path):
    _vlm_with_adapter(tmp_path, "gemma3", r=4, lora_alpha=8, target_modules=["q_proj"])
    llama(vocab=64).save_pretrained(str(tmp_path / "other"))
    _rekey(
        tmp_path / "adapter",
        lambda k: k.replace("self_attn.q_proj", "self_attn.qkv") if "language_model" in k else None,
    )
    with pytest.raises(lc.AdapterError, match="2 of 2 adapter modules match no tensor of the base"):
        lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "merged")


def test_detect_json_reports_the_layout(tmp_path):
    _vlm_with_adapter(tmp_path, "gemma3", r=4, lora_alpha=8, target_modules=["q_proj"])
    from click.testing import CliRunner

    from lora_convert.cli import main

    r = CliRunner().invoke(main, ["detect", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), "--json"])
    assert r.exit_code == 0, r.output
    import json

    d = json.loads(r.stdout)
    assert d["module_prefixes"] == {"text decoder": "model.language_model.", "vision_tower": "model.vision_tower."}
    assert d["base_match"]["renamed"] == {
        "model.language_model. -> language_model.model.": 2,
        "model.vision_tower. -> vision_tower.": 1,
    }
    assert read_json(tmp_path / "adapter" / "adapter_config.json")["r"] == 4
