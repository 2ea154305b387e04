"""bitsandbytes weights as transformers saves them: 4-bit (nf4/fp4, optional double quantization of the
block maxima) and 8-bit (``int8`` rows with their absmax ``SCB``).

Dequantization is plain torch, bit for bit what bitsandbytes' own kernels return (tested against them):
a merge that reads a 4-bit model should not need a 43 MB wheel that takes longer to import than torch.
Quantization for ``--requantize`` calls bitsandbytes itself (the ``quant`` extra), whose CPU kernel
rounds a few near-tie block maxima differently from any re-implementation: only the library gives the
bytes PEFT's own merge into a 4-bit model gives.

4-bit layout: the weight flattened row-major into blocks of ``blocksize`` values (blocks straddle rows),
two codes per byte with the even element in the high nibble; ``value = quant_map[code] · absmax[block]``.
With double quantization ``absmax`` holds 8-bit codes: ``absmax = nested_map[c] · nested_absmax[b/256] + offset``.
8-bit: ``W = (q · SCB[row]) · (1/127)``, the multiply by the Python float 1/127 bitsandbytes uses.
"""

from __future__ import annotations

import math

import torch

INV127 = 7.874015718698502e-3  # bitsandbytes' 1/127 (a multiply: q·SCB/127 differs in the last bit)


def unpack_4bit(packed: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Codes of elements ``first:first+count``; ``packed`` starts at the byte holding element ``first``."""
    p = packed.reshape(-1).to(torch.int64)
    codes = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)
    skip = first % 2
    return codes[skip : skip + count]


def absmax_values(
    absmax: torch.Tensor, first_block: int, nested: tuple[torch.Tensor, torch.Tensor, int, float] | None
) -> torch.Tensor:
    """fp32 block maxima; ``absmax`` holds blocks ``first_block:...`` (8-bit codes when ``nested`` is
    (nested_absmax, nested_quant_map, nested_blocksize, offset))."""
    if nested is None:
        return absmax.reshape(-1).float()
    n_absmax, n_map, n_block, offset = nested
    idx = torch.arange(first_block, first_block + absmax.numel()) // n_block
    return n_map.float()[absmax.reshape(-1).long()] * n_absmax.float()[idx] + offset


def dequantize_4bit(
    packed: torch.Tensor,
    first: int,
    count: int,
    absmax: torch.Tensor,
    first_block: int,
    blocksize: int,
    code: torch.Tensor,
) -> torch.Tensor:
    """fp32 elements ``first:first+count`` of the flattened weight.  ``absmax`` (fp32) covers the blocks
    from ``first_block``, the block of element ``first``."""
    codes = unpack_4bit(packed, first, count)
    blocks = torch.arange(first, first + count) // blocksize - first_block
    return code.float()[codes] * absmax[blocks]


def code_pairs(code: torch.Tensor) -> torch.Tensor:
    """(256, 2) fp32: the two values each packed byte holds (high nibble first), for a one-gather decode."""
    c = code.float().reshape(-1)
    b = torch.arange(256)
    return torch.stack([c[b >> 4], c[b & 0xF]], dim=1)


def dequantize_4bit_aligned(
    packed: torch.Tensor, count: int, absmax: torch.Tensor, blocksize: int, pairs: torch.Tensor
) -> torch.Tensor:
    """:func:`dequantize_4bit` for a run that starts on a block boundary at an even element (so ``packed``
    starts with it, and ``absmax`` with its block): the same fp32 products ``code[c] · absmax[block]``, from
    one gather of value pairs per byte and one multiply per block — no int64 code or block index per element."""
    p = packed.reshape(-1)[: (count + 1) // 2]
    vals = torch.index_select(pairs, 0, p.to(torch.int32)).reshape(-1)[:count]
    whole = count // blocksize
    if whole:
        vals[: whole * blocksize].view(whole, blocksize).mul_(absmax[:whole].reshape(-1, 1))
    if count > whole * blocksize:
        vals[whole * blocksize :].mul_(absmax[whole])
    return vals


def dequantize_int8_rows(q: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """fp32 rows of an 8-bit weight, as ``int8_vectorwise_dequant``."""
    return q * scb.float().view(-1, 1) * INV127


def functional():  # type: ignore[no-untyped-def]
    """bitsandbytes.functional, or the error that says how to get it."""
    from ..errors import UnsupportedError
    from ..third_party import import_quietly

    try:
        F = import_quietly("bitsandbytes.functional")
    except ImportError:
        raise UnsupportedError(
            "re-quantizing into bitsandbytes needs bitsandbytes itself",
            hint="pip install 'lora-convert[quant]', or merge without --requantize",
        ) from None
    return F


def quantize_4bit_chunk(values: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, fp32 block maxima) of a run of flattened values that starts on a block boundary
    (and has a whole number of blocks, unless it is the last run)."""
    F = functional()
    packed, state = F.quantize_4bit(values.reshape(-1).float(), blocksize=blocksize, quant_type=quant_type)
    return packed.reshape(-1), state.absmax.float()


def compress_absmax(
    absmax: torch.Tensor, nested_blocksize: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Double quantization of a whole tensor's block maxima, as ``quantize_4bit(compress_statistics=True)``:
    (8-bit codes, nested_absmax, nested_quant_map, offset)."""
    F = functional()
    offset = absmax.mean()
    codes, state2 = F.quantize_blockwise(absmax - offset, blocksize=nested_blocksize)
    return codes, state2.absmax.float(), state2.code.float(), offset.item()


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, fp32 SCB) through ``int8_vectorwise_quant`` (no outlier threshold: stored weights have none)."""
    F = functional()
    q, scb, _ = F.int8_vectorwise_quant(w.float(), threshold=0.0)
    return q, scb.float()


def blocks_of(numel: int, blocksize: int) -> int:
    return math.ceil(numel / blocksize)
