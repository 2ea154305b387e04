"""The numbers of a quantized checkpoint's own description — ``quantization_config`` in config.json and
bitsandbytes' 4-bit ``quant_state`` JSON — checked before they size a grid or divide anything.

They come from the file: ``weight_block_size: [0, 0]`` divided by zero, ``[128]`` and ``{}`` raised
IndexError/KeyError, ``["128", 128]`` and ``[128.0, 128.0]`` were taken though transformers' loader takes
exactly two ints, ``blocksize: 0`` divided by zero, and a ``quant_type`` the tensor name contradicts was
reported under the wrong name.  No torch here: ``detect`` reads these without it.
"""

from __future__ import annotations

import json
from typing import Any

FP32_MAX = 3.4028234663852886e38
MAX_BLOCK = 2**31  # a block side or bitsandbytes block larger than any tensor we could read
BNB_QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes' 4-bit code books
BNB_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def _show(v: Any) -> str:
    return json.dumps(v, default=str)[:60]


def positive_int(v: Any, cap: int = MAX_BLOCK) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= cap


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**48


def fp8_block_size(value: Any, name: str = "weight_block_size") -> tuple[int, int] | None:
    """``weight_block_size`` (compressed-tensors: ``block_structure``): None (absent: one scale per tensor) or
    [rows, cols] as two positive integers; anything else is a ValueError saying what it must be."""
    if value is None:
        return None
    if isinstance(value, list) and len(value) == 2 and all(positive_int(v) for v in value):
        return value[0], value[1]
    raise ValueError(f"{name} must be two positive integers [rows, cols], not {_show(value)}")


def check_fp8_fmt(value: Any, stored: str = "e4m3") -> None:
    """``fmt`` (DeepSeek-V3 writes ``"e4m3"``): where given, it must name the fp8 format the weights are
    stored in — ``e5m2`` beside E4M3 tensors contradicts itself (ValueError)."""
    if value is not None and value != stored:
        raise ValueError(f"fmt is {_show(value)} but the weights are stored as fp8 {stored}")


def bnb_state_problem(state: Any, qtype: str) -> str | None:
    """What is wrong with a 4-bit ``quant_state`` whose tensor name (``...bitsandbytes__nf4``) says ``qtype``;
    None when nothing is."""
    if not isinstance(state, dict):
        return "is not a JSON object"
    shape = state.get("shape")
    if not (isinstance(shape, list) and 1 <= len(shape) <= 8 and all(_count(d) for d in shape)):
        return f"shape must be a list of non-negative integers, not {_show(shape)}"
    for key in ("blocksize", "nested_blocksize"):
        if (key == "blocksize" or key in state) and not positive_int(state.get(key)):
            return f"{key} must be a positive integer, not {_show(state.get(key))}"
    offset = state.get("nested_offset", 0.0)
    if not (isinstance(offset, (int, float)) and not isinstance(offset, bool) and abs(offset) <= FP32_MAX):
        return f"nested_offset must be a finite number, not {_show(offset)}"  # (NaN fails the comparison too)
    if qtype not in BNB_QUANT_TYPES:
        return f"its tensor name gives the 4-bit type {qtype[:40]!r} (known: {', '.join(BNB_QUANT_TYPES)})"
    if "quant_type" in state and state["quant_type"] != qtype:
        return f"quant_type is {_show(state['quant_type'])} but its tensor name says {qtype!r}"
    dtype = state.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype not in BNB_DTYPES:
        return f"dtype must be one of {', '.join(BNB_DTYPES)}, not {_show(state.get('dtype'))}"
    return None
