"""LoRA weight math, pure tensors in and out: no files, no config parsing.

Every route merges through :func:`merge_rows`: one fp32 ``addmm`` per block of output rows and
adapter, ``W_rows(fp32) + Σ sᵢ · leftᵢ_rows @ rightᵢ``, rounded once to the output dtype (several
adapters merged at once are one sum in the same tile, not one rounding each).  It never builds
a full-size fp32 ΔW, and it gives ``round(fp32(W) + ΔW)`` rather than PEFT's
``W + round(ΔW)`` double rounding.

Other tuners' ΔW (LoHa, LoKr: :mod:`lora_convert.tuner_math`) are :class:`RowDelta` s too: the tile adds
their rows beside the LoRA products, still one rounding.

Orientation: a stored weight is either *row-major in the LoRA sense* (nn.Linear: W is
(out, in) and ΔW = B·A) or *transposed* (GPT-2 Conv1D: W is (in, out); nn.Embedding: W is
(vocab, dim) and ΔW = (B_e·A_e)ᵀ).  :class:`DeltaFactors` hides which: rows of the stored ΔW
are ``left[rows] @ right``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

FP32 = torch.float32


@dataclass
class DeltaFactors:
    """Stored-orientation ΔW = scaling · left @ right, with left (rows, r) and right (r, cols)."""

    left: torch.Tensor
    right: torch.Tensor
    scaling: float

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[1])

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """fp32 ΔW rows ``start:stop`` (small: one block)."""
        return torch.mm(self.left[start:stop], self.right).mul_(self.scaling)

    def add_rows(self, acc: torch.Tensor, start: int, stop: int) -> None:
        """``acc += ΔW[start:stop]``: one ``addmm`` (the product is never written out on its own)."""
        acc.addmm_(self.left[start:stop], self.right, alpha=self.scaling)

    @property
    def depth(self) -> int:
        """The length of the dot products behind each entry (for verify's rounding bound)."""
        return self.rank

    def magnitude(self, scale: float) -> DeltaFactors:
        """``scale · |s| · |left| @ |right|``: what bounds each computed entry's rounding, times ``scale``."""
        return DeltaFactors(self.left.abs(), self.right.abs(), scale * abs(self.scaling))

    def to(self, device: torch.device | str) -> DeltaFactors:
        """The factors on ``device`` (the merge's fp32 tiles are computed where the factors are)."""
        return DeltaFactors(self.left.to(device), self.right.to(device), self.scaling)


class RowDelta(Protocol):
    """Any additive ΔW the merge sums into its fp32 tile, by blocks of stored rows: LoRA's
    :class:`DeltaFactors`, or another tuner's (``tuner_math``: LoHa, LoKr).  ``shape`` is the stored
    weight seen as a matrix (a conv's (out, in·k…))."""

    @property
    def shape(self) -> tuple[int, int]: ...

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """A new fp32 tensor: ΔW rows ``start:stop``."""
        ...

    def add_rows(self, acc: torch.Tensor, start: int, stop: int) -> None:
        """``acc += ΔW[start:stop]`` in place (``acc`` is fp32, (stop - start, cols))."""
        ...

    def to(self, device: torch.device | str) -> RowDelta: ...

    @property
    def depth(self) -> int:
        """How many roundings of fp32 arithmetic each entry of ΔW goes through at most (a dot product of
        length r counts r), for verify's bound (``closeness.merge_bound`` takes it as the rank)."""
        ...

    def magnitude(self, scale: float) -> RowDelta:
        """A producer of ``scale · P``, P ≥ 0 bounding the magnitude of every product summed into each entry
        (LoRA: ``|s|·|B|·|A|``): the error of a computed entry is at most γ_depth·P."""
        ...


def linear_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, *, transposed: bool) -> DeltaFactors:
    """nn.Linear (W (out, in), ΔW = B·A) or, with ``transposed``, GPT-2 Conv1D (W (in, out), ΔW = (B·A)ᵀ)."""
    a, b = lora_A.to(FP32), lora_B.to(FP32)
    if transposed:
        return DeltaFactors(a.t().contiguous(), b.t().contiguous(), scaling)
    return DeltaFactors(b.contiguous(), a.contiguous(), scaling)


