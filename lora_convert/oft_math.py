"""PEFT's OFT rotation, pure tensors in and out: no files, no config parsing.

OFT is multiplicative, not additive: PEFT's ``oft.Linear.merge`` is ``W ← (R · Wᵀ)ᵀ = W · Rᵀ`` (Conv2d the
same on the flattened (out, in·k·k) weight, ``oft.Embedding.merge`` ``W ← W · R``), where R is
block-diagonal: ``r`` blocks of ``b × b`` along the weight's input side, each the Cayley transform of a
skew-symmetric matrix whose upper triangle (``torch.triu_indices(b, b, 1)`` order) is one row of the
stored ``oft_R.weight`` (r, b(b−1)/2) — with ``block_share`` one row serves every block.  Row ``o`` of the
merged weight only needs row ``o`` of W, so a block of rows is rotated as the merge engine reads it:
each b-wide slice of each row times ``R_jᵀ`` (one batched GEMM, cost in·b per row), never the dense
(in × in) R PEFT builds.

The blocks are built exactly as PEFT's ``OFTRotationModule.get_weight`` builds them, in fp32:

* ``coft``: first the projection ``_project_batch`` — each block's skew matrix Q kept when ‖Q‖_F ≤ ε/√n
  (n: the stored rows), else scaled to that norm;
* ``use_cayley_neumann``: ``R = I + 2Q + 2Q² + … + 2Q^(t−2) + Q^(t−1)`` (t = ``num_cayley_neumann_terms``;
  the powers by ``bmm`` in PEFT's order), else the exact Cayley ``R = (I − Q)(I + Q)⁻¹`` by ``solve``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from .lora_math import FP32


def block_size(n_elements: int) -> int | None:
    """b with b(b−1)/2 = ``n_elements`` (a stored row's length), or None when there is none."""
    b = (1 + math.isqrt(1 + 8 * n_elements)) // 2
    return b if b * (b - 1) // 2 == n_elements else None


def skew(vec: torch.Tensor, b: int) -> torch.Tensor:
    """PEFT's ``_pytorch_skew_symmetric``: (n, b(b−1)/2) upper triangles -> (n, b, b) skew matrices."""
    rows, cols = torch.triu_indices(b, b, 1)
    m = torch.zeros(vec.shape[0], b, b, dtype=vec.dtype)
    m[:, rows, cols] = vec
    return m - m.transpose(-2, -1)


def project(vec: torch.Tensor, b: int, eps: float) -> torch.Tensor:
    """COFT's ``_project_batch``: each block's Q kept within the Frobenius ball of radius ε/√n."""
    q = skew(vec, b)
    eps_t = eps * 1 / torch.sqrt(torch.tensor(q.shape[0]))
    zero = torch.zeros((b, b), dtype=q.dtype).unsqueeze(0).expand_as(q)
    diff = q - zero
    norm = torch.norm(q - zero, dim=(1, 2), keepdim=True)
    out = torch.where((norm <= eps_t).bool(), q, zero + eps_t * (diff / norm))
    rows, cols = torch.triu_indices(b, b, 1)
    return out[:, rows, cols]


def cayley(vec: torch.Tensor, b: int, *, neumann: bool, terms: int) -> torch.Tensor:
    """PEFT's ``_cayley_batch``: the (n, b, b) rotation blocks of (n, b(b−1)/2) parameters, fp32."""
    vec = vec.to(FP32)
    n = vec.shape[0]
    q = skew(vec, b)
    if neumann:
        r = torch.eye(b, dtype=FP32).repeat(n, 1, 1)
        if terms > 1:
            r.add_(q, alpha=2.0)
            if terms > 2:
                q2 = torch.bmm(q, q)
                r.add_(q2, alpha=2.0)
                power = q2
                for _ in range(3, terms - 1):
                    power = torch.bmm(power, q)
                    r.add_(power, alpha=2.0)
                power = torch.bmm(power, q)
                r.add_(power)
        return r
    eye = torch.eye(b, dtype=FP32).unsqueeze(0).expand(n, b, b)
    return torch.linalg.solve(eye + q, eye - q, left=False)


@dataclass
class BlockRotation:
    """A block-diagonal rotation on a weight's input side, applied to its rows in place.

    ``blocks`` (k, b, b) fp32 are R's diagonal blocks in order (``block_share``: one block, repeated to
    ``count``); ``transposed``: rows become ``row · Rᵀ`` (Linear, Conv2d), else ``row · R`` (Embedding)."""

    blocks: torch.Tensor
    count: int
    transposed: bool = True
    terms: int = 0  # the Neumann series' length (0: the exact Cayley), for verify's bound

    @classmethod
    def build(
        cls,
        vec: torch.Tensor,
        cols: int,
        *,
        transposed: bool,
        coft: bool = False,
        eps: float = 6e-5,
        neumann: bool = True,
        terms: int = 5,
    ) -> BlockRotation:
        """From the stored (n, b(b−1)/2) parameters for a weight of ``cols`` input columns; raises
        ValueError when they are no OFT blocks of that width (n·b ≠ cols, unless n = 1: block_share)."""
        if vec.dim() != 2:
            raise ValueError(f"OFT parameters of shape {list(vec.shape)}: PEFT's are (r, b(b-1)/2)")
        b = block_size(vec.shape[1])
        if b is None:
            raise ValueError(f"rows of {vec.shape[1]} values are no b(b-1)/2 upper triangle of a b×b block")
        if cols % b or (vec.shape[0] != 1 and vec.shape[0] * b != cols):
            raise ValueError(
                f"{vec.shape[0]} block(s) of {b}×{b} do not cover the weight's {cols} input columns"
                + (" (block_share: b must divide them)" if vec.shape[0] == 1 else "")
            )
        vec = vec.to(FP32)
        if coft:
            vec = project(vec, b, eps)
        blocks = cayley(vec, b, neumann=neumann, terms=terms)
        return cls(blocks, cols // b, transposed, terms if neumann else 0)

    @property
    def size(self) -> int:
        return int(self.blocks.shape[-1])

    def _each(self) -> torch.Tensor:
        """(count, b, b): what multiplies each b-wide slice (``Rᵀ`` or R; block_share expanded, no copy)."""
        m = self.blocks.transpose(-2, -1) if self.transposed else self.blocks
        return m.expand(self.count, -1, -1) if m.shape[0] != self.count else m

    def rotate_(self, acc: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``acc`` (n, cols) fp32 rows replaced by their rotation: one bmm over the blocks."""
        return _blockwise_(acc, self._each())

    @property
    def depth(self) -> int:
        """Each merged entry is a dot product of length b with R's entries, which are themselves sums of up
        to b·t products (t Neumann terms; b·b for the exact Cayley's solve, whose conditioning is not bounded
        here): what verify's bound counts."""
        return self.size * (1 + (self.terms or self.size))

    def magnitude(self) -> BlockRotation:
        """The same rotation on ``|R|``: ``|W| · |R|ᵀ`` bounds the magnitude of every product in an entry."""
        return BlockRotation(self.blocks.abs(), self.count, self.transposed, self.terms)

    def to(self, device: torch.device | str) -> BlockRotation:
        return BlockRotation(self.blocks.to(device), self.count, self.transposed, self.terms)


def _blockwise_(acc: torch.Tensor, each: torch.Tensor) -> torch.Tensor:
    """``acc`` (n, k·b) with each b-wide slice j replaced by ``slice @ each[j]`` ((k, b, b)): one bmm."""
    n, (k, b) = acc.shape[0], each.shape[:2]
    y = torch.bmm(acc.view(n, k, b).transpose(0, 1), each)  # (k, n, b)
    acc.view(n, k, b).copy_(y.transpose(0, 1))
    return acc


class Rotation(Protocol):
    """What the merge engine applies to a row block in place of adding a ΔW: OFT's :class:`BlockRotation`,
    BOFT's :class:`ButterflyRotation`.  ``rotate_`` rewrites fp32 rows ``start:start+n`` of the merged weight."""

    def rotate_(self, acc: torch.Tensor, start: int = 0) -> torch.Tensor: ...

    @property
    def depth(self) -> int: ...

    def magnitude(self) -> Rotation: ...

    def to(self, device: torch.device | str) -> Rotation: ...


def butterfly_perm(n: int, b: int, r: int, n_butterfly_factor: int) -> torch.Tensor:
    """PEFT's ``BOFTLayer.block_butterfly_perm``: the column order of one butterfly factor (n inputs, b blocks
    after it, base block r; identity when there is one factor)."""
    if n_butterfly_factor == 0:
        return torch.arange(n)
    if b * r * 2 > n:
        raise ValueError("Invalid number of blocks!")
    size = int(n // b)
    indices = torch.arange(n)
    step = size / r
    initial = torch.arange(size)
    order = torch.empty(size, dtype=torch.long)
    seq = torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)), dim=0)
    for i, pos in enumerate(seq):
        order[int(i * r) : int(i * r + r)] = initial[int(pos * r) : int(pos * r + r)]
    for i in range(0, n, size):
        indices[i : i + size] = indices[i : i + size][order]
    return indices


def boft_cayley(data: torch.Tensor) -> torch.Tensor:
    """PEFT's ``BOFTLayer.cayley_batch``: (k, b, b) free matrices, their skew part S = (A − Aᵀ)/2, the exact
    Cayley ``(I − S)(I + S)⁻¹`` by ``solve``.  fp32."""
    data = data.to(FP32)
    k, b, _ = data.shape
    s = 0.5 * (data - data.transpose(1, 2))
    eye = torch.eye(b, dtype=FP32).unsqueeze(0).expand(k, b, b)
    return torch.linalg.solve(eye + s, eye - s, left=False)


@dataclass
class ButterflyRotation:
    """BOFT: ``W ← (R·Wᵀ)ᵀ ⊙ s`` with R = F_(m−1)···F_1·F_0, each factor F_i = P_i·B_i·P_iᵀ (B_i block-diagonal,
    P_i PEFT's butterfly permutation) and s one scale per output row.  A row times Rᵀ is the row times
    F_0ᵀ, then F_1ᵀ, …: per factor its columns permuted, each b-wide slice times a block, permuted back.

    ``blocks`` (m, D, b, b) the Cayley blocks of each factor; ``perms`` each factor's column order (None:
    the identity); ``scale`` (out,) fp32."""

    blocks: torch.Tensor
    perms: list[torch.Tensor | None]
    scale: torch.Tensor

    @classmethod
    def build(cls, boft_r: torch.Tensor, boft_s: torch.Tensor, cols: int) -> ButterflyRotation:
        """From the stored ``boft_R`` (m, D, b, b) and ``boft_s`` for a weight of ``cols`` input columns; raises
        ValueError when they are no butterfly of that width."""
        if boft_r.dim() != 4 or boft_r.shape[2] != boft_r.shape[3]:
            raise ValueError(f"boft_R of shape {list(boft_r.shape)}: PEFT's is (factors, blocks, b, b)")
        m, d, b, _ = boft_r.shape
        if d * b != cols:
            raise ValueError(f"{d} block(s) of {b}×{b} do not cover the weight's {cols} input columns")
        if m > 1 and (d % (2 ** (m - 1)) or b % 2 or d % 2):
            raise ValueError(f"{m} butterfly factors of {d} blocks of {b}×{b}: PEFT builds no such butterfly")
        perms: list[torch.Tensor | None] = []
        for i in range(m):
            p = butterfly_perm(cols, int(d / (2**i)), int(b / 2), m - 1)
            perms.append(None if torch.equal(p, torch.arange(cols)) else p)
        blocks = boft_cayley(boft_r.reshape(m * d, b, b)).reshape(m, d, b, b)
        return cls(blocks, perms, boft_s.to(FP32).reshape(-1))

    def rotate_(self, acc: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``acc`` (n, cols) fp32 rows ``start:start+n`` replaced by ``row·Rᵀ ⊙ s``."""
        for f, perm in enumerate(self.perms):
            each = self.blocks[f].transpose(-2, -1)
            if perm is None:
                _blockwise_(acc, each)
                continue
            x = acc[:, torch.argsort(perm)]  # x·P_i
            acc.copy_(_blockwise_(x, each)[:, perm])  # ·B_iᵀ·P_iᵀ
        return acc.mul_(self.scale[start : start + acc.shape[0]].unsqueeze(1))

    @property
    def depth(self) -> int:
        """m factors, each a b-long dot product on entries from a b×b solve, then the scale."""
        m, _, b, _ = self.blocks.shape
        return m * b * (1 + b) + 1

    def magnitude(self) -> ButterflyRotation:
        """The same factors on ``|B_i|`` and ``|s|``: applied to |W| they bound every product in an entry."""
        return ButterflyRotation(self.blocks.abs(), self.perms, self.scale.abs())

    def to(self, device: torch.device | str) -> ButterflyRotation:
        perms = [p.to(device) if p is not None else None for p in self.perms]
        return ButterflyRotation(self.blocks.to(device), perms, self.scale.to(device))


def householder_vt(u: torch.Tensor, apply_gs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``HRALayer._get_householder_vt``: (V, T) with the product of the r reflections of ``u``'s columns
    H = I − V·T·Vᵀ (compact WY form).  ``apply_gs``: V = Q of u's reduced QR and T = 2I; else V = u's columns
    normalised and T = (I/2 + triu(VᵀV, 1))⁻¹ by a triangular solve.  fp32."""
    u = u.to(FP32)
    eye = torch.eye(u.shape[1], dtype=FP32)
    if apply_gs:
        return torch.linalg.qr(u, mode="reduced").Q, 2 * eye
    v = u / u.norm(dim=0)
    tinv = 0.5 * eye + torch.triu(v.T @ v, diagonal=1)
    return v, torch.linalg.solve_triangular(tinv, eye, upper=True)


@dataclass
class HouseholderRotation:
    """HRA: ``W ← W·H`` with H = I − V·T·Vᵀ (V (in, r), T (r, r)): a row becomes ``row − ((row·V)·T)·Vᵀ``, two thin
    products (cost 2·in·r per row), never the dense (in × in) H PEFT builds.  ``sign`` −1; +1 for the
    magnitude that bounds it (|W| + |W|·|V|·|T|·|V|ᵀ)."""

    v: torch.Tensor
    t: torch.Tensor
    sign: float = -1.0

    @classmethod
    def build(cls, u: torch.Tensor, cols: int, *, apply_gs: bool) -> HouseholderRotation:
        """From the stored ``hra_u`` (in, r) for a weight of ``cols`` input columns; raises ValueError when it is
        not as wide as the weight, or has more reflections than columns."""
        if u.dim() != 2 or u.shape[0] != cols:
            raise ValueError(f"hra_u {list(u.shape)} is not (in, r) with in = the weight's {cols} input columns")
        if u.shape[1] > cols or u.shape[1] == 0:
            raise ValueError(f"hra_u {list(u.shape)} holds {u.shape[1]} reflections of {cols}-wide rows")
        v, t = householder_vt(u, apply_gs)
        return cls(v, t)

    def rotate_(self, acc: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``acc`` (n, cols) fp32 rows replaced by ``row·H``."""
        return acc.addmm_(torch.mm(torch.mm(acc, self.v), self.t), self.v.T, alpha=self.sign)

    @property
    def depth(self) -> int:
        """row·V is a dot product of length in, then ·T (r) and ·Vᵀ (r), the subtraction; V and T themselves
        come from a normalisation or QR and a triangular solve of order r (counted r² more)."""
        r = int(self.v.shape[1])
        return int(self.v.shape[0]) + 2 * r + r * r + 1

    def magnitude(self) -> HouseholderRotation:
        return HouseholderRotation(self.v.abs(), self.t.abs(), 1.0)

    def to(self, device: torch.device | str) -> HouseholderRotation:
        return HouseholderRotation(self.v.to(device), self.t.to(device), self.sign)


def lycoris_cayley(oft_blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """LyCORIS's Diag-OFT and BOFT ``get_r``: Q = A − Aᵀ of the stored (…, b, b) blocks, scaled down to the norm
    ``constraint`` when the Frobenius norm of all k of them together (+1e-8) exceeds it (``constraint`` > 0),
    then R = (I + Q)(I − Q)⁻¹ — the other sign from PEFT's.  fp32."""
    a = oft_blocks.to(FP32)
    q = a - a.transpose(-2, -1)
    if constraint > 0:
        norm = torch.norm(q) + 1e-8
        if norm > constraint:
            q = q * constraint / norm
    eye = torch.eye(a.shape[-1], dtype=FP32).unsqueeze(0).expand_as(q)
    return torch.linalg.solve(eye - q, eye + q, left=False)


@dataclass
class OutputRotation:
    """LyCORIS's Diag-OFT: ``W ← s ⊙ (Rᵀ·W)`` with R block-diagonal on the weight's OUTPUT side (LyCORIS's
    ``einsum("k n m, k n ... -> k m ...", R, W)``: rows ``j·b … j·b+b−1`` mixed by ``R_jᵀ``) and ``s`` its optional
    per-row ``rescale``.  A row depends on the b rows of its block, so the engine reads whole blocks of rows
    (``block_plan`` rounds its step to a multiple of ``unit``): memory stays one row block's fp32 tile.

    ``blocks`` (k, b, b) fp32; ``scale`` (out,) fp32 or None."""

    blocks: torch.Tensor
    scale: torch.Tensor | None = None

    @classmethod
    def build(
        cls, oft_blocks: torch.Tensor, rescale: torch.Tensor | None, rows: int, constraint: float
    ) -> OutputRotation:
        """From the stored ``oft_blocks`` (k, b, b), ``rescale`` (out, 1, …) and ``alpha`` (the constraint, times
        the output rows as LyCORIS multiplies it) for a weight of ``rows`` output rows; raises ValueError when they
        do not fit it."""
        if oft_blocks.dim() != 3 or oft_blocks.shape[1] != oft_blocks.shape[2] or 0 in oft_blocks.shape:
            raise ValueError(f"oft_blocks {list(oft_blocks.shape)} are not (k, b, b) blocks")
        k, b, _ = oft_blocks.shape
        if k * b != rows:
            raise ValueError(f"{k} block(s) of {b}×{b} do not cover the weight's {rows} output rows")
        scale = None
        if rescale is not None:
            if rescale.numel() != rows or rescale.shape[0] != rows:
                raise ValueError(f"rescale {list(rescale.shape)} is not one scale per output row ({rows})")
            scale = rescale.to(FP32).reshape(-1)
        return cls(lycoris_cayley(oft_blocks, constraint * rows), scale)

    @property
    def unit(self) -> int:
        """The rows one block mixes: a row block read must start and end on a multiple of it."""
        return int(self.blocks.shape[-1])

    def rotate_(self, acc: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``acc`` (n, cols) fp32 rows ``start:start+n`` (whole blocks) replaced by their rotation: one bmm."""
        n, cols = acc.shape
        b = self.unit
        if start % b or n % b:
            raise ValueError(f"rows {start}:{start + n} are not whole {b}-row blocks of an output-side rotation")
        k0 = start // b
        blocks = self.blocks[k0 : k0 + n // b].transpose(-2, -1)  # Rᵀ per block
        y = torch.bmm(blocks, acc.view(n // b, b, cols))
        acc.view(n // b, b, cols).copy_(y)
        if self.scale is not None:
            acc.mul_(self.scale[start : start + n].unsqueeze(1))
        return acc

    @property
    def depth(self) -> int:
        """Each merged entry is a b-long dot product with R's entries, themselves from a b×b solve (b·b), then
        the scale."""
        b = self.unit
        return b * (1 + b) + 1

    def magnitude(self) -> OutputRotation:
        return OutputRotation(self.blocks.abs(), self.scale.abs() if self.scale is not None else None)

    def to(self, device: torch.device | str) -> OutputRotation:
        return OutputRotation(self.blocks.to(device), self.scale.to(device) if self.scale is not None else None)


@dataclass
class OutputButterfly:
    """LyCORIS's BOFT: the weight's output rows through m butterfly stages, then ``rescale``: stage i mixes, within
    each group of 2^i·b rows, the rows ``j`` and ``j + 2^(i−1)·b``… as LyCORIS's ``_diff_weight`` regroups them
    (``(c g k) -> (c k g)``, g = 2, k = 2^i·b/2), each b rows times its block ``B`` (not Bᵀ), and back.  The last
    stage mixes 2^(m−1)·b rows (``unit``, for a full butterfly all of them): the engine reads whole units, so a
    merge holds at most that many rows' fp32 tile.

    ``blocks`` (m, k, b, b) fp32 (k·b = out); ``scale`` (out,) fp32 or None."""

    blocks: torch.Tensor
    scale: torch.Tensor | None = None

    @classmethod
    def build(
        cls, oft_blocks: torch.Tensor, rescale: torch.Tensor | None, rows: int, constraint: float
    ) -> OutputButterfly:
        """From the stored ``oft_blocks`` (m, k, b, b), ``rescale`` (out, 1, …) and ``alpha`` (the constraint,
        times the output rows as LyCORIS multiplies it); raises ValueError when they do not fit ``rows``."""
        if oft_blocks.dim() != 4 or oft_blocks.shape[2] != oft_blocks.shape[3] or 0 in oft_blocks.shape:
            raise ValueError(f"oft_blocks {list(oft_blocks.shape)} are not (m, k, b, b) butterfly blocks")
        m, k, b, _ = oft_blocks.shape
        if k * b != rows:
            raise ValueError(f"{k} block(s) of {b}×{b} do not cover the weight's {rows} output rows")
        if b % 2 or k % (2 ** (m - 1)):
            raise ValueError(f"{m} butterfly stages of {k} blocks of {b}×{b}: LyCORIS builds no such butterfly")
        scale = None
        if rescale is not None:
            if rescale.numel() != rows or rescale.shape[0] != rows:
                raise ValueError(f"rescale {list(rescale.shape)} is not one scale per output row ({rows})")
            scale = rescale.to(FP32).reshape(-1)
        return cls(lycoris_cayley(oft_blocks, constraint * rows), scale)

    @property
    def unit(self) -> int:
        m, _, b, _ = self.blocks.shape
        return int(2 ** (m - 1) * b)

    def rotate_(self, acc: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``acc`` (n, cols) fp32 rows ``start:start+n`` (whole units) replaced by the butterfly's."""
        n, cols = acc.shape
        m, _, b, _ = self.blocks.shape
        if start % self.unit or n % self.unit:
            raise ValueError(f"rows {start}:{start + n} are not whole {self.unit}-row units of a butterfly")
        x = acc
        first = start // b
        for i in range(m):
            k = 2**i * (b // 2)
            x = x.view(-1, 2, k, cols).transpose(1, 2).reshape(n // b, b, cols)  # (c g k) -> (c k g), b at a time
            x = torch.bmm(self.blocks[i, first : first + n // b], x)
            x = x.view(-1, k, 2, cols).transpose(1, 2).reshape(n, cols)  # back
        acc.copy_(x)
        if self.scale is not None:
            acc.mul_(self.scale[start : start + n].unsqueeze(1))
        return acc

    @property
    def depth(self) -> int:
        """m stages, each a b-long dot product on entries from a b×b solve, then the scale."""
        m, _, b, _ = self.blocks.shape
        return m * b * (1 + b) + 1

    def magnitude(self) -> OutputButterfly:
        return OutputButterfly(self.blocks.abs(), self.scale.abs() if self.scale is not None else None)

    def to(self, device: torch.device | str) -> OutputButterfly:
        return OutputButterfly(self.blocks.to(device), self.scale.to(device) if self.scale is not None else None)


def road_columns(
    variant: str, group: int, theta: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's RoAd ``_prepare_cols``: per output row j, the diagonal α·cosθ and the partner's α·sinθ (road_1: one
    (θ, α) per pair, repeated over the group's halves; road_2: one per row; road_4: separate (θ, α) for the two)."""
    theta, alpha = theta.to(FP32), alpha.to(FP32)
    if variant == "road_1":
        theta = theta.reshape(-1, group // 2).repeat_interleave(2, dim=0).flatten()
        alpha = alpha.reshape(-1, group // 2).repeat_interleave(2, dim=0).flatten()
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    t, a = theta.reshape(-1, 2, group), alpha.reshape(-1, 2, group)
    return a[:, 0, :].flatten() * t[:, 0, :].cos().flatten(), a[:, 1, :].flatten() * t[:, 1, :].sin().flatten()


@dataclass
class RoadRotation:
    """PEFT's RoAd merge ``W ← R·W`` (and ``b ← R·b``): R mixes output rows in groups of ``unit``, row j of the
    first half with row j + unit/2: y_j = c_j·x_j − s_j·x_{j+g/2}, y_{j+g/2} = c_{j+g/2}·x_{j+g/2} + s_{j+g/2}·x_j
    (``first``: c, ``second``: s, per output row).  The engine reads whole groups (``rows_mixed``)."""

    first: torch.Tensor  # fp32 (out,)
    second: torch.Tensor  # fp32 (out,)
    unit: int

    def rotate_(self, acc: torch.Tensor, start: int = 0) -> torch.Tensor:
        n, cols = acc.shape
        g = self.unit
        if start % g or n % g:
            raise ValueError(f"rows {start}:{start + n} are not whole {g}-row groups of RoAd's rotation")
        x = acc.view(n // g, 2, g // 2, cols)
        c = self.first[start : start + n].view(n // g, 2, g // 2, 1)
        s = self.second[start : start + n].view(n // g, 2, g // 2, 1)
        swapped = torch.stack((-x[:, 1], x[:, 0]), dim=1)
        acc.view(n // g, 2, g // 2, cols).copy_(x * c + swapped * s)
        return acc

    @property
    def depth(self) -> int:
        return 3

    def magnitude(self) -> RoadRotation:
        """|R| applied to |W| (the partner's term made positive too)."""
        return _RoadMagnitude(self.first.abs(), self.second.abs(), self.unit)

    def to(self, device: torch.device | str) -> RoadRotation:
        return type(self)(self.first.to(device), self.second.to(device), self.unit)


class _RoadMagnitude(RoadRotation):
    def rotate_(self, acc: torch.Tensor, start: int = 0) -> torch.Tensor:
        n, cols = acc.shape
        g = self.unit
        x = acc.view(n // g, 2, g // 2, cols)
        c = self.first[start : start + n].view(n // g, 2, g // 2, 1)
        s = self.second[start : start + n].view(n // g, 2, g // 2, 1)
        swapped = torch.stack((x[:, 1], x[:, 0]), dim=1)
        acc.view(n // g, 2, g // 2, cols).copy_(x * c + swapped * s)
        return acc
