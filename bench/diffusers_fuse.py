"""The diffusers recipe that bench_kohya.py times against ``lora-convert merge``:

unet = UNet2DConditionModel.from_pretrained(BASE, torch_dtype=torch.float16)
state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(LORA, unet_config=unet.config)
unet.load_lora_adapter(state_dict, prefix="unet", network_alphas=alphas)
unet.fuse_lora(); unet.unload_lora()
unet.save_pretrained(OUT)

python bench/diffusers_fuse.py BASE LORA_FILE OUT
"""

import sys
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel


def main() -> int:
    if len(sys.argv) != 4:
        sys.exit("usage: python bench/diffusers_fuse.py BASE LORA_FILE OUT")
    base, lora, out = sys.argv[1:]
    unet = UNet2DConditionModel.from_pretrained(base, torch_dtype=torch.float16)
    sd, alphas = StableDiffusionXLPipeline.lora_state_dict(
        str(Path(lora).parent), weight_name=Path(lora).name, unet_config=unet.config
    )
    unet.load_lora_adapter(sd, prefix="unet", network_alphas=alphas)
    unet.fuse_lora()
    unet.unload_lora()
    unet.save_pretrained(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
