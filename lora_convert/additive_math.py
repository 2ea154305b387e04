"""ΔW of PEFT's newer additive tuners (SHiRA, FourierFT, VB-LoRA, DeLoRA, C3A, RandLoRA), pure tensors in and out:
no files, no config parsing.

Each class is a :class:`lora_math.RowDelta`: the merge engine asks for the fp32 rows ``start:stop`` of ΔW
(the stored weight's layout) and adds them into the same tile as LoRA's ``addmm``, rounded once.

* SHiRA (``peft/tuners/shira``): ΔW = ``sparse_coo_tensor(indices, w · s, (out, in))`` — a sparse matrix
  whose entries are trained.  The entries are sorted by row once; a block of rows is a slice of them,
  scattered into the tile (``index_put_`` with accumulation: repeated indices sum, as a COO tensor's do).
  The random mask PEFT draws when an in-model state dict holds no indices is :func:`shira_random_indices`,
  PEFT's ``random_mask`` step for step.
* FourierFT (``peft/tuners/fourierft``): ΔW = ``Re(ifft2(S)) · s`` with S the (out, in) matrix that holds the
  trained spectrum at ``n`` places drawn by ``torch.randperm`` from ``random_loc_seed``
  (:func:`fourier_indices`, PEFT's draw).  An inverse 2-D FFT mixes every entry into every row, so ΔW is
  built whole once per tensor with the same ``torch.fft.ifft2`` PEFT calls (bit-equal to its ΔW) and handed
  out by rows: one tensor-sized fp32 ΔW (and ifft2's complex temporary) while that tensor is merged.
* VB-LoRA, DeLoRA, RandLoRA: LoRA factors built from their own numbers (a vector bank and top-k logits; norms
  and a λ; shared random bases scaled by λ and γ).
* C3A: a block-circulant ΔW, each entry a kernel value, so rows come straight from the kernel.
* MiSS (``peft/tuners/miss``, its default and ``mini`` variants): ΔW[o, c] = block[c mod r, o mod w], the
  shared (r, w) block tiled over the weight (w = out, or ``mini_r`` repeated), each entry a block value.
  Its ``bat`` variant is no sum: :class:`BatBlocks` rewrites each r×r block of W as W_ij·(I + B_i) + B_i, a row
  at a time (a :class:`oft_math.Rotation` to the merge engine: alone on its tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .lora_math import FP32, DeltaFactors


def shira_random_indices(out_f: int, in_f: int, r: int, seed: int | None) -> torch.Tensor:
    """PEFT's ``shira.mask_functions.random_mask`` then ``torch.where(mask == 1)``: ``r·(in+out)`` places of
    an (out, in) weight drawn by ``torch.randperm`` (seeded when ``seed`` is given, else a fresh generator's
    default seed, as PEFT does), in row-major order; (2, n) int32."""
    gen = torch.Generator()
    if seed is not None:
        gen.manual_seed(seed)
    idx = torch.randperm(out_f * in_f, generator=gen)[: r * (out_f + in_f)]
    flat = torch.sort(idx).values
    return torch.stack([flat // in_f, flat % in_f]).to(torch.int32)


def fourier_indices(out_f: int, in_f: int, n: int, seed: int) -> torch.Tensor:
    """FourierFT's spectral places of an (out, in) weight: PEFT's ``update_layer``, ``torch.randperm(out·in)``
    from a generator seeded with ``random_loc_seed``, the first ``n``, as (row, column); (2, n) int64."""
    idx = torch.randperm(out_f * in_f, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([idx // in_f, idx % in_f], dim=0)


@dataclass
class SparseDelta:
    """ΔW = scaling · Σₖ wₖ e_{rₖ, cₖ} on a weight of ``shape`` = (rows, cols) as stored; ``rows``/``cols``/
    ``values`` are sorted by row, ``starts[i]`` the first entry of row i (``searchsorted``)."""

    rows_of: torch.Tensor  # int64 (n,)
    cols_of: torch.Tensor  # int64 (n,)
    values: torch.Tensor  # fp32 (n,)
    scaling: float
    shape: tuple[int, int]
    repeats: int = 1  # the most entries at one place (each a rounding of the sum)

    @classmethod
    def build(
        cls, indices: torch.Tensor, values: torch.Tensor, scaling: float, shape: tuple[int, int], *, transposed: bool
    ) -> SparseDelta:
        """From PEFT's (2, n) (row, column) ``indices`` of an (out, in) ΔW and its ``values``; ``transposed``:
        the stored weight is (in, out), so the places swap.  The caller checks the indices are in range."""
        idx = indices.to(torch.int64)
        r, c = (idx[1], idx[0]) if transposed else (idx[0], idx[1])
        order = torch.argsort(r, stable=True)
        r, c, v = r[order].contiguous(), c[order].contiguous(), values.to(FP32).reshape(-1)[order].contiguous()
        flat = r * shape[1] + c
        repeats = int(torch.unique(flat, return_counts=True)[1].max()) if flat.numel() else 1
        return cls(r, c, v, scaling, shape, repeats)

    def _span(self, start: int, stop: int) -> tuple[int, int]:
        lo, hi = torch.searchsorted(self.rows_of, torch.tensor([start, stop], dtype=torch.int64)).tolist()
        return int(lo), int(hi)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """fp32 ΔW rows ``start:stop``, (stop - start, cols)."""
        out = torch.zeros(stop - start, self.shape[1], dtype=FP32)
        self.add_rows(out, start, stop)
        return out

    def add_rows(self, acc: torch.Tensor, start: int, stop: int) -> None:
        lo, hi = self._span(start, stop)
        if hi > lo:
            vals = self.values[lo:hi] * self.scaling
            acc.index_put_((self.rows_of[lo:hi] - start, self.cols_of[lo:hi]), vals, accumulate=True)

    @property
    def depth(self) -> int:
        """One product (w·s), then the repeated places' sum."""
        return self.repeats + 1

    def magnitude(self, scale: float) -> SparseDelta:
        return SparseDelta(
            self.rows_of, self.cols_of, self.values.abs(), scale * abs(self.scaling), self.shape, self.repeats
        )

    def to(self, device: torch.device | str) -> SparseDelta:
        return SparseDelta(
            self.rows_of.to(device),
            self.cols_of.to(device),
            self.values.to(device),
            self.scaling,
            self.shape,
            self.repeats,
        )


