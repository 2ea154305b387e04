"""MXFP4 (the OCP microscaling fp4 of gpt-oss's experts): 32 e2m1 values share one power-of-two scale.

On disk an expert tensor is ``*_blocks`` U8 (E, out, in/32, 16) — two codes per byte, the even element in
the LOW nibble — and ``*_scales`` U8 (E, out, in/32), an e8m0 exponent: ``value = E2M1[code] · 2^(s-127)``.
The parameter transformers builds is the transpose, (E, in, out).  Every value is exact in bf16.

Quantization follows the reference transformers calls (triton_kernels' ``downcast_to_mxfp_torch``, its
default ``ROUND_UP`` scale): per 32 values the scale is amax/6 rounded *up* to a power of two, each value
divided by it and rounded to the nearest e2m1 value, ties to the even code, saturating at ±6.
"""

from __future__ import annotations

import torch

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., G, 16) codes and (..., G) exponents -> (..., G·32) values in ``dtype`` (exact)."""
    table = torch.tensor(E2M1, dtype=torch.float32)
    b = blocks.to(torch.int64)
    v = torch.stack([table[b & 0xF], table[b >> 4]], dim=-1).reshape(*blocks.shape[:-1], BLOCK)
    v = torch.ldexp(v, (scales.to(torch.int32) - 127).unsqueeze(-1).float())
    return v.reshape(*blocks.shape[:-2], blocks.shape[-2] * BLOCK).to(dtype)


def _e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code (sign << 3 | magnitude index), ties to the even code, saturating at 6."""
    mag = torch.tensor(E2M1[:8], dtype=torch.float32)
    mids = (mag[:-1] + mag[1:]) / 2
    a = x.abs()
    idx = torch.bucketize(a, mids)  # a == mid goes to the lower index
    tie = (idx < 7) & (a == mids[idx.clamp(max=6)])
    idx = idx + (tie & (idx % 2 == 1)).long()
    sign = torch.signbit(x).long()
    return (idx | (sign << 3)).to(torch.uint8)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., n) values, n a multiple of 32 -> (blocks (..., n/32, 16) U8, scales (..., n/32) U8)."""
    x = w.float().reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)
    ds = x.abs().amax(-1, keepdim=True) / 6.0
    bits = (ds.view(torch.int32) + 0x007FFFFF) & 0x7F800000  # round the scale up to a power of two
    scale = bits.view(torch.float32)
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
    codes = _e2m1_codes(x * inv)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous(), (bits >> 23).to(torch.uint8).squeeze(-1).contiguous()
