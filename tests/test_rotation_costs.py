"""report's FLOPs for rotation tuners whose files leave a layer's width unsaid: LyCORIS Diag-OFT/BOFT (no input
width), PEFT's OFT (no output width; with ``block_share`` no input width either) and HRA (no output width).  With a
base each width comes from the base weight (as the model itself has it); without one the FLOPs are 0 and a note says
why.  Expected values are the tuners' own formulas on the widths read off the torch modules:

* per token, LyCORIS rebuilds the rotated weight each forward and runs ``x @ ΔWᵀ``: 2·in·out; OFT a b-long dot per
  input feature: 2·b·in; HRA two thin products: 4·r·in + 2·r².
* merge: a b-long dot per merged entry, per butterfly stage (Diag-OFT and OFT: one stage; LyCORIS BOFT: m, the
  first dimension of its 4-D ``oft_blocks``); HRA (4·r·in + 2·r²)·out.
"""

from __future__ import annotations

import math

import pytest
from lycoris.modules.boft import ButterflyOFTModule
from lycoris.modules.diag_oft import DiagOFTModule
from peft import HRAConfig, OFTConfig, get_peft_model
from safetensors.torch import save_file
from tiny import llama, qwen2, unet

import lora_convert as lc

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
SPECS = {  # module -> LyCORIS block size (lora_dim)
    f"{ATTN}.attn1.to_q": 2,  # Linear 8 -> 8
    f"{ATTN}.ff.net.0.proj": 4,  # Linear 8 -> 64
    "down_blocks.0.resnets.0.conv1": 2,  # conv 3×3
}
LYCORIS = {"diag-oft": DiagOFTModule, "boft": ButterflyOFTModule}


def _rows(rep):
    return {r.form: r for r in rep.rows}


@pytest.mark.parametrize("algo", sorted(LYCORIS))
def test_lycoris_oft_flops_take_the_input_width_from_the_base(tmp_path, algo):
    base = unet()
    base.save_pretrained(str(tmp_path / "unet"))
    named = dict(base.named_modules())
    sd, per_token, merge = {}, 0, 0
    for mod, b in SPECS.items():
        name = "lora_unet_" + mod.replace(".", "_")
        m = LYCORIS[algo](name, named[mod], 1.0, lora_dim=b)
        sd.update({f"{name}.{k}": v.detach().clone().contiguous() for k, v in m.state_dict().items()})
        w = named[mod].weight
        out_f, in_f = w.shape[0], math.prod(w.shape[1:])
        stages = m.oft_blocks.shape[0] if algo == "boft" else 1
        assert algo == "diag-oft" or stages > 1 or mod.endswith("to_q")  # a butterfly of several stages
        per_token += 2 * in_f * out_f
        merge += 2 * stages * b * in_f * out_f
    (tmp_path / "k").mkdir()
    save_file(sd, str(tmp_path / "k" / "oft.safetensors"), metadata={"ss_network_module": "lycoris.kohya"})
    rep = lc.report(tmp_path / "k", base=tmp_path / "unet")
    rows = _rows(rep)
    assert (rows["unmerged"].flops_lora, rows["adapter"].merge_flops) == (per_token, merge)
    assert sum(k.merge_flops for k in rep.modules) == merge
    bare = lc.report(tmp_path / "k")
    assert (_rows(bare)["unmerged"].flops_lora, _rows(bare)["adapter"].merge_flops) == (0, 0)
    name = {"diag-oft": "Diag-OFT", "boft": "BOFT"}[algo]
    assert any(n.startswith(f"{name}: the file does not say") for n in bare.notes), bare.notes


PEFT = {
    # OFT stores one row per block of the input side: no output width
    "oft": (llama, OFTConfig(oft_block_size=8, target_modules=["q_proj", "down_proj"], init_weights=False)),
    # block_share: one row for the whole input side, no width at all
    "oft-share": (
        qwen2,
        OFTConfig(oft_block_size=4, block_share=True, target_modules=["q_proj", "gate_proj"], init_weights=False),
    ),
    # hra_u is (in, r): no output width
    "hra": (llama, HRAConfig(r=3, target_modules=["q_proj", "down_proj"])),
}


@pytest.mark.parametrize("case", sorted(PEFT))
def test_peft_rotation_flops_need_the_base_and_say_so_without_it(tmp_path, case):
    factory, config = PEFT[case]
    factory().save_pretrained(str(tmp_path / "base"))
    pm = get_peft_model(factory(), config)
    pm.save_pretrained(str(tmp_path / "adapter"))
    per_token = merge = 0
    for _, mod in pm.named_modules():
        if not hasattr(mod, "oft_R") and not hasattr(mod, "hra_u") or mod.get_base_layer() is mod:
            continue
        i, o = mod.get_base_layer().in_features, mod.get_base_layer().out_features
        if case == "hra":
            per_token += 4 * 3 * i + 2 * 3 * 3
            merge += (4 * 3 * i + 2 * 3 * 3) * o
        else:
            b = config.oft_block_size
            per_token += 2 * b * i
            merge += 2 * b * i * o
    assert merge
    rows = _rows(lc.report(tmp_path / "adapter", base=tmp_path / "base"))
    assert (rows["unmerged"].flops_lora, rows["adapter"].merge_flops) == (per_token, merge)
    bare = lc.report(tmp_path / "adapter", base=tmp_path / "nowhere")
    assert _rows(bare)["adapter"].merge_flops == 0
    name = "HRA" if case == "hra" else "OFT"
    assert any(n.startswith(f"{name}: the file does not say") for n in bare.notes), bare.notes