def conv_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> DeltaFactors:
    """A convolution (kernel k×k) seen as the matrix of its flattened weight, (out, in·k·k): A is
    (r, in, k, k) — stride and padding live in A — and B a 1×1 conv (out, r, 1, 1), so ΔW is
    B[:, :, 0, 0] @ A.reshape(r, -1), which is what PEFT's and sd-scripts' conv merges compute
    (``conv2d(A.transpose(0, 1), B)``).  A 2-D A or B (a conv 1×1 stored as linear) reads the same."""
    a, b = lora_A.to(FP32), lora_B.to(FP32)
    return DeltaFactors(b.reshape(b.shape[0], -1).contiguous(), a.reshape(a.shape[0], -1).contiguous(), scaling)


def expert_factors(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    expert: int,
    experts: int,
    scaling: float,
    *,
    transposed: bool,
    b_layout: str = "rank_major",
) -> DeltaFactors:
    """Expert ``expert``'s ΔP of a PEFT ``target_parameters`` LoRA on a fused (E, d1, d2) parameter.

    A is (E·r, in) with the expert's rows in one block; B is (out, E·r) with its columns at
    ``expert, expert+E, …`` (``rank_major``, PEFT's packing) or in one block (``grouped_by_expert``).
    ΔP[e] = s·B_e·A_e for a parameter stored (E, out, in), its transpose for (E, in, out)."""
    a, b = expert_pair(lora_A, lora_B, expert, experts, b_layout=b_layout)
    return linear_factors(a, b, scaling, transposed=transposed)


