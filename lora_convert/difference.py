"""``W_tuned − W_base`` of one tensor, assembled in fp32 from row blocks of the two stored tensors.

Shared by extraction (which factors it) and ``detect --base`` (which measures it).  Built block by block
because reading both tensors whole and converting them costs two stored and two fp32 copies next to
ΔW (for a 32000x2048 bf16 embedding ~1 GB at once); here the peak is ΔW itself plus two small blocks.

Pure math: the two tensors come as :class:`Rows` (a name, a shape and a way to read rows), never as
files; ``io.reader.Checkpoint.rows_of`` gives one for a checkpoint's tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from .errors import CheckpointError, UnsupportedError
from .lora_math import all_finite

FP32 = torch.float32
DELTA_BLOCK = 4 << 20  # bytes of fp32 ΔW built per step from the two files


class Rows(Protocol):
    """One stored tensor, read by rows (a 0-d tensor is one row): what a difference is built from."""

    @property
    def path(self) -> str:
        """Where it is stored, for error messages."""
        ...

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` in the stored dtype (the whole tensor when it is 0-d)."""
        ...


def row_blocks(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """The (start, stop) row blocks a difference of a tensor of ``shape`` is built in."""
    rows = shape[0] if shape else 1
    cols = max(1, math.prod(shape) // max(1, rows))
    step = max(1, DELTA_BLOCK // (4 * cols))
    return [(s, min(s + step, rows)) for s in range(0, rows, step)]


class Difference:
    """fp32 ΔW of one tensor, fed one pair of row blocks at a time.

    With ``keep=False`` no ΔW is kept, only whether the tensors differ (for tensors that are only
    reported).  A NaN or Inf in either file is an error naming the tensor: no factorisation can carry it."""

    def __init__(
        self,
        tuned: Rows,
        base: Rows,
        *,
        keep: bool,
        out: torch.Tensor | Callable[[], torch.Tensor] | None = None,
        measure_tuned: bool = False,
    ) -> None:
        """``out``: where a kept ΔW is built ((rows, cols) fp32), or what gives it (fresh when None).
        ``measure_tuned``: each :meth:`add` also leaves ``tuned_sq``, the fp32 sum of the tuned block's squares
        — :func:`~.svd.frobenius_sq` of those rows, bit for bit, from the fp32 copy the difference makes anyway.

        A kept ΔW is only allocated at the first block that differs: the rows before it are zeros.  A
        tensor the fine-tune left alone (the embedding, often: at Llama-3-8B's vocabulary its fp32 ΔW is
        2.1 GB) then costs one block, not the tensor."""
        self.tuned, self.base, self.keep = tuned, base, keep
        self.shape = tuned.shape
        self.rows = self.shape[0] if self.shape else 1
        self.cols = max(1, math.prod(self.shape) // max(1, self.rows))
        step = row_blocks(self.shape)[0][1] if self.rows else 1
        self._out = out
        self.delta = torch.empty((min(step, self.rows), self.cols), dtype=FP32)  # one block until ΔW is kept
        self.kept = False  # the whole ΔW is being built (keep, and a block differed)
        self.changed = False
        self.total: float | None = None  # ‖ΔW‖²_F once result() has measured it (keep)
        self.tuned_sq: float | None = None  # the last block's Σ tuned² (measure_tuned)
        self._sq = torch.empty_like(self.delta) if measure_tuned or keep else None  # squares of a block, reused
        self._total = 0.0  # Σ over the blocks so far of their ΔW²: frobenius_sq's sums, block by block (keep)

    def _keep_from(self, start: int, n: int) -> None:
        """Move to building the whole ΔW: rows before ``start`` are zero, the block just formed is copied."""
        out = self._out() if callable(self._out) else self._out
        full = out if out is not None else torch.empty((self.rows, self.cols), dtype=FP32)
        full[:start].zero_()
        full[start : start + n].copy_(self.delta[:n])
        self.delta, self.kept = full, True

    def add(self, start: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Rows ``start:start+len(a)`` of both tensors (their stored dtypes)."""
        n = a.shape[0] if a.ndim else 1
        a, b = a.reshape(n, self.cols), b.reshape(n, self.cols)
        if not (a.is_floating_point() and b.is_floating_point()):
            if self.keep:
                raise UnsupportedError(
                    f"{a.dtype}/{b.dtype} weight: a quantized checkpoint cannot be differenced exactly",
                    path=self.tuned.path,
                    tensor=self.tuned.name,
                    hint="extract from the unquantized tuned model and base",
                )
            self.changed = self.changed or not torch.equal(a, b)  # integer buffers: compare exactly
            return
        d = self.delta[start : start + n] if self.kept else self.delta[:n]
        d.copy_(a)
        if self._sq is not None:  # the tuned rows in fp32, as frobenius_sq would widen them: one block of its sums
            self.tuned_sq = float(torch.sum(torch.mul(d, d, out=self._sq[:n])))
        d.sub_(b)  # b is promoted inside the kernel: no fp32 copy of either side
        if self.kept:
            self._measure(d, n)
            return  # a kept ΔW is checked once, by the norm result() measures anyway
        if not d.numel():
            return
        lo, hi = torch.aminmax(d)  # NaN propagates, Inf is an extreme: one pass checks both inputs too
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            self._non_finite()
        if bool(lo != 0) or bool(hi != 0):
            self.changed = True
            if self.keep:
                self._keep_from(start, n)
                self._measure(d, n)

    def _measure(self, d: torch.Tensor, n: int) -> None:
        """Add a kept block's Σ ΔW² while it is in cache: :func:`~.svd.frobenius_sq` of the whole ΔW sums the
        same row blocks (``row_blocks``' step is its step) in the same order — the rows before the first
        block that differs are zeros, whose sums add nothing — so ``result()`` has its figure bit for bit
        without a second pass over ΔW."""
        assert self._sq is not None
        self._total += float(torch.sum(torch.mul(d, d, out=self._sq[:n])))

    def _non_finite(self) -> None:
        """Name the input that holds NaN/Inf (read again, only on this error path), or the overflow."""
        for side in (self.tuned, self.base):
            if not all(all_finite(side.rows(s, e)) for s, e in row_blocks(side.shape)):
                raise CheckpointError(
                    "holds NaN or Inf values",
                    path=side.path,
                    tensor=side.name,
                    hint="no adapter can carry a non-finite difference",
                )
        raise CheckpointError(
            "the difference from the base overflows fp32", path=self.tuned.path, tensor=self.tuned.name
        )

    def result(self) -> torch.Tensor | None:
        """ΔW in the tensor's own shape (``keep``), or the last block; None when the tensors are equal.

        A kept ΔW's ‖ΔW‖²_F (the SVD needs it) also says whether anything changed and whether anything
        is NaN/Inf: no separate pass over it."""
        if self.keep:
            self.total = self._total if self.kept else 0.0
            if not math.isfinite(self.total):
                self._non_finite()
            self.changed = self.changed or self.total > 0
        if not self.changed:
            return None
        return self.delta.reshape(self.shape) if self.keep else self.delta


def difference(tuned: Rows, base: Rows, *, keep: bool = True) -> torch.Tensor | None:
    """ΔW of one tensor read straight from the two sources (see :class:`Difference`)."""
    d = Difference(tuned, base, keep=keep)
    for s, e in row_blocks(tuned.shape):
        d.add(s, tuned.rows(s, e), base.rows(s, e))
    return d.result()
