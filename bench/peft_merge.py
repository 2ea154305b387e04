"""The PEFT recipe that bench_merge.py times against ``lora-convert merge``:

model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, ADAPTER)
model = model.merge_and_unload()
model.save_pretrained(OUT)

python bench/peft_merge.py BASE ADAPTER OUT
"""

import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main() -> int:
    if len(sys.argv) != 4:
        sys.exit("usage: python bench/peft_merge.py BASE ADAPTER OUT")
    base, adapter, out = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter)
    model = model.merge_and_unload()
    model.save_pretrained(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
