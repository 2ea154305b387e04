"""lycoris-lora's own merge, which bench_kohya.py ``--algo loha|lokr`` times against ``lora-convert merge``:

unet = UNet2DConditionModel.from_pretrained(BASE, torch_dtype=torch.float16)
LycorisNetwork.apply_preset({"lora_prefix": "lora_unet"})      # kohya's names
network, _ = create_lycoris_from_weights(1.0, LORA, unet)
network.merge_to(1.0)                                          # ΔW computed in the weight's dtype (fp16)
unet.save_pretrained(OUT)

python bench/lycoris_merge.py BASE LORA_FILE OUT
"""

import sys

import torch
from diffusers import UNet2DConditionModel
from lycoris import create_lycoris_from_weights
from lycoris.wrapper import LycorisNetwork


def main() -> int:
    if len(sys.argv) != 4:
        sys.exit("usage: python bench/lycoris_merge.py BASE LORA_FILE OUT")
    base, lora, out = sys.argv[1:]
    unet = UNet2DConditionModel.from_pretrained(base, torch_dtype=torch.float16)
    LycorisNetwork.apply_preset({"lora_prefix": "lora_unet"})
    network, _ = create_lycoris_from_weights(1.0, lora, unet)
    if not network.loras:
        sys.exit("lycoris-lora matched no module of the file")
    with torch.no_grad():
        network.merge_to(1.0)
    unet.save_pretrained(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
