"""fp8 e4m3 weights scaled per block of a grid: DeepSeek-V3 / Qwen3-FP8 (``quant_method: fp8``, 128×128
blocks, ``weight_scale_inv``) and compressed-tensors' ``float-quantized`` format (``weight_scale`` per
tensor, per output channel or per block).

Every scheme is a block grid: a per-tensor scale is one block as large as the tensor, a per-channel one
a block of one row by every column.  Edge blocks are partial (the grid is ``ceil(out/bh) × ceil(in/bw)``)
and are zero-padded when their scale is computed, as DeepSeek's weight conversion does; the block size
always comes from the config, since a shape alone fits several (320 columns in 3 blocks: 107 or 128).

Dequantization multiplies (``weight_scale_inv`` is, despite its name, the dequantization scale) in fp32:
``float32(q) · float32(s)``, which is what transformers, DeepSeek's kernel and compressed-tensors compute
(compressed-tensors rounds the product to its bf16 scale dtype, which the caller does by casting).
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def grid(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    """The scale grid of a (rows, cols) weight in blocks of ``block``."""
    return -(-rows // block[0]), -(-cols // block[1])


def row_scales(scale: torch.Tensor, start: int, stop: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """fp32 scale of every element of rows ``start:stop`` (a (stop-start, cols) tensor)."""
    bh, bw = block
    s = scale.float().reshape(1, 1) if scale.numel() == 1 else scale.float().reshape(scale.shape[0], -1)
    s = s.expand(s.shape[0], cols) if s.shape[1] == 1 else s.repeat_interleave(bw, dim=1)[:, :cols]
    if s.shape[0] == 1:
        return s.expand(stop - start, cols)
    return s[torch.arange(start, stop) // bh]


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, start: int, block: tuple[int, int]) -> torch.Tensor:
    """fp32 rows ``start:start+len(q)`` of an fp8 weight: ``float32(q) · scale`` of each element's block."""
    return q.float().mul_(row_scales(scale, start, start + q.shape[0], q.shape[1], block))


def dequantize_rows_into(
    q: torch.Tensor, scale: torch.Tensor, start: int, block: tuple[int, int], out: torch.Tensor
) -> torch.Tensor:
    """:func:`dequantize_rows` written into ``out`` (fp32, ``q``'s shape), bit for bit the same products:
    the fp8 values converted into ``out`` in one pass, then each band of rows that shares a block row
    multiplied in place by its row of column scales — no (rows, cols) scale tensor."""
    bh, bw = block
    rows, cols = q.shape
    if q.dtype == FP8:  # the values by a 256-entry table: torch's own fp8 → fp32 cast is scalar (~3× slower)
        torch.index_select(_e4m3_values(), 0, q.view(torch.uint8).reshape(-1).to(torch.int32), out=out.view(-1))
    else:
        out.copy_(q)
    if scale.numel() == 1:
        return out.mul_(scale.float().reshape(1, 1))
    s = scale.float().reshape(scale.shape[0], -1)
    per_col = s if s.shape[1] == 1 else s.repeat_interleave(bw, dim=1)[:, :cols]  # (grid rows, cols or 1)
    if per_col.shape[0] == 1:
        return out.mul_(per_col)
    first, last = start // bh, (start + rows - 1) // bh
    if last - first >= 16:  # many thin bands (a scale per row): one indexed scale tensor instead
        return out.mul_(per_col[torch.arange(start, start + rows) // bh])
    for band in range(first, last + 1):
        a, b = max(start, band * bh) - start, min(start + rows, (band + 1) * bh) - start
        out[a:b].mul_(per_col[band])
    return out


_E4M3: list[torch.Tensor] = []


def _e4m3_values() -> torch.Tensor:
    """fp32 value of each of the 256 e4m3fn codes (NaN for 0x7F and 0xFF), made once."""
    if not _E4M3:
        _E4M3.append(torch.arange(256, dtype=torch.uint8).view(FP8).float())
    return _E4M3[0]


def has_nan_code(q: torch.Tensor) -> bool:
    """Whether an e4m3fn tensor holds a NaN (its only non-finite codes: 0x7F and 0xFF), read from its bytes
    (a quarter of the memory an fp32 check of the dequantized values reads)."""
    if q.numel() == 0:
        return False
    low = torch.bitwise_and(q.view(torch.uint8), 0x7F)
    return int(low.max()) == 0x7F


def tile_amax(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """max |w| of every (zero-padded) block of ``w``, whose rows start on a block boundary."""
    bh, bw = block
    rows, cols = w.shape
    gr, gc = grid(rows, cols, block)
    padded = torch.zeros(gr * bh, gc * bw, dtype=torch.float32)
    padded[:rows, :cols] = w
    return padded.view(gr, bh, gc, bw).abs().amax(dim=(1, 3))


def quantize_fp8_block(
    w: torch.Tensor,
    block: tuple[int, int],
    *,
    ue8m0: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, ``weight_scale_inv``) of fp32 rows that start on a block boundary — transformers'
    ``Fp8Quantize`` (scale 448/amax per block, 1 for an all-zero block, weights multiplied by it and
    clamped), with DeepSeek's zero-padded edge blocks where the shape is not a multiple of the block.
    ``ue8m0`` rounds the stored inverse up to a power of two first (DeepSeek-V3.1's ``scale_fmt``); a
    stored dtype narrower than fp32 quantizes with the scale as stored.  ``amax`` overrides the blocks'
    own (one scale for a whole tensor needs the whole tensor's)."""
    amax = tile_amax(w, block) if amax is None else amax.reshape(1, 1)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    fwd = torch.where(amax > 0, FP8_MAX / safe, torch.ones_like(amax))
    inv = (1.0 / fwd).to(torch.float32)
    if ue8m0:
        inv = torch.pow(2.0, torch.ceil(torch.log2(inv.clamp(min=torch.finfo(torch.float32).tiny))))
        fwd = 1.0 / inv
    stored = inv.to(scale_dtype)
    if scale_dtype != torch.float32 and not ue8m0:
        fwd = 1.0 / stored.float()
    rows, cols = w.shape
    q = (w * row_scales(fwd, 0, rows, cols, block)).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, stored


def quantize_fp8_divided(
    w: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, ``weight_scale``) the compressed-tensors way: scale = amax/448 in ``scale_dtype`` (its
    epsilon for an all-zero block), weights divided by the stored scale and clamped.  ``amax`` overrides
    the blocks' own (a per-tensor scale needs the whole tensor's)."""
    amax = tile_amax(w, block) if amax is None else amax.reshape(1, 1)
    scale = (amax / FP8_MAX).to(scale_dtype)
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(scale_dtype).eps), scale)
    rows, cols = w.shape
    q = (w / row_scales(scale, 0, rows, cols, block)).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale
