"""ΔW of the LyCORIS-family tuners (LoHa, LoKr), pure tensors in and out: no files, no config parsing.

Each class here is a :class:`lora_math.RowDelta`: the merge engine asks it for the fp32 rows
``start:stop`` of ΔW in the stored weight's (out, in·k…) layout and adds them into the same tile as
LoRA's ``addmm`` (rounded once).  The formulas are PEFT's ``get_delta_weight`` (``peft/tuners/loha`` and
``lokr``, copies of LyCORIS's), evaluated a block of output rows at a time where the structure allows:

* LoHa: ΔW = s · (w1a·w1b) ⊙ (w2a·w2b) — rows of a Hadamard product are the products of the rows, so a
  block is two rank-r GEMMs on ``w1a[rows]``/``w2a[rows]``.  With Tucker cores (``hada_t1/t2``, PEFT's
  ``use_effective_conv2d`` on a k×k conv) each side is ``einsum("ijkl,jr,ip->prkl", t, w_b, w_a)`` and
  ``w_a`` is (r, out): its columns ``rows`` give the block.
* LoKr: ΔW = s · kron(w1, w2) with w1 (a, c) and w2 (b, d[, k…]) — each either whole or a product
  ``w_a @ w_b`` (w2 also a Tucker rebuild ``einsum("ijkl,ip,jr->prkl", t2, w2a, w2b)``).  Row i of the
  product is ``w1[i // b] ⊗ w2[i % b]``: an outer product of two small rows.  The one layout that is
  not a row-wise Kronecker product of the stored weight — PEFT's Conv1d with a whole 3-D w2, where
  ``torch.kron`` pads w1 to (1, a, c) and the result is reshaped to the weight — is built whole once
  (one tensor's fp32 ΔW) and sliced, so it still equals what PEFT merges.

``rank_dropout`` and ``module_dropout`` only act in training: the merged ΔW has neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .lora_math import FP32


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(FP32).contiguous()


def tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS's CP/Tucker rebuild (out, in, k1, k2) from a core t (r, r, k1, k2), wa (r, out) and wb (r, in):
    ``einsum("i j k l, j r, i p -> p r k l", t, wb, wa)`` — PEFT's LoHa spelling of the same sum."""
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)


@dataclass
class LohaDelta:
    """ΔW = scaling · (w1a·w1b) ⊙ (w2a·w2b) on a weight of ``shape`` = (out, cols) (a conv's flattened).

    Without Tucker cores w1a/w2a are (out, r) and w1b/w2b (r, cols); with them (``t1``/``t2`` (r, r, k…))
    w1a/w2a are (r, out), w1b/w2b (r, in) and the rows are cut from each Tucker rebuild."""

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    scaling: float
    shape: tuple[int, int]
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        w1a: torch.Tensor,
        w1b: torch.Tensor,
        w2a: torch.Tensor,
        w2b: torch.Tensor,
        scaling: float,
        shape: tuple[int, ...],
        t1: torch.Tensor | None = None,
        t2: torch.Tensor | None = None,
    ) -> LohaDelta:
        """The factors in fp32 for a stored weight of ``shape`` (any rank: a conv is seen as (out, in·k…))."""
        flat = (int(shape[0]), math.prod(shape[1:]))
        t = (_f32(t1), _f32(t2)) if t1 is not None and t2 is not None else (None, None)
        return cls(_f32(w1a), _f32(w1b), _f32(w2a), _f32(w2b), scaling, flat, *t)

    @property
    def tucker(self) -> bool:
        return self.t1 is not None

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """fp32 ΔW rows ``start:stop``, (stop - start, cols)."""
        n = stop - start
        if self.t1 is not None and self.t2 is not None:
            one = tucker(self.t1, self.w1a[:, start:stop], self.w1b).reshape(n, -1)
            two = tucker(self.t2, self.w2a[:, start:stop], self.w2b).reshape(n, -1)
        else:
            one = torch.mm(self.w1a[start:stop], self.w1b)
            two = torch.mm(self.w2a[start:stop], self.w2b)
        return one.mul_(two).mul_(self.scaling)

    def add_rows(self, acc: torch.Tensor, start: int, stop: int) -> None:
        acc.add_(self.rows(start, stop))

    @property
    def depth(self) -> int:
        """Each side is a dot product of length r (Tucker: r² triple products), then ⊙ and the scaling."""
        if self.t1 is not None and self.t2 is not None:
            return self.t1.shape[0] ** 2 + self.t2.shape[0] ** 2 + 6
        return self.w1a.shape[1] + self.w2a.shape[1] + 2

    def magnitude(self, scale: float) -> LohaDelta:
        """The same product on the factors' absolute values, times ``scale · |s|``."""
        t1 = self.t1.abs() if self.t1 is not None else None
        t2 = self.t2.abs() if self.t2 is not None else None
        w1a, w1b, w2a, w2b = (x.abs() for x in (self.w1a, self.w1b, self.w2a, self.w2b))
        return LohaDelta(w1a, w1b, w2a, w2b, scale * abs(self.scaling), self.shape, t1, t2)

    def to(self, device: torch.device | str) -> LohaDelta:
        t1 = self.t1.to(device) if self.t1 is not None else None
        t2 = self.t2.to(device) if self.t2 is not None else None
        w1a, w1b, w2a, w2b = (x.to(device) for x in (self.w1a, self.w1b, self.w2a, self.w2b))
        return LohaDelta(w1a, w1b, w2a, w2b, self.scaling, self.shape, t1, t2)


