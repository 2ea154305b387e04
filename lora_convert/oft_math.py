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

    def rotate_(self, acc: torch.Tensor) -> torch.Tensor:
        """``acc`` (n, cols) fp32 rows replaced by their rotation: one bmm over the blocks."""
        n, b = acc.shape[0], self.size
        x = acc.view(n, self.count, b).transpose(0, 1)  # (count, n, b)
        y = torch.bmm(x, self._each())
        acc.view(n, self.count, b).copy_(y.transpose(0, 1))
        return acc

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
