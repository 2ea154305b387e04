"""The math of quantized weight formats, pure tensors in and out: no files, no config parsing.

One module per family — :mod:`.fp8` (DeepSeek/Qwen3 block scales and compressed-tensors' fp8),
:mod:`.bnb` (bitsandbytes 4-bit and 8-bit), :mod:`.mxfp4` (gpt-oss experts) — each with the
dequantization a merge reads through and the quantization ``--requantize`` writes with.
:mod:`lora_convert.io.quantized` knows where the tensors lie; these modules know what the bytes mean.
"""
