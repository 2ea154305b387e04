"""Low-rank factorisation of a weight difference: pure tensors in and out, no I/O.

``ΔW ≈ B·A`` with ``B = U_r·√S_r`` (out, r) and ``A = √S_r·V_rᵀ`` (r, in), so PEFT's
``scaling`` is 1 when ``lora_alpha == r``.

Two solvers:

* exact thin SVD (``torch.linalg.svd``), for small matrices or when asked;
* the randomized range finder of Halko, Martinsson & Tropp (2011, Alg. 4.4 + 5.1): a Gaussian
  sketch with oversampling, ``q`` power iterations re-orthonormalised by QR after every product,
  then an exact SVD of the small projected matrix.  Everything in fp32 with a fixed seed.

Energy and error figures come from singular values and the *actual* Frobenius norm of ΔW:
the captured energy ``Σ_{i≤r} σ_i²`` of a randomized factorisation is exactly ``‖P·ΔW‖²_F`` for
the orthogonal projector ``P`` it found, so ``‖ΔW‖²_F − Σ_{i≤r} σ_i²`` is the true residual, not
an extrapolation of a spectrum we never computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError, spelled
from .lora_math import all_finite

FP32 = torch.float32
OVERSAMPLE = 10
POWER_ITERS = 3  # at most: iterations stop once the captured energy no longer grows (CONVERGED)
# The power iterations stop when the energy a rank-k truncation keeps grew by less than CONVERGED of the
# energy it leaves out (so the rank-k error can no longer move by more than ~CONVERGED/2 of itself), or by
# less than fp32 rounding of the products moves it (ROUNDING).  On LoRA-plus-noise differences one iteration
# reaches the Eckart–Young error to 8 digits; slowly converging spectra use all POWER_ITERS.
CONVERGED = 1e-3
ROUNDING = 2e-7
# auto: exact SVD when the short side is at most this.  Past it, a full SVD costs far more than the
# randomized range finder, which with POWER_ITERS iterations finds the same top-k subspace (the
# residual measured on the factors agrees to ~7 digits on low-rank-plus-noise ΔW, bench/README.md).
EXACT_MAX_DIM = 128


@dataclass
class Factorisation:
    """Top singular triplets of ΔW (``k`` of them, ``k ≥`` any rank that will be kept)."""

    U: torch.Tensor  # (m, k)
    S: torch.Tensor  # (k,)  descending
    Vh: torch.Tensor  # (k, n)
    total_energy: float  # ‖ΔW‖²_F, from ΔW itself (fp64 accumulation)
    method: str  # "exact" | "randomized"
    complete: bool  # S holds the whole spectrum (exact SVD)

    def kept_energy(self, r: int) -> float:
        return float(self.S[:r].double().pow(2).sum())

    def residual_energy(self, r: int) -> float:
        """``‖ΔW − ΔW_r‖²_F``.  With the full spectrum: the tail sum (no cancellation);
        otherwise the total minus what the top ``r`` directions capture."""
        if self.complete:
            return float(self.S[r:].double().pow(2).sum())
        return max(self.total_energy - self.kept_energy(r), 0.0)

    def energy_fraction(self, r: int) -> float:
        return 1.0 if self.total_energy == 0 else min(self.kept_energy(r) / self.total_energy, 1.0)

    def relative_error(self, r: int) -> float:
        return 0.0 if self.total_energy == 0 else math.sqrt(self.residual_energy(r) / self.total_energy)

    def factors(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` with the √S split: B (m, r), A (r, n), contiguous fp32."""
        s = self.S[:r].clamp_min(0).sqrt()
        B = (self.U[:, :r] * s).contiguous()
        A = (s[:, None] * self.Vh[:r]).contiguous()
        return B, A