@dataclass
class DenseDelta:
    """A ΔW built whole (FourierFT's inverse FFT), handed out by rows; ``bound`` is a per-entry bound of the
    products behind each entry and ``depth`` the roundings (for verify)."""

    dense: torch.Tensor  # fp32 (rows, cols), the stored layout
    depth_: int
    bound: float

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.dense.shape[0]), int(self.dense.shape[1]))

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.dense[start:stop].clone()

    def add_rows(self, acc: torch.Tensor, start: int, stop: int) -> None:
        acc.add_(self.dense[start:stop])

    @property
    def depth(self) -> int:
        return self.depth_

    def magnitude(self, scale: float) -> DenseDelta:
        """A constant: every entry of an inverse FFT is bounded by the same sum."""
        return DenseDelta(torch.full_like(self.dense, scale * self.bound), self.depth_, scale * self.bound)

    def to(self, device: torch.device | str) -> DenseDelta:
        return DenseDelta(self.dense.to(device), self.depth_, self.bound)


def fourier_delta(
    spectrum: torch.Tensor, indices: torch.Tensor, scaling: float, out_f: int, in_f: int, *, transposed: bool
) -> DenseDelta:
    """FourierFT's ΔW as PEFT's ``get_delta_weight`` computes it (fp32 spectrum placed in an (out, in) matrix,
    ``torch.fft.ifft2(...).real * scaling``), transposed for a weight stored (in, out) (GPT-2's Conv1D,
    ``fan_in_fan_out``).

    For verify: each entry is (s/(out·in))·Σₖ Sₖ·cos(…), but the FFT's rounding is norm-wise — at most
    about c·log₂(N)·u·‖S‖₂/√N per entry (N = out·in) — so the bound used is |s|·Σ|Sₖ|/√N with a depth of
    4·⌈log₂ N⌉ + 4 roundings, which covers both that and the scaling."""
    dense = torch.zeros(out_f, in_f, dtype=FP32)
    dense[indices[0, :], indices[1, :]] = spectrum.to(FP32).reshape(-1)
    delta = torch.fft.ifft2(dense).real * scaling
    if transposed:
        delta = delta.t()
    n = out_f * in_f
    bound = abs(scaling) * float(spectrum.to(FP32).abs().sum()) / math.sqrt(n)
    return DenseDelta(delta.contiguous(), 4 * math.ceil(math.log2(max(n, 2))) + 4, bound)


