"""How close two tensors are, and how close they must be: pure tensors in, numbers out.

An *ulp* (unit in the last place) of a value ``x`` in a floating dtype is the gap between ``|x|`` and
the next representable number: ``2^(e-p)`` for ``|x|`` in ``[2^(e-1), 2^e)`` with ``p`` significand
bits (bf16 8, fp16 11, fp32 24).  Rounding to the nearest representable value moves a number by at
most half an ulp, that is by at most ``u·|x|`` with the *unit roundoff* ``u = 2^-p``.

:func:`merge_bound` and :func:`dora_bound` give, per element, how far two correct computations of
the same merge may lie apart (the bound verify judges by, derived in ``routes/verify.py``'s
docstring); :class:`Agreement` accumulates, block by block, how far a merged tensor is from what it
should be in units of that bound, how far it is from the base, and the least-squares fit
``merged − base ≈ c·ΔW`` with the uncertainty of ``c`` (the scale that explains it, when a wrong
scaling does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

FP32, FP64 = torch.float32, torch.float64


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
_HALF_EXPONENT = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}  # the exponent field of a 16-bit pattern
_BF16_ULP_SHIFT = 7 << 7  # a bf16 ulp is its power of two times 2⁻⁷: 7 less in the exponent field (bits 7–14)


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


Scratch = Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor]  # (role, shape, dtype) -> a reused tensor
U32 = 2.0**-24  # fp32's unit roundoff: every fp32 operation's relative error is at most this
CAP = 1 / 16  # slack and extra ulps never widen an element's tolerance beyond this fraction of its magnitude


def gamma(k: int) -> float:
    """γ_k = k·u/(1 − k·u): the relative error bound of a sum of ``k`` products in fp32, in any order
    (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1), relative to Σ|aᵢ·bᵢ|."""
    return k * U32 / (1 - k * U32) if k * U32 < 0.5 else math.inf


def _half(dtype: torch.dtype) -> bool:
    return significand_bits(dtype) < significand_bits(FP32)


@dataclass(frozen=True)
class MergeBound:
    """Per-element bound of ``round(W + Σ sᵢ·Bᵢ·Aᵢ)`` computed twice, differently:
    ``w·|W| + Σ termsᵢ·|sᵢ|·(|Bᵢ|·|Aᵢ|)`` — the output rounding comes on top (see :class:`Agreement`)."""

    w: float
    terms: tuple[float, ...]


def merge_bound(ranks: list[int], out_dtype: torch.dtype, base_dtype: torch.dtype) -> MergeBound:
    """The coefficients for ``n = len(ranks)`` LoRAs of ranks ``rᵢ`` summed into a weight, MERGED stored
    in ``out_dtype`` (unit roundoff ``uₘ``), BASE in ``base_dtype``.  Each of the two computations (ours, and
    PEFT's or any other correct one) makes, in fp32: the rank-rᵢ dot product (γ_rᵢ·Pᵢ with Pᵢ = |sᵢ|·|Bᵢ|·|Aᵢ|),
    the scaling (u·Pᵢ) and n additions (u·(|W| + ΣPⱼ) each): twice that.  PEFT's merge may also round each
    ΔWᵢ to the weight's dtype (uₘ·Pᵢ), round after each adapter but the last ((n−1)·uₘ·(|W| + ΣPⱼ)), and
    — where BASE is finer than MERGED — start from W rounded to MERGED's dtype (uₘ·|W|)."""
    n, um = len(ranks), unit_roundoff(out_dtype)
    if n == 0:
        return MergeBound(0.0, ())
    pre = um if significand_bits(base_dtype) > significand_bits(out_dtype) else 0.0
    w = 2 * n * U32 + (n - 1) * um + pre
    return MergeBound(w, tuple(2 * (gamma(r) + (n + 1) * U32) + n * um for r in ranks))


@dataclass(frozen=True)
class DoraBound:
    """Per-element bound of DoRA's ``round(f·(W + ΔW))``, ``f = m/‖W + ΔW‖`` per output feature, computed
    twice: ``|f|·(w·|W| + p·P) + 2ρ·|E|`` with P = |s|·|B|·|A|, E the expected value, and the norm's relative
    error ``ρ = rho + rho_p·‖P‖/‖W + ΔW‖`` per output feature (see :func:`dora_bound`)."""

    w: float
    p: float
    rho: float
    rho_p: float


def dora_bound(rank: int, reduced: int, out_dtype: torch.dtype) -> DoraBound:
    """DoRA on one LoRA of rank ``rank`` whose norms sum ``reduced`` squares.

    V = W + ΔW is off by δV ≤ (γ_r + 3u)·P + u·|W| in fp32 (product, scaling, addition; ΔW rounded to
    MERGED's dtype: uₘ·P more).  The norm of V: its sum of squares in any order is within γ_(L+1) relative
    (L = ``reduced`` terms), its square root halves that and adds u; δV moves it by at most ‖δV‖, bounded
    through ‖P‖ ≤ |s|·‖B‖·‖A‖ per feature; in half precision PEFT may hold V in the weight's dtype (uₘ
    relative); f = m/N and f·V add 2u.  So per side ρ = ½γ_(L+1) + 4u (+ uₘ) + ((r + 4)·u + uₘ)·‖P‖/N, and
    the element's error ≤ |f|·δV + ρ·|E|: the bound is twice that."""
    um = unit_roundoff(out_dtype)
    rho = gamma(reduced + 1) / 2 + 4 * U32 + (um if _half(out_dtype) else 0.0)
    return DoraBound(w=2 * U32, p=2 * (gamma(rank) + 3 * U32) + um, rho=rho, rho_p=(rank + 4) * U32 + um)


@dataclass
class Agreement:
    """A merged tensor against its expected value (and the base), accumulated over its blocks.

    Every element gets a *bound*: one ulp of MERGED's dtype at its magnitude (the larger of merged and
    expected: two results rounded differently) plus the arithmetic bound the caller gives
    (:func:`merge_bound`, :func:`dora_bound`).  Its *tolerance* is ``slack·bound + extra_ulps·ulp``,
    widened by slack or extra ulps never beyond ``CAP`` of its magnitude (nor below the bound), so that
    no option makes a random tensor pass.  ``worst`` is the largest ``|merged − expected| / tolerance``
    (ok when ≤ 1), ``worst_bound`` the same in units of the bound, ``worst_ulps`` in ulps; ``worst_base``
    against the base — measured until it passes 1, which is all it is read for ("equals the base" or not).
    With a ΔW given, ``scale()`` is the least-squares ``c`` in ``merged − base ≈ c·ΔW``
    with its uncertainty, and ``fits()`` says whether the fit's residual is within the tolerances."""

    dtype: torch.dtype  # the merged tensor's dtype: ulps are counted in it
    slack: float = 1.0
    extra_ulps: float = 0.0
    worst: float = 0.0
    worst_bound: float = 0.0
    worst_ulps: float = 0.0
    worst_base: float = 0.0
    worst_alt: float | None = None  # against an alternative expectation (e.g. DoRA without its rescaling)
    elements: int = 0
    beyond: int = 0  # elements beyond their tolerance
    nonfinite: int = 0  # NaN or Inf elements of MERGED
    _dx: float = 0.0  # Σ (merged − base)·ΔW
    _xx: float = 0.0  # Σ ΔW²
    _dd: float = 0.0  # Σ (merged − base)²
    _tt: float = 0.0  # Σ tolerance²: the fit's residual budget, and the uncertainty of c
    scratch: Scratch | None = field(default=None, repr=False)  # a worker's reusable temporaries (pipeline)
    _pool: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def add(
        self,
        merged: torch.Tensor,
        expected: torch.Tensor,
        base: torch.Tensor | None = None,
        bound: torch.Tensor | None = None,
        delta: torch.Tensor | None = None,
        alt: torch.Tensor | None = None,
    ) -> None:
        """One block: the merged values, what they should be, the base's values, the arithmetic part of
        each element's bound (fp32, overwritten), the fp32 ΔW of the block for the scale fit, and an
        alternative expectation (all optional but the first two)."""
        self.elements += merged.numel()
        if merged.numel() == 0:
            return
        if not merged.is_floating_point():
            self.worst = max(self.worst, 0.0 if torch.equal(merged, expected) else math.inf)
            self.worst_bound = self.worst_ulps = self.worst
            if base is not None:
                self.worst_base = max(self.worst_base, 0.0 if torch.equal(merged, base) else math.inf)
            return
        if self._add_equal(merged, expected, base, bound, delta, alt):
            return
        work = FP64 if merged.dtype == FP64 else FP32  # fp32 holds every narrower dtype exactly
        shape = merged.shape
        m, e = self._as(merged, "m", work), self._as(expected, "e", work)
        unit = self._ulp_of_larger(m, e, merged, expected)  # one ulp at the element's magnitude
        tol = unit if bound is None else bound.view(shape).add_(unit)  # the bound
        diff = torch.sub(m, e, out=self._tmp("diff", shape, work))
        scratch = self._tmp("scratch", shape, work)
        lo, hi = torch.aminmax(diff)
        exact = float(lo) == 0 and float(hi) == 0  # merged == expected everywhere (NaN is not): 0 ulps, 0 bounds
        if not exact:
            self.worst_ulps = max(self.worst_ulps, _absmax(torch.div(diff, unit, out=scratch)))
        b = self._as(base, "b", work) if base is not None else None
        if self.slack != 1 or self.extra_ulps:  # rare: allocates
            if not exact:
                self.worst_bound = max(self.worst_bound, _absmax(diff / tol))
            cap = e.abs() if b is None else torch.maximum(e.abs(), b.abs())
            tol = torch.minimum(tol * self.slack + unit * self.extra_ulps, torch.maximum(cap.mul_(CAP), tol))
        if not exact:
            ratio = diff.div_(tol)
            r = _absmax(ratio)
            if self.slack == 1 and not self.extra_ulps:
                self.worst_bound = max(self.worst_bound, r)
            self.worst = max(self.worst, r)
            if r > 1:  # the slow path, for tensors that fail: how many elements, how many not finite
                self.beyond += int((ratio.abs_() > 1).sum())
                if math.isinf(r):
                    self.nonfinite += int((~torch.isfinite(m)).sum())
        if alt is not None:
            self.worst_alt = max(self.worst_alt or 0.0, _absmax(torch.sub(m, alt, out=scratch).div_(tol)))
        if b is None:
            return
        d = torch.sub(m, b, out=self._tmp("d", shape, work))  # merged − base
        if self.worst_base <= 1:  # once past 1 it says "not the base", whatever more it would find
            self.worst_base = max(self.worst_base, _absmax(torch.div(d, tol, out=scratch)))
        if delta is not None:
            self._fit(shape, delta, d, tol)

    def _add_equal(
        self,
        merged: torch.Tensor,
        expected: torch.Tensor,
        base: torch.Tensor | None,
        bound: torch.Tensor | None,
        delta: torch.Tensor | None,
        alt: torch.Tensor | None,
    ) -> bool:
        """The common block, in fewer passes: MERGED's bits equal the expected block's (a merge checked by the
        code that wrote it), both in MERGED's half-precision dtype, all finite, the tolerance the plain bound.
        Then every distance is 0 and the ulp at the larger magnitude is the ulp at MERGED's: what :meth:`add`
        would compute, with none of its passes over the difference (the same tolerance, base distance and fit,
        bit for bit).  False, having changed nothing, for any other block."""
        half = _HALF_EXPONENT.get(self.dtype)
        if (
            half is None
            or alt is not None
            or self.slack != 1
            or self.extra_ulps
            or merged.dtype != self.dtype
            or expected.dtype != self.dtype
            or not (merged.is_contiguous() and expected.is_contiguous())
            or not _same_bits(merged, expected)
        ):
            return False
        shape = merged.shape
        hi = torch.bitwise_and(merged.view(torch.int16), half, out=self._tmp("hi16", shape, torch.int16))
        lo, top = (int(v) for v in torch.aminmax(hi))
        if top == half:  # Inf or NaN (its exponent field all ones): add() counts them
            return False
        p = significand_bits(self.dtype)
        unit = self._tmp("power", shape, FP32)
        if self.dtype == torch.bfloat16 and lo > _BF16_ULP_SHIFT:
            # Every |merged| ≥ 2⁻¹¹⁹: its ulp 2^(e−7) is a normal bf16 whose exponent field is e's less 7, so
            # the ulps are the exponent patterns less 7 << 7, widened exactly (one pass instead of three)
            unit.copy_(hi.sub_(_BF16_ULP_SHIFT).view(self.dtype))
        else:
            unit.copy_(hi.view(self.dtype)).mul_(2.0 ** (1 - p)).clamp_min_(
                torch.finfo(self.dtype).tiny * 2.0 ** (1 - p)
            )
        tol = unit if bound is None else bound.view(shape).add_(unit)
        if base is None:
            return True
        m, b = self._as(merged, "m", FP32), self._as(base, "b", FP32)
        d = torch.sub(m, b, out=self._tmp("d", shape, FP32))  # merged − base
        if self.worst_base <= 1:
            self.worst_base = max(self.worst_base, _absmax(torch.div(d, tol, out=self._tmp("scratch", shape, FP32))))
        if delta is not None:
            self._fit(shape, delta, d, tol)
        return True

    def _fit(self, shape: torch.Size, delta: torch.Tensor, d: torch.Tensor, tol: torch.Tensor) -> None:
        """Σ d·ΔW, Σ ΔW², Σ d², Σ tol² of one block, for :meth:`scale` and :meth:`fits`."""
        # The fit's residual is a difference of nearly equal sums: accumulate them in fp64 where the
        # tolerance is fp32-fine (fp32 sums suffice against a half-precision tolerance).
        acc = FP64 if not _half(self.dtype) else FP32
        x, d, t = (self._as(v.reshape(shape), f"fit{i}", acc).view(-1) for i, v in enumerate((delta, d, tol)))
        self._dx += float(torch.dot(d, x))
        self._xx += float(torch.dot(x, x))
        self._dd += float(torch.dot(d, d))
        self._tt += float(torch.dot(t, t))

    def _tmp(self, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A block-sized temporary kept across blocks: allocating one per operation (page faults) costs more
        than the arithmetic."""
        if self.scratch is not None:
            return self.scratch(f"agreement-{name}", tuple(shape), dtype)
        t = self._pool.get(name)
        if t is None or t.shape != shape or t.dtype != dtype:
            t = self._pool[name] = torch.empty(shape, dtype=dtype)
        return t

    def _as(self, t: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
        """``t`` in ``dtype`` (itself when it is, else a pooled copy); contiguous."""
        if t.dtype == dtype and t.is_contiguous():
            return t
        return self._tmp(name, t.shape, dtype).copy_(t)

    def _ulp_of_larger(self, m: torch.Tensor, e: torch.Tensor, ms: torch.Tensor, es: torch.Tensor) -> torch.Tensor:
        """ulp of the merged dtype at max(|m|, |e|) (fp32 or fp64 in, same out; ``ms``, ``es`` the same blocks
        as stored): the larger exponent of the two, read from their bits (the sign bit masked away), times
        2^(1-p) — no abs or maximum of floats."""
        p = significand_bits(self.dtype)
        floor = torch.finfo(self.dtype).tiny * 2.0 ** (1 - p)
        half = _HALF_EXPONENT.get(self.dtype)
        if half is not None and ms.dtype == es.dtype == self.dtype:
            # Both stored in MERGED's half-precision dtype: the exponents from their 16-bit patterns (half the
            # bytes of fp32's).  Masked to its exponent, a bf16/fp16 pattern is the power of two at or below |x|
            # (0 for a subnormal, Inf for Inf/NaN), which fp32 holds exactly: the 2^e fp32's bits give, and a
            # subnormal's fp32 power times 2^(1-p) lies below the floor either way.
            hi = torch.bitwise_and(ms.view(torch.int16), half, out=self._tmp("hi16", m.shape, torch.int16))
            lo = torch.bitwise_and(es.view(torch.int16), half, out=self._tmp("lo16", m.shape, torch.int16))
            torch.maximum(hi, lo, out=hi)
            power = self._tmp("power", m.shape, m.dtype).copy_(hi.view(self.dtype))
            return power.mul_(2.0 ** (1 - p)).clamp_min_(floor)
        int_dtype, mask = _EXPONENT_BITS[m.dtype]
        hi = torch.bitwise_and(m.view(int_dtype), mask, out=self._tmp("hi", m.shape, int_dtype))
        lo = torch.bitwise_and(e.view(int_dtype), mask, out=self._tmp("lo", m.shape, int_dtype))
        torch.maximum(hi, lo, out=hi)
        return hi.view(m.dtype).mul_(2.0 ** (1 - p)).clamp_min_(floor)

    def scale(self) -> float | None:
        """c in ``merged − base ≈ c·ΔW`` (None without a ΔW, or when ΔW is zero)."""
        return self._dx / self._xx if self._xx > 0 and math.isfinite(self._dx) else None

    def scale_uncertainty(self) -> float | None:
        """How far the fitted c may lie from the true scale when every element is off by up to its
        tolerance: Σ tol·|ΔW| / Σ ΔW² in the worst case (errors all pushing one way), bounded here by
        Cauchy–Schwarz as √(Σ tol² / Σ ΔW²), which needs no extra pass."""
        return math.sqrt(self._tt / self._xx) if self._xx > 0 else None

    def fits(self) -> bool:
        """Whether ``base + c·ΔW`` explains the merged tensor up to rounding: the root-mean-square
        residual of the fit is within the root-mean-square tolerance."""
        c = self.scale()
        if c is None:
            return False
        residual = max(0.0, self._dd - c * self._dx)  # = Σ (d − c·x)² at the optimum
        return residual <= self._tt

    def scale_is_wrong(self) -> bool:
        """c fits and lies measurably away from 1."""
        c, dc = self.scale(), self.scale_uncertainty()
        return c is not None and dc is not None and self.fits() and abs(c - 1) > dc


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous tensors of one dtype hold the same bytes, compared 8 at a time where they
    align (a third of the time of a 2-byte comparison)."""
    n = a.numel() * a.element_size()
    if (
        n % 8 == 0
        and (a.storage_offset() * a.element_size()) % 8 == 0
        and (b.storage_offset() * b.element_size()) % 8 == 0
    ):
        return torch.equal(a.reshape(-1).view(torch.int64), b.reshape(-1).view(torch.int64))
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _absmax(t: torch.Tensor) -> float:
    """max |t| in one pass (0 when empty); NaN counts as infinitely far."""
    if t.numel() == 0:
        return 0.0
    lo, hi = (float(v) for v in torch.aminmax(t))
    return math.inf if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)