def frobenius_sq(x: torch.Tensor) -> float:
    """‖x‖²_F: fp32 squares summed per block of ~1M elements by torch's cascade sum (relative error
    ~1e-7), the block sums added in fp64.  An fp64 copy of every block gives the same digits at several
    times the cost (bench/README.md, extraction profile)."""
    if x.ndim < 2:
        x = x.reshape(1, -1)
    x = x.to(FP32)
    total = 0.0
    step = max(1, (1 << 20) // max(1, x.shape[1]))
    sq = torch.empty((min(step, x.shape[0]), x.shape[1]), dtype=FP32, device=x.device)  # one block's squares,
    for i in range(0, x.shape[0], step):  # reused: a fresh 4 MB temporary per block is an mmap and its page faults
        b = x[i : i + step]
        total += float(torch.sum(torch.mul(b, b, out=sq[: b.shape[0]])))
    return total


def choose_method(shape: tuple[int, int], k: int, svd: str = "auto") -> str:
    if svd in ("exact", "randomized"):
        return svd
    short = min(shape)
    if short <= EXACT_MAX_DIM or k + OVERSAMPLE >= short // 2:
        return "exact"
    return "randomized"


def exact_svd(delta: torch.Tensor, total: float | None = None) -> Factorisation:
    U, S, Vh = torch.linalg.svd(delta.to(FP32), full_matrices=False)
    return Factorisation(U, S, Vh, frobenius_sq(delta) if total is None else total, "exact", True)


def _energy(bt: torch.Tensor, k: int) -> float:
    """Σ of the top-``k`` σ² of the projection ``Bᵀ = ΔWᵀQ`` (n, ell), from its ell×ell Gram matrix in fp64:
    what a rank-``k`` truncation keeps.  The other ell − k directions are oversampling, whose slow
    convergence must not keep the iterations going."""
    b = bt.double()
    return float(torch.linalg.eigvalsh(b.T @ b)[-k:].sum())


def randomized_svd(
    delta: torch.Tensor,
    k: int,
    *,
    oversample: int = OVERSAMPLE,
    power_iters: int = POWER_ITERS,
    seed: int = 0,
    total: float | None = None,
) -> Factorisation:
    """Top-``k`` SVD by a randomized range finder (Halko–Martinsson–Tropp), fp32.  Each power iteration
    re-orthonormalises, and the product ``ΔWᵀQ`` it computes is the projection ``(QᵀΔW)ᵀ`` the final
    small SVD needs: checking convergence and forming the projection cost no extra pass over ΔW."""
    D = delta.to(FP32)
    transpose = D.shape[0] < D.shape[1]  # sketch the long side (A = Dᵀ) so the projected matrix is small
    m, n = (D.shape[1], D.shape[0]) if transpose else D.shape

    def a_mul(x: torch.Tensor) -> torch.Tensor:  # A @ x
        return (x.T @ D).T if transpose else D @ x

    def at_mul(x: torch.Tensor) -> torch.Tensor:  # Aᵀ @ x
        return D @ x if transpose else (x.T @ D).T

    # Both products keep the stored ΔW as the row-major operand of an NN GEMM: with it transposed
    # instead, MKL's kernel runs at about half the speed on these skinny products.
    ell = min(n, k + oversample)
    gen = torch.Generator(device=D.device).manual_seed(seed)
    omega = torch.randn(n, ell, generator=gen, device=D.device, dtype=FP32)
    Q, _ = torch.linalg.qr(a_mul(omega))
    k = min(k, ell)
    full = frobenius_sq(delta) if total is None else total
    Bt = at_mul(Q)  # (n, ell) = (QᵀA)ᵀ
    captured = _energy(Bt, k)
    for _ in range(power_iters):
        Z, _ = torch.linalg.qr(Bt)
        Q, _ = torch.linalg.qr(a_mul(Z))
        Bt = at_mul(Q)
        before, captured = captured, _energy(Bt, k)
        if captured - before <= max(CONVERGED * (full - captured), ROUNDING * captured):
            break  # the rank-k error cannot move by more than CONVERGED of itself, or only by rounding
    Ub, S, Vh = torch.linalg.svd(Bt.T, full_matrices=False)
    U = Q @ Ub
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    if transpose:  # A = ΔWᵀ = U S Vh  =>  ΔW = Vhᵀ S Uᵀ
        U, Vh = Vh.T.contiguous(), U.T.contiguous()
    return Factorisation(U, S, Vh, full, "randomized", False)


def factorise(
    delta: torch.Tensor, k: int, *, svd: str = "auto", seed: int = 0, total: float | None = None
) -> Factorisation:
    """Top-``k`` (at least) singular triplets of a 2-D ΔW, by the method ``svd`` picks.  ``total`` is
    ``frobenius_sq(delta)`` when the caller measured it already."""
    if delta.ndim != 2:
        raise ValueError(f"ΔW must be 2-D, got shape {tuple(delta.shape)}")
    k = max(1, min(k, min(delta.shape)))
    total = frobenius_sq(delta) if total is None else total
    rows, cols = delta.shape
    if choose_method((rows, cols), k, svd) == "exact":
        return exact_svd(delta, total)
    return randomized_svd(delta, k, seed=seed, total=total)


def pick_rank(
    f: Factorisation,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    max_rank: int = 128,
) -> tuple[int, bool]:
    """The rank to keep, and whether ``max_rank`` (or the spectrum we have) capped it short of the target.

    ``rank``: fixed.  ``energy``: smallest r with ``Σ_{i≤r} σ_i² ≥ energy·‖ΔW‖²``.
    ``max_error``: smallest r with ``‖ΔW − ΔW_r‖_F ≤ max_error·‖ΔW‖_F``."""
    avail = int(f.S.numel())
    cap = max(1, min(max_rank, avail))
    if rank is not None:
        r = max(1, min(rank, cap))
        return r, r < rank
    if f.total_energy == 0:
        return 1, False
    s2 = f.S.double().pow(2)
    kept = torch.cumsum(s2, 0)
    if energy is not None:
        ok = kept >= energy * f.total_energy * (1 - 1e-12)
    elif max_error is not None:
        if f.complete:
            tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0])[1:]
            tail = torch.cat([tail, tail.new_zeros(1)])
        else:
            tail = (f.total_energy - kept).clamp_min(0)
        ok = tail <= (max_error**2) * f.total_energy
    else:
        raise ValueError("give rank, energy or max_error")
    hits = torch.nonzero(ok[:cap]).flatten()
    if hits.numel():
        return int(hits[0]) + 1, False
    return cap, True


