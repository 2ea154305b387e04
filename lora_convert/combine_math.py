"""PEFT's ``add_weighted_adapter`` combinations (PEFT 0.21), as pure tensor functions: no files, no configs.

Each function repeats PEFT's operations in PEFT's order, so that the results are bit-identical:

* ``cat`` — ``A = cat(Aᵢ·wᵢ·sᵢ)``, ``B = cat(Bᵢ)``, zero-padded to the summed rank: ``B·A = Σ wᵢ·sᵢ·Bᵢ·Aᵢ``
  exactly (the only method that is);
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` — applied to the factors
  A and B *separately*, with weights ``±√|wᵢ·sᵢ|`` (the sign on A), so ``B·A`` holds cross terms ``Bᵢ·Aⱼ``;
* ``svd`` and the ``*_svd`` variants — the same merges applied to each ``ΔWᵢ = sᵢ·Bᵢ·Aᵢ`` (in PEFT's
  orientation), then a full SVD truncated to the new rank: ``B = U·diag(S)``, ``A = Vh``.

The random methods (dare) draw from a ``torch.Generator``; :func:`replay_init` consumes what PEFT's
creation of the new adapter draws first, so that the same seed gives PEFT's masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = ("cat", *FACTOR_METHODS, *SVD_METHODS)
RANDOM_METHODS = frozenset({"dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"})
PRUNING_METHODS = frozenset(
    m for m in METHODS if m.split("_svd")[0] in ("ties", "dare_linear", "dare_ties", "magnitude_prune")
)
SIGN_METHODS = ("total", "frequency")
FP32 = torch.float32


def prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density·numel)`` largest |values| (PEFT's ``magnitude_based_pruning``)."""
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    k = int(density * t.numel())
    top_k = torch.topk(t.abs().reshape(-1), k=k, largest=True)
    mask[top_k[1]] = 1
    return t * mask.reshape(t.shape)


def prune_random(t: torch.Tensor, density: float, gen: torch.Generator | None) -> torch.Tensor:
    """Keep each value with probability ``density``, rescaled by 1/density (dare); no draw at density 1."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=gen)
    return (t * mask) / density


def _sign_mask(t: torch.Tensor, method: str) -> torch.Tensor:
    sign = t.sign()
    magnitude = t.sum(dim=0) if method == "total" else sign.sum(dim=0)
    majority = torch.where(magnitude >= 0, 1, -1)
    return sign == majority


def merge_tasks(
    tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    method: str,
    *,
    density: float | None = None,
    sign_method: str = "total",
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """One of PEFT's ``merge_utils`` merges (``method`` without ``_svd``) of same-shape ``tensors``;
    ``weights`` is a float32 tensor, one weight per tensor."""
    if method in ("ties", "magnitude_prune"):
        assert density is not None
        tensors = [prune_magnitude(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        assert density is not None
        tensors = [prune_random(t, density, gen) for t in tensors]
    stacked = torch.stack(list(tensors), dim=0)
    w = weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))
    if method in ("ties", "dare_ties"):
        mask = _sign_mask(stacked, sign_method)  # elected on the unweighted tensors, as PEFT does
        mixed = (stacked * w * mask).sum(dim=0)
        return mixed / torch.clamp(mask.sum(dim=0), min=1.0)
    return (stacked * w).sum(dim=0)


def cat_factors(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor, float, float]], new_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cat``: parts are (A, B, weight, scaling); A rows and B columns zero-padded to ``new_rank``."""
    a = torch.cat([pa * w * s for pa, _, w, s in parts], dim=0)
    b = torch.cat([pb for _, pb, _, _ in parts], dim=1)
    out_a = a.new_zeros((new_rank, a.shape[1]))
    out_b = b.new_zeros((b.shape[0], new_rank))
    out_a[: a.shape[0], :] = a
    out_b[:, : b.shape[1]] = b
    return out_a, out_b


def factor_weights(weights: Sequence[float], scalings: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The factor methods' weights: ``±√|w·s|`` for A (the sign rides on A only), ``√|w·s|`` for B."""
    wa, wb = [], []
    for w, s in zip(weights, scalings, strict=True):
        ws = w * s
        sign = 1 if ws >= 0 else -1
        wa.append(math.sqrt(abs(ws)) * sign)
        wb.append(math.sqrt(abs(ws)))
    return torch.tensor(wa), torch.tensor(wb)


def combine_factors(
    a_list: Sequence[torch.Tensor],
    b_list: Sequence[torch.Tensor],
    weights: Sequence[float],
    scalings: Sequence[float],
    method: str,
    *,
    density: float | None = None,
    sign_method: str = "total",
    gen: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """linear / ties / dare_* / magnitude_prune on the factors: every A first, then every B (the order
    PEFT draws dare's masks in)."""
    wa, wb = factor_weights(weights, scalings)
    dtype = a_list[0].dtype
    a = merge_tasks(a_list, wa, method, density=density, sign_method=sign_method, gen=gen)
    b = merge_tasks(b_list, wb, method, density=density, sign_method=sign_method, gen=gen)
    return a.to(dtype), b.to(dtype)


def peft_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, *, transpose: bool) -> torch.Tensor:
    """``get_delta_weight``: ``(B@A)·s``, transposed for fan_in_fan_out and embeddings (PEFT's orientation)."""
    d = b @ a
    return (d.T if transpose else d) * scaling


def svd_factors(
    delta: torch.Tensor, new_rank: int, *, clamp: float | None = None, full_matrices: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (Vh[:r], U[:, :r]·diag(S[:r])) of ``delta`` in (out, in) orientation; ``clamp`` is a
    quantile of the signed values of both factors that clamps them (PEFT's ``svd_clamp``)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices)
    u = u[:, :new_rank]
    s = s[:new_rank]
    u = u @ torch.diag(s)
    vh = vh[:new_rank, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
    return vh, u


def replay_init(
    gen: torch.Generator, kind: str, rank: int, n_in: int, n_out: int, init: object, lora_bias: bool = False
) -> None:
    """Draw what PEFT's ``update_layer`` draws when it creates the new adapter's tensors for one module
    (``nn.Linear`` init of A and B, then ``init_lora_weights``; embeddings: ``randn`` of both, then
    ``normal_`` of B), so that dare's masks come next in the stream, as in PEFT."""
    if kind == "embedding":
        torch.randn((rank, n_in), generator=gen)
        b = torch.randn((n_out, rank), generator=gen)
        if init is not False:
            torch.nn.init.normal_(b, generator=gen)
        return
    a = torch.empty(rank, n_in)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
    b = torch.empty(n_out, rank)
    torch.nn.init.kaiming_uniform_(b, a=math.sqrt(5), generator=gen)
    if lora_bias:
        torch.empty(n_out).uniform_(-1, 1, generator=gen)
    if init is True:
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
    elif isinstance(init, str) and init.lower() == "gaussian":
        torch.nn.init.normal_(a, std=1 / rank, generator=gen)