@dataclass
class LokrDelta:
    """ΔW = scaling · kron(w1, w2) reshaped to a weight of ``shape`` = (out, cols).

    ``w1`` is (a, c) and ``w2`` (b, d) or (b, d, k1, k2) with a·b = out: row i is w1[i // b] ⊗ w2[i % b].
    ``dense`` holds the whole ΔW instead, for the layout that is not a row-wise product (see the module)."""

    w1: torch.Tensor
    w2: torch.Tensor
    scaling: float
    shape: tuple[int, int]
    dense: torch.Tensor | None = None
    bounds: tuple[torch.Tensor, torch.Tensor, int] | None = None  # |w1|, |w2| rebuilt from |factors|, depth

    @classmethod
    def build(
        cls,
        w1: torch.Tensor,
        w2: torch.Tensor,
        scaling: float,
        shape: tuple[int, ...],
        bounds: tuple[tuple[torch.Tensor, int], tuple[torch.Tensor, int]] | None = None,
    ) -> LokrDelta:
        """From the rebuilt w1 and w2 (see :func:`lokr_side`) and, for verify, each side's
        :func:`lokr_side_bound` (default: the sides are exact, stored whole); raises ValueError when
        kron(w1, w2) has not the weight's number of elements or rows."""
        w1, w2 = _f32(w1), _f32(w2)
        b = (bounds[0][0], bounds[1][0], bounds[0][1] + bounds[1][1]) if bounds is not None else None
        flat = (int(shape[0]), math.prod(shape[1:]))
        if w1.dim() != 2 or w2.dim() not in (2, 3, 4):
            raise ValueError(f"w1 {list(w1.shape)} and w2 {list(w2.shape)} are not LoKr factors")
        if w1.numel() * w2.numel() != flat[0] * flat[1]:
            raise ValueError(
                f"kron of w1 {list(w1.shape)} and w2 {list(w2.shape)} has {w1.numel() * w2.numel()} elements, "
                f"the weight {list(shape)} has {flat[0] * flat[1]}"
            )
        if w2.dim() == 4 and len(shape) == 4 and (w1.shape[1] * w2.shape[1], *w2.shape[2:]) != tuple(shape[1:]):
            raise ValueError(f"kron of w1 {list(w1.shape)} and w2 {list(w2.shape)} is not a kernel {list(shape)}")
        if w2.dim() == 3:  # torch.kron pads w1 to (1, a, c): not row-wise; built as PEFT builds it
            dense = _kron(w1, w2).mul_(scaling).reshape(flat)
            return cls(w1, w2, scaling, flat, dense, b)
        if w1.shape[0] * w2.shape[0] != flat[0]:
            raise ValueError(
                f"kron of w1 {list(w1.shape)} and w2 {list(w2.shape)} has {w1.shape[0] * w2.shape[0]} rows, "
                f"the weight {list(shape)} has {flat[0]}"
            )
        return cls(w1, w2, scaling, flat, None, b)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """fp32 ΔW rows ``start:stop``, (stop - start, cols)."""
        if self.dense is not None:
            return self.dense[start:stop].clone()
        b = self.w2.shape[0]
        idx = torch.arange(start, stop, device=self.w1.device)
        one = self.w1[idx // b]  # (n, c)
        two = self.w2[idx % b]  # (n, d, k…)
        n = stop - start
        out = one.reshape(n, one.shape[1], *([1] * (two.dim() - 1))) * two.unsqueeze(1)
        return out.mul_(self.scaling).reshape(n, -1)

    def add_rows(self, acc: torch.Tensor, start: int, stop: int) -> None:
        acc.add_(self.rows(start, stop))

    @property
    def depth(self) -> int:
        """Each side's own (a product a @ b: its rank), then the Kronecker product and the scaling."""
        return (self.bounds[2] if self.bounds is not None else 0) + 2

    def magnitude(self, scale: float) -> LokrDelta:
        """kron(|w1|, |w2|) with each side rebuilt from its factors' absolute values, times ``scale · |s|``."""
        m1, m2 = (self.bounds[0], self.bounds[1]) if self.bounds is not None else (self.w1.abs(), self.w2.abs())
        s = scale * abs(self.scaling)
        dense = _kron(m1, m2).mul_(s).reshape(self.shape) if self.dense is not None else None
        return LokrDelta(m1, m2, s, self.shape, dense)

    def to(self, device: torch.device | str) -> LokrDelta:
        dense = self.dense.to(device) if self.dense is not None else None
        return LokrDelta(self.w1.to(device), self.w2.to(device), self.scaling, self.shape, dense, self.bounds)


def _kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``torch.kron`` as PEFT's ``make_kron`` calls it (w1 unsqueezed to a 1×1 kernel beside a 4-D w2)."""
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous())


def lokr_side_bound(
    whole: torch.Tensor | None,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    t: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """One side rebuilt from its factors' absolute values, and the length of the sums behind its entries
    (0 stored whole, r for a @ b, r² + 2 for the Tucker rebuild: r² triple products): what bounds the side's rounding."""
    mag = lokr_side(
        whole.abs() if whole is not None else None,
        a.abs() if a is not None else None,
        b.abs() if b is not None else None,
        t.abs() if t is not None else None,
    )
    if whole is not None or a is None:
        return mag, 0
    return mag, (t.shape[0] * t.shape[1] + 2) if t is not None else a.shape[1]


def lokr_side(
    whole: torch.Tensor | None,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    t: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Kronecker factor as PEFT rebuilds it: stored whole, ``a @ b``, or (w2 only) the Tucker rebuild
    ``einsum("i j k l, i p, j r -> p r k l", t, a, b)`` with a (r, b_out) and b (r, d_in).  fp32."""
    if whole is not None:
        return _f32(whole)
    if a is None or b is None:
        raise ValueError("a LoKr factor needs either its whole matrix or both of its low-rank halves")
    if t is not None:
        return torch.einsum("i j k l, i p, j r -> p r k l", _f32(t), _f32(a), _f32(b))
    return torch.mm(_f32(a), _f32(b))