def expert_pair(
    lora_A: torch.Tensor, lora_B: torch.Tensor, expert: int, experts: int, *, b_layout: str = "rank_major"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ``expert``'s (A_e (r, in), B_e (out, r)) out of PEFT's packed factors: views, dtype kept."""
    r = lora_A.shape[0] // experts
    a = lora_A[expert * r : (expert + 1) * r]
    if b_layout == "rank_major":
        return a, lora_B.reshape(lora_B.shape[0], r, experts)[:, :, expert]
    return a, lora_B[:, expert * r : (expert + 1) * r]


def stack_factors(parts: list[tuple[DeltaFactors, slice | None]], rows: int) -> DeltaFactors:
    """One ΔW of ``rows`` rows from deltas that each cover a slice of its rows (gate and up of one
    expert): the factors side by side along the rank, each left factor scaled and zero outside its rows."""
    if len(parts) == 1 and parts[0][1] is None:
        return parts[0][0]
    rank = sum(d.rank for d, _ in parts)
    cols = parts[0][0].right.shape[1]
    left = torch.zeros(rows, rank, dtype=FP32)
    right = torch.empty(rank, cols, dtype=FP32)
    k = 0
    for d, sl in parts:
        left[sl if sl is not None else slice(None), k : k + d.rank] = d.left * d.scaling
        right[k : k + d.rank] = d.right
        k += d.rank
    return DeltaFactors(left, right, 1.0)


def embedding_factors(lora_embedding_A: torch.Tensor, lora_embedding_B: torch.Tensor, scaling: float) -> DeltaFactors:
    """nn.Embedding: A_e is (r, vocab), B_e is (dim, r), W is (vocab, dim), ΔW = (B_e·A_e)ᵀ·s."""
    return DeltaFactors(lora_embedding_A.to(FP32).t().contiguous(), lora_embedding_B.to(FP32).t().contiguous(), scaling)


Deltas = RowDelta | Sequence[RowDelta]  # one adapter's ΔW, or several summed


def _each(delta: Deltas) -> Sequence[RowDelta]:
    return delta if isinstance(delta, (list, tuple)) else (delta,)  # type: ignore[return-value]


def delta_rows(delta: Deltas, start: int, stop: int) -> torch.Tensor:
    """fp32 rows ``start:stop`` of Σ ΔWᵢ (one block), in the order the merge adds them."""
    parts = _each(delta)
    out = parts[0].rows(start, stop)
    for d in parts[1:]:
        d.add_rows(out, start, stop)
    return out


def merge_rows(
    w_rows: torch.Tensor,
    delta: Deltas,
    start: int,
    out: torch.Tensor,
    *,
    acc: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows ``start:start+len(w_rows)`` of the merged weight, rounded once into ``out`` (its dtype
    is the output dtype).  ``acc`` is an fp32 tile of the same shape to work in; the streaming
    route passes the same one every time so no block allocates.

    ``row_scale``/``col_scale`` (fp32) apply DoRA's m/‖W+ΔW‖ along the stored rows or columns.
    """
    acc = _tile(w_rows, delta, start, acc)
    if row_scale is not None:
        acc.mul_(row_scale[start : start + w_rows.shape[0]].unsqueeze(1))
    if col_scale is not None:
        acc.mul_(col_scale.unsqueeze(0))
    return out.copy_(acc)


def _tile(w_rows: torch.Tensor, delta: Deltas, start: int, acc: torch.Tensor | None) -> torch.Tensor:
    """fp32 ``W_rows + Σ ΔWᵢ_rows`` in ``acc`` (allocated when not given): LoRA's ``sᵢ · leftᵢ_rows @ rightᵢ``
    as one ``addmm`` each, another tuner's rows added as it computes them."""
    stop = start + w_rows.shape[0]
    if acc is None:
        acc = w_rows.to(FP32, copy=True)
    else:
        acc.copy_(w_rows)
    for d in _each(delta):
        d.add_rows(acc, start, stop)
    return acc


def dora_row_norms(w_rows: torch.Tensor, delta: Deltas, start: int, acc: torch.Tensor | None = None) -> torch.Tensor:
    """‖W + ΔW‖ over each stored row in the block (nn.Linear: one norm per output feature)."""
    return torch.linalg.vector_norm(_tile(w_rows, delta, start, acc), dim=1)


def dora_col_sq_norms(w_rows: torch.Tensor, delta: Deltas, start: int, acc: torch.Tensor | None = None) -> torch.Tensor:
    """Partial Σ (W + ΔW)² over stored columns for one block (Conv1D/Embedding: per output feature)."""
    return _tile(w_rows, delta, start, acc).square_().sum(dim=0)


def dora_scale(magnitude: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """m / ‖W + ΔW‖, as PEFT's DoRA merge computes it."""
    return magnitude.to(FP32) / norms


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``.  One reduction pass with no temporary: ``aminmax`` propagates NaN
    and an Inf shows up as an extreme, whereas ``isfinite(t).all()`` writes a bool tensor the
    size of ``t`` first — several times slower on a merge tile (profile in bench/README.md)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    try:
        lo, hi = torch.aminmax(t)
    except (RuntimeError, NotImplementedError):  # dtypes without a CPU aminmax kernel (float8)
        return bool(torch.isfinite(t.float()).all())
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def merged_finite(t: torch.Tensor) -> bool:
    """:func:`all_finite` for a merged output block, with a cheaper first pass: a sum is NaN or Inf as
    soon as one element is (IEEE: NaN absorbs, Inf + finite is Inf, Inf - Inf is NaN), so a finite sum
    proves every element finite.  ``sum`` reads a bf16 block in about half the time of ``aminmax``
    (bench/README.md); only a non-finite sum — a real NaN/Inf, or finite values whose sum overflows —
    pays for the exact check.  Same verdict as :func:`all_finite` on every input.  float16 goes straight
    to the exact check: its sums overflow at 65504, so the first pass would often be wasted."""
    if t.dtype in _SUMMED and t.numel():
        if bool(torch.isfinite(t.sum())):
            return True
    return all_finite(t)


_SUMMED = (torch.bfloat16, torch.float32, torch.float64)


def block_rows(n_rows: int, n_cols: int, budget_bytes: int = 2 << 20, *, elem_bytes: int = 4) -> int:
    """Rows per block so that one fp32 tile — or a block of ``elem_bytes`` elements, when those are
    wider (fp64 inputs) — stays near ``budget_bytes``.

    Small on purpose: the block goes read() -> bf16 -> fp32 tile -> addmm -> bf16 -> write(), and
    when every stage fits in a core's L2/L3 share, the kernel's copies in read() and write() run
    from cache instead of DRAM (tile sizes compared in bench/README.md).  A rank-16 GEMM is
    memory-bound at any of these sizes, so nothing is lost on the arithmetic side.
    """
    return max(1, min(n_rows, budget_bytes // max(1, max(4, elem_bytes) * n_cols)))


def is_transposed(base_shape: tuple[int, ...], in_features: int, out_features: int, *, hint: bool) -> bool:
    """Whether a stored linear weight is (in, out) (Conv1D).  Decided from the shape; ``hint``
    (fan_in_fan_out or a Conv1D architecture) only settles square matrices."""
    if len(base_shape) != 2:
        raise ValueError(f"expected a 2-D weight, got shape {base_shape}")
    if in_features != out_features:
        if tuple(base_shape) == (out_features, in_features):
            return False
        if tuple(base_shape) == (in_features, out_features):
            return True
        raise ValueError(
            f"weight shape {tuple(base_shape)} fits neither (out, in)=({out_features}, {in_features}) nor its transpose"
        )
    if tuple(base_shape) != (out_features, in_features):
        raise ValueError(f"weight shape {tuple(base_shape)} does not fit ({out_features}, {in_features})")
    return hint