GAP = 10  # a spectral gap: σ_r / σ_(r+1) at least this
SKETCH_K = 32  # effective_rank's first look: the top 32 directions, no power iteration
SKETCH_MARGIN = 4  # ... taken when its gap is this many times GAP (its σ_(r+1) may be an underestimate)


def effective_rank(
    delta: torch.Tensor, energy: float = 0.999, *, k: int = 64, seed: int = 0, total: float | None = None
) -> tuple[int | None, int | None]:
    """(rank reaching ``energy``, or None if above ``k``; the rank after the largest spectral gap ≥ 10×).
    ``total`` is ``frobenius_sq(delta)`` when the caller measured it already.

    A matrix the randomized range finder factors is first sketched cheaply (:func:`_sketched_rank`): a merged
    LoRA — a few large directions over rounding noise — is settled there at an eighth of the full search's cost;
    anything else (a fine-tune, a rank near the sketch's size, an unclear gap) gets the top-``k`` search."""
    total = frobenius_sq(delta) if total is None else total
    if delta.ndim == 2 and SKETCH_K < k and choose_method((delta.shape[0], delta.shape[1]), k) == "randomized":
        quick = _sketched_rank(delta, energy, seed=seed, total=total)
        if quick is not None:
            return quick
    f = factorise(delta, k, seed=seed, total=total)
    r, capped = pick_rank(f, energy=energy, max_rank=k)
    return (None if capped else r), _gap(f.S[: min(k, f.S.numel())])


def _gap(s: torch.Tensor) -> int | None:
    """The rank after the largest ratio of consecutive singular values, when it is at least GAP."""
    S = s.double()
    if S.numel() < 2 or float(S[0]) <= 0:
        return None
    ratios = S[:-1] / S[1:].clamp_min(float(S[0]) * 1e-12)
    i = int(torch.argmax(ratios))
    return i + 1 if float(ratios[i]) >= GAP else None


def _sketched_rank(delta: torch.Tensor, energy: float, *, seed: int, total: float) -> tuple[int, int] | None:
    """(rank at ``energy``, rank at the gap) from one Gaussian sketch of SKETCH_K + OVERSAMPLE columns and no
    power iteration (two skinny GEMMs over ΔW, where the top-64 search makes eight wider ones), or None when the
    sketch cannot settle them.

    The sketch's values are lower bounds of the true singular values (σᵢ(QᵀΔW) ≤ σᵢ(ΔW)), and the energy it
    keeps at rank r is at most the best rank-r energy.  So when it keeps ≥ ``energy`` of ‖ΔW‖² at rank r,
    the true rank at that energy is ≤ r; and when its σ_r² alone exceeds the ``1 − energy`` share, dropping
    the r-th direction leaves less than ``energy`` whatever the rest: the true rank is ≥ r — the rank at
    ``energy`` is exactly r.  The gap is taken only where it is the sketch's largest, at that same rank,
    SKETCH_MARGIN times past GAP (the sketch's σ_(r+1) may be low) and with room behind it in the sketch:
    a merged LoRA's own spectrum over its rounding noise.  Any doubt returns None."""
    f = randomized_svd(delta, SKETCH_K, power_iters=0, seed=seed, total=total)
    if total <= 0 or not math.isfinite(total):
        return None
    r, capped = pick_rank(f, energy=energy, max_rank=SKETCH_K)
    S = f.S.double()
    if capped or r > SKETCH_K - 8 or float(S[r - 1]) ** 2 <= (1 - energy) * total * (1 + 1e-6):
        return None
    if f.kept_energy(r) < energy * total * (1 + 1e-9):
        return None  # pick_rank forgives 1e-12 of rounding; here the margin goes the safe way
    gap = _gap(S)
    if gap != r or float(S[r - 1] / S[r]) < GAP * SKETCH_MARGIN:
        return None
    return r, gap


def check_factors(B: torch.Tensor, A: torch.Tensor, where: tuple[Path | str | None, str], dtype: str) -> None:
    """Factors of a finite ΔW whose singular values overflow fp32 (an SVD of values near 3e38), or whose
    √σ overflows the written dtype (fp16 ends at 65504), are refused by the tuned tensor's name."""
    if all_finite(B) and all_finite(A):
        return
    wider = spelled("--factor-dtype fp32", "dtype='fp32'")
    raise CheckpointError(
        f"the difference from the base factors into NaN or Inf in {dtype} (factor values beyond its range)",
        path=where[0],
        tensor=where[1],
        hint=f"{wider} holds up to 3.4e38" if dtype != "fp32" else "the tuned weight is extreme",
    )
