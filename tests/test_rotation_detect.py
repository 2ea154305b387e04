"""detect's module table for rotation tuners (OFT, BOFT, HRA, LyCORIS Diag-OFT): they have no alpha and no scaling
(a rotation is not scaled), and their ``rank`` is a block size (HRA: the number of reflections r), so the table
shows it under that name and no alpha/scaling columns; a LyCORIS file mixing LoRA and Diag-OFT modules keeps LoRA's
columns, with "-" for the rotation's alpha and scaling.  LoRA's own table is unchanged (bench/golden.py)."""

from __future__ import annotations

import torch
from helpers import cli
from lycoris.modules.diag_oft import DiagOFTModule
from peft import HRAConfig, OFTConfig, get_peft_model
from safetensors.torch import save_file
from tiny import llama, unet

import lora_convert as lc


def _head(out: str) -> list[str]:
    """The module table's header cells."""
    line = next(ln for ln in out.splitlines() if "module" in ln and "count" in ln)
    return [c.strip() for c in line.strip("┃ ").split("┃")]


def test_oft_and_hra_show_their_size_and_no_alpha(tmp_path):
    cfg = OFTConfig(oft_block_size=8, target_modules=["q_proj"], init_weights=False)
    get_peft_model(llama(), cfg).save_pretrained(str(tmp_path / "oft"))
    get_peft_model(llama(), HRAConfig(r=3, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "hra"))
    for name, size, want in (("oft", "block size", 8), ("hra", "reflections r", 3)):
        res = cli("detect", tmp_path / name)
        assert res.exit_code == 0, res.output
        assert _head(res.stdout) == ["module", "count", "layers", size, "algorithm"]
        (g,) = lc.detect(tmp_path / name).adapters[0].modules
        assert (g.ranks, g.alphas, g.scalings, g.algorithms) == ([want], [], [], [name])


def test_a_lycoris_file_mixing_lora_and_diag_oft(tmp_path):
    base = unet()
    named = dict(base.named_modules())
    mod = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    name = "lora_unet_" + mod.replace(".", "_")
    m = DiagOFTModule(name, named[mod], 1.0, lora_dim=2)
    sd = {f"{name}.{k}": v.detach().clone().contiguous() for k, v in m.state_dict().items()}
    lora = "lora_unet_" + "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k".replace(".", "_")
    sd |= {f"{lora}.lora_down.weight": torch.ones(2, 8), f"{lora}.lora_up.weight": torch.ones(8, 2)}
    sd[f"{lora}.alpha"] = torch.tensor(1.0)
    (tmp_path / "k").mkdir()
    save_file(sd, str(tmp_path / "k" / "mix.safetensors"), metadata={"ss_network_module": "lycoris.kohya"})
    res = cli("detect", tmp_path / "k")
    assert res.exit_code == 0, res.output
    assert _head(res.stdout) == ["module", "count", "layers", "rank / block size", "alpha", "scaling", "algorithm"]
    rows = {
        ln.split("│")[1].strip(): [c.strip() for c in ln.split("│")[1:-1]]
        for ln in res.stdout.splitlines()
        if "│" in ln
    }
    assert rows["to_q"] == ["to_q", "1", "-", "2", "-", "-", "diag-oft"]
    assert rows["to_k"] == ["to_k", "1", "-", "2", "1", "0.5", "lora"]
