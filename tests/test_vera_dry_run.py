"""``merge --dry-run``'s factor bytes for VeRA and AdaLoRA count what is stored and read: VeRA's shared ``vera_A`` and
``vera_B`` once and every layer's λ vectors (not the float32 views ``λ_d ⊙ vera_A[:r, :in]`` the routes see), AdaLoRA's
``lora_A``, ``lora_E`` and ``lora_B``: the adapter file's tensors, byte for byte."""

from __future__ import annotations

from peft import AdaLoraConfig, VeraConfig, get_peft_model
from safetensors.torch import load_file
from tiny import llama

import lora_convert as lc


def _stored(folder) -> dict[str, int]:
    sd = load_file(str(folder / "adapter_model.safetensors"))
    return {k: v.numel() * v.element_size() for k, v in sd.items()}


def test_vera_dry_run_counts_the_stored_projections_once_and_the_lambdas(tmp_path):
    llama().save_pretrained(str(tmp_path / "base"))
    cfg = VeraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"])  # widths 32, 32, 48: views cut vera_A
    get_peft_model(llama(), cfg).save_pretrained(str(tmp_path / "adapter"))
    stored = _stored(tmp_path / "adapter")
    assert {k.rsplit(".", 1)[-1] for k in stored} == {"vera_A", "vera_B", "vera_lambda_b", "vera_lambda_d"}
    dry = lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "m", dry_run=True)
    assert dry.factor_bytes == sum(stored.values())


def test_adalora_dry_run_counts_lora_a_e_and_b_as_stored(tmp_path):
    llama().save_pretrained(str(tmp_path / "base"))
    cfg = AdaLoraConfig(r=4, init_r=4, target_modules=["q_proj", "v_proj"], total_step=10)
    get_peft_model(llama(), cfg).save_pretrained(str(tmp_path / "adapter"))
    stored = _stored(tmp_path / "adapter")
    assert {k.rsplit(".", 1)[-1] for k in stored} >= {"lora_A", "lora_E", "lora_B"}
    dry = lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "m", dry_run=True)
    assert dry.factor_bytes == sum(
        n for k, n in stored.items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_E", "lora_B")
    )