def vblora_side(bank: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """VB-LoRA's ``_get_low_rank_matrix`` once its top-k are chosen: each sub-vector is Σⱼ wⱼ·bank[iⱼ] over the
    last axis of ``indices``/``weights`` (…, k); (…, L) fp32."""
    return (weights.to(FP32).unsqueeze(-1) * bank.to(FP32)[indices.to(torch.int64)]).sum(-2)


def vblora_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's choice from full logits: ``logits.topk(k)`` and the softmax of those k (fp32)."""
    top, idx = logits.to(FP32).topk(k, dim=-1)
    return idx, torch.softmax(top, dim=-1)


def vblora_saved_topk(indices: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of a ``save_only_topk_weights`` file: its k - 1 weights and the last as 1 minus their sum (what
    PEFT's loading rebuilds before it takes the softmax of their logarithms again)."""
    w = weights.to(FP32)
    return indices, torch.cat([w, 1 - w.sum(-1, keepdim=True)], dim=-1)


def vblora_factors(
    bank: torch.Tensor, a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA's A (r, in) and B (out, r) as PEFT's ``_get_lora_matrices`` builds them from the vector bank (V, L) and
    each side's (indices, weights): A's sub-vectors (r, in/L, L) laid along its rows, B's (out/L, r, L) down its
    columns."""
    side_a = vblora_side(bank, *a)
    side_b = vblora_side(bank, *b)
    return side_a.reshape(side_a.shape[0], -1), side_b.transpose(1, 2).reshape(-1, side_b.shape[1])


@dataclass
class BuiltFactors(DeltaFactors):
    """LoRA factors built from other numbers (VB-LoRA's bank): each entry of A and B is itself a k-term sum, which
    verify's depth counts beside the rank."""

    built_depth: int = 0

    @property
    def depth(self) -> int:
        return self.rank + self.built_depth

    def to(self, device: torch.device | str) -> BuiltFactors:
        return BuiltFactors(self.left.to(device), self.right.to(device), self.scaling, self.built_depth)


def delora_factors(
    a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, w_norm: torch.Tensor, scaling: float
) -> DeltaFactors:
    """DeLoRA's ``_compute_delta``: ΔW = (B · diag(λ / r / (‖Aᵢ‖·‖Bⁱ‖)) · A) ⊙ w_norm per input column, each
    norm clamped at 1e-4 as PEFT clamps it — LoRA factors with the diagonal folded into B's columns and the
    column norms into A's (the same product, summed in another order: within fp32 rounding of PEFT's)."""
    a, b = a.to(FP32), b.to(FP32)
    r = a.shape[0]
    an = torch.clamp(a.norm(dim=1), min=1e-4)
    bn = torch.clamp(b.norm(dim=0), min=1e-4)
    diag = lam.to(FP32).reshape(()) / r / (an * bn)
    return DeltaFactors((b * diag.unsqueeze(0)).contiguous(), (a * w_norm.to(FP32).unsqueeze(0)).contiguous(), scaling)


@dataclass
class CirculantDelta:
    """C3A's ΔW = get_circulant_fast(kernel) / in: block (m, n) of the (out, in) weight is the b×b circulant
    matrix with entries ``kernel[m, n, (q - p) mod b]`` at (p, q) — what PEFT's FFTs compute (fft(ifft(x) ⊙
    fft(w)) is x circularly correlated with w), taken here entry by entry, a block of rows at a time.

    For verify: PEFT computes it through two FFTs, whose rounding is norm-wise; the bound used is Σ|kernel[m, n]|
    over the block's b values, times |s|/in, with 4·⌈log₂ b⌉ + 4 roundings."""

    kernel: torch.Tensor  # fp32 (out/b, in/b, b)
    scaling: float  # 1/in times the adapter's weight
    magnitude_of: bool = False  # the bound's producer: each block's Σ|w| in every entry

    @property
    def shape(self) -> tuple[int, int]:
        m, n, b = self.kernel.shape
        return (m * b, n * b)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        m, n, b = self.kernel.shape
        i = torch.arange(start, stop, device=self.kernel.device)
        blocks = self.kernel[i // b]  # (rows, n, b)
        if self.magnitude_of:
            out = blocks.abs().sum(-1, keepdim=True).expand(-1, -1, b)
        else:
            shift = (torch.arange(b, device=i.device).unsqueeze(0) - (i % b).unsqueeze(1)) % b  # (rows, b)
            out = blocks.gather(2, shift.unsqueeze(1).expand(-1, n, -1))
        return out.reshape(stop - start, n * b).mul(self.scaling)

    def add_rows(self, acc: torch.Tensor, start: int, stop: int) -> None:
        acc.add_(self.rows(start, stop))

    @property
    def depth(self) -> int:
        return 4 * math.ceil(math.log2(max(self.kernel.shape[2], 2))) + 4

    def magnitude(self, scale: float) -> CirculantDelta:
        return CirculantDelta(self.kernel, scale * abs(self.scaling), True)

    def to(self, device: torch.device | str) -> CirculantDelta:
        return CirculantDelta(self.kernel.to(device), self.scaling, self.magnitude_of)


def randlora_factors(
    a: torch.Tensor,
    b: torch.Tensor,
    lam: torch.Tensor,
    gamma: torch.Tensor,
    out_f: int,
    in_f: int,
    scaling: float,
) -> DeltaFactors:
    """RandLoRA's ``get_delta_weight`` on an (out, in) ΔW: the shared bases cut to the layer (A[:, :n, :min],
    B[:max, :n, :]), A scaled by λ (r, n) and γ (n, min) and flattened (r·n, min), B flattened (max, n·r) — the
    two flattenings pair their rows and columns as PEFT's do — then B·A on the smaller side's orientation:
    (out, K)·(K, in) when in ≤ out, else its transpose; LoRA factors of rank K = r·n."""
    lo, hi = min(out_f, in_f), max(out_f, in_f)
    n = gamma.shape[0]
    update_a = (lam.to(FP32)[:, :, None] * a.to(FP32)[:, :n, :lo] * gamma.to(FP32)[None]).flatten(end_dim=1)
    update_b = b.to(FP32)[:hi, :n, :].flatten(start_dim=1)
    if lo == in_f:  # ΔW = update_b @ update_a: (out, K) @ (K, in)
        return DeltaFactors(update_b.contiguous(), update_a.contiguous(), scaling)
    return DeltaFactors(update_a.t().contiguous(), update_b.t().contiguous(), scaling)  # (out, K) @ (K, in)


@dataclass
class TiledDelta:
    """MiSS's ΔW on an (out, in) weight: ``block`` (r, w) tiled, ΔW[o, c] = block[c mod r, o mod w] — what PEFT's
    ``get_delta_weight_miss`` adds (the (in/r) whole r-wide column blocks and the remainder's first columns alike;
    ``mini``'s block repeated out/w times along the output).  Each entry is a stored value: no rounding but the
    add's."""

    block: torch.Tensor  # fp32 (r, w)
    out_f: int
    in_f: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_f, self.in_f)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        r, w = self.block.shape
        dev = self.block.device
        cols = torch.arange(self.in_f, device=dev) % r
        outs = torch.arange(start, stop, device=dev) % w
        return self.block.t()[outs][:, cols].contiguous()

    def add_rows(self, acc: torch.Tensor, start: int, stop: int) -> None:
        acc.add_(self.rows(start, stop))

    @property
    def depth(self) -> int:
        return 1

    def magnitude(self, scale: float) -> TiledDelta:
        return TiledDelta(self.block.abs() * scale, self.out_f, self.in_f)

    def to(self, device: torch.device | str) -> TiledDelta:
        return TiledDelta(self.block.to(device), self.out_f, self.in_f)


@dataclass
class BatBlocks:
    """MiSS ``bat``: PEFT's ``get_delta_weight`` on an (out, in) weight cut in r×r blocks W_ij (i over output
    rows) is ΔW_ij = W_ij·B_i + B_i, merged as W + ΔW.  Row p of W (block i = p // r, q = p mod r) only needs
    itself: its r-wide pieces times B_i, plus B_i's row q.  ``rotate_`` rewrites fp32 rows ``start:start+n``
    in place, one output block at a time (any tile: memory one tile and B)."""

    blocks: torch.Tensor  # fp32 (out/r, r, r)
    scale: float = 1.0  # (magnitude: |B| at |scale|, applied to |W|: |W| + |W|·|B_i| + |B_i|, verify's P)

    def rotate_(self, acc: torch.Tensor, start: int = 0) -> torch.Tensor:
        n, cols = acc.shape
        r = self.blocks.shape[-1]
        p = start
        while p < start + n:
            i, q = divmod(p, r)
            e = min(start + n, (i + 1) * r)
            rows = acc[p - start : e - start].view(e - p, cols // r, r)
            b = self.blocks[i]
            add = torch.matmul(rows, b).add_(b[q : q + (e - p)].unsqueeze(1)).mul_(self.scale)
            rows.add_(add)
            p = e
        return acc

    @property
    def depth(self) -> int:
        return self.blocks.shape[-1] + 2

    def magnitude(self) -> BatBlocks:
        return BatBlocks(self.blocks.abs(), abs(self.scale))

    def to(self, device: torch.device | str) -> BatBlocks:
        return BatBlocks(self.blocks.to(device), self.scale)
