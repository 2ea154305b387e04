"""How close two tensors are, in the units their dtype can tell apart: pure tensors in, numbers out.

An *ulp* (unit in the last place) of a value ``x`` in a floating dtype is the gap between ``|x|`` and
the next representable number: ``2^(e-p)`` for ``|x|`` in ``[2^(e-1), 2^e)`` with ``p`` significand
bits (bf16 8, fp16 11, fp32 24).  Rounding to the nearest representable value moves a number by at
most half an ulp, so two honest merges of the same weights, rounded differently, differ by a
couple of ulps, while a wrong merge differs by many.

:class:`Agreement` accumulates, block by block, how far a merged tensor is from what it should be,
how far it is from the base, and the least-squares fit ``merged − base ≈ c·ΔW`` (the scale that
explains it, when a wrong scaling does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP32, FP64 = torch.float32, torch.float64
# A unit never finer than 2^-20 of the magnitude: two correct fp32 computations of the same merge (ΔW
# summed in another order, DoRA's norms) differ by a few fp32 ulps, which must not count as many units.
ARITHMETIC_BITS = 20


def significand_bits(dtype: torch.dtype) -> int:
    """``p``: bits of precision including the implicit one (bf16 8, fp16 11, fp32 24, fp64 53)."""
    return 1 - math.frexp(torch.finfo(dtype).eps)[1] + 1  # eps = 2^(1-p)


def unit_roundoff(dtype: torch.dtype) -> float:
    """The largest relative error of one rounding to ``dtype``: 2^-p."""
    return 2.0 ** -significand_bits(dtype)


def spacing(value: float, dtype: torch.dtype) -> float:
    """One ulp of ``dtype`` at the magnitude ``|value|`` (subnormal spacing at zero)."""
    fi = torch.finfo(dtype)
    tiny_gap = fi.tiny * 2.0 ** (1 - significand_bits(dtype))
    if value == 0 or not math.isfinite(value):
        return tiny_gap
    _, e = math.frexp(abs(value))
    return max(math.ldexp(1.0, e - significand_bits(dtype)), tiny_gap)


_EXPONENT_BITS = {FP32: (torch.int32, 0x7F800000), FP64: (torch.int64, 0x7FF0000000000000)}


def ulps(scale: torch.Tensor, dtype: torch.dtype, *, max_bits: int | None = None) -> torch.Tensor:
    """Element-wise ulp of ``dtype`` at the magnitudes ``|scale|`` (fp32 or fp64 in, same dtype out);
    with ``max_bits``, never finer than a ``max_bits``-bit significand's.

    Masking a float's bits to its exponent gives the power of two at or below it, 2^e; the gap
    between neighbours of a ``p``-bit significand there is 2^(e+1-p).  One pass, no frexp/ldexp."""
    p = significand_bits(dtype) if max_bits is None else min(max_bits, significand_bits(dtype))
    int_dtype, mask = _EXPONENT_BITS[scale.dtype]
    power = (scale.view(int_dtype) & mask).view(scale.dtype)
    return power.mul_(2.0 ** (1 - p)).clamp_min_(torch.finfo(dtype).tiny * 2.0 ** (1 - p))


def absmax(t: torch.Tensor) -> float:
    """max |t| with no temporary the size of ``t`` (0 for an empty tensor)."""
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t)
    return max(abs(float(lo)), abs(float(hi)))


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    return FP64 if dtype in (FP32, FP64) else FP32


@dataclass
class Agreement:
    """A merged tensor against its expected value (and the base), accumulated over its blocks.

    ``worst`` is the largest distance from the expected value in ulps of the merged dtype at the
    element's magnitude (the largest of merged, expected and base, so that cancellation does not
    inflate it; an ulp is at least 2^-20 of it, see ``ARITHMETIC_BITS``); ``worst_base`` the same
    against the base.  With a ΔW given, ``scale()`` is the
    least-squares ``c`` in ``merged − base ≈ c·ΔW`` and ``fits()`` says whether the residual of that
    fit is within rounding noise."""

    dtype: torch.dtype  # the merged tensor's dtype: ulps are counted in it
    worst: float = 0.0
    worst_base: float = 0.0
    worst_alt: float | None = None  # against an alternative expectation (e.g. DoRA without its rescaling)
    elements: int = 0
    nonfinite: int = 0  # NaN/Inf values in the merged tensor: no scale or fit speaks for them
    _dx: float = 0.0  # Σ (merged − base)·ΔW
    _xx: float = 0.0  # Σ ΔW²
    _dd: float = 0.0  # Σ (merged − base)²
    _noise: float = 0.0  # Σ ulp² at each element: the fit's rounding budget

    def add(
        self,
        merged: torch.Tensor,
        expected: torch.Tensor,
        base: torch.Tensor | None = None,
        delta: torch.Tensor | None = None,
        alt: torch.Tensor | None = None,
    ) -> None:
        """One block: the merged values, what they should be (same dtype), the base's values and the
        fp32 ΔW of the block (both optional), and an alternative expectation (optional)."""
        self.elements += merged.numel()
        if not merged.is_floating_point():
            self.worst = max(self.worst, 0.0 if torch.equal(merged, expected) else math.inf)
            if base is not None:
                self.worst_base = max(self.worst_base, 0.0 if torch.equal(merged, base) else math.inf)
            return
        work = FP32  # elementwise: exact enough, as a unit is never finer than 2^-20 (ARITHMETIC_BITS)
        self.nonfinite += merged.numel() - int(torch.isfinite(merged).sum())
        m = merged.to(work)
        b = base.to(work) if base is not None else None
        # The element's magnitude: the larger of merged and base (where they agree with the expected
        # value, it is the expected magnitude too; where they do not, the tensor is not ok anyway).
        scale = m.abs()
        if b is not None:
            scale = torch.maximum(scale, b.abs(), out=scale)
        unit = ulps(scale, self.dtype, max_bits=ARITHMETIC_BITS)
        self.worst = max(self.worst, _max_ratio(m - expected.to(work), unit))
        if alt is not None:
            self.worst_alt = max(self.worst_alt or 0.0, _max_ratio(m - alt.to(work), unit))
        if b is None:
            return
        d = m.sub_(b)  # merged − base (m is a copy)
        self.worst_base = max(self.worst_base, _max_ratio(d.abs(), unit))
        if delta is not None:
            # The fit's residual is a difference of nearly equal sums: accumulate them in fp64 where
            # the rounding budget is fp32-fine.
            acc = _sum_dtype(self.dtype)
            x, d, unit = (t.reshape(-1).to(acc) for t in (delta, d, unit))
            self._dx += float(torch.dot(d, x))
            self._xx += float(torch.dot(x, x))
            self._dd += float(torch.dot(d, d))
            self._noise += float(torch.dot(unit, unit))

    def scale(self) -> float | None:
        """c in ``merged − base ≈ c·ΔW`` (None without a ΔW, when ΔW is zero, or when the sums are not finite:
        a NaN in MERGED is no scale of ΔW)."""
        c = self._dx / self._xx if self._xx > 0 else None
        return c if c is not None and math.isfinite(c) else None

    def fits(self, tolerance_ulps: float) -> bool:
        """Whether ``base + c·ΔW`` explains the merged tensor up to rounding: the root-mean-square
        residual of the fit, in ulps, is within ``tolerance_ulps``."""
        c = self.scale()
        if c is None:
            return False
        residual = max(0.0, self._dd - c * self._dx)  # = Σ (d − c·x)² at the optimum
        return residual <= tolerance_ulps**2 * self._noise


def _max_ratio(diff: torch.Tensor, unit: torch.Tensor) -> float:
    """max |diff| / unit, with ``diff`` a temporary it may overwrite; NaN counts as infinitely far."""
    if diff.numel() == 0:
        return 0.0
    r = float(diff.abs_().div_(unit).max())
    return math.inf if math.isnan(r) else r
