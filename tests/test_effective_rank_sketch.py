"""``detect --base``'s effective rank looks at a cheap sketch first (issue 26, item 4): a merged LoRA (a few
large directions over rounding noise) is settled there, anything the sketch cannot settle gets the top-64
search.  Both answers are checked against the exact SVD's spectrum and against the full search."""

from __future__ import annotations

import pytest
import torch

from lora_convert import svd


@pytest.fixture(autouse=True)
def _one_thread():
    """One kernel thread, as detect runs them on two cores: a second OpenMP thread spins on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _full_search(monkeypatch: pytest.MonkeyPatch, delta: torch.Tensor) -> tuple[int | None, int | None]:
    with monkeypatch.context() as m:
        m.setattr(svd, "SKETCH_K", 10**6)  # no sketch: the top-k search alone, as before
        return svd.effective_rank(delta, 0.999, k=64)


def _exact(delta: torch.Tensor, energy: float = 0.999) -> tuple[int, int | None]:
    """Rank at ``energy`` and at the largest gap ≥ 10× among the top 64, from the exact fp64 spectrum."""
    s = torch.linalg.svdvals(delta.double())
    kept = torch.cumsum(s**2, 0) / (s**2).sum()
    r = int(torch.nonzero(kept >= energy)[0]) + 1
    top = s[:64]
    ratios = top[:-1] / top[1:]
    i = int(torch.argmax(ratios))
    return r, (i + 1 if float(ratios[i]) >= 10 else None)


def _merged(rows: int, cols: int, rank: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """ΔW of a rank-``rank`` LoRA merged into a ``dtype`` weight: the product plus the rounding noise."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    b, a = torch.randn(rows, rank, generator=g) * 0.05, torch.randn(rank, cols, generator=g) * 0.05
    base = w.to(dtype)
    return (base.float() + b @ a).to(dtype).float() - base.float()


@pytest.mark.parametrize(("rank", "dtype"), [(8, torch.bfloat16), (16, torch.float16), (4, torch.float32)])
def test_a_merged_lora_is_settled_by_the_sketch_as_the_full_search_and_the_exact_svd_settle_it(
    monkeypatch, rank, dtype
):
    delta = _merged(600, 400, rank, dtype)
    calls = []
    real = svd.randomized_svd
    monkeypatch.setattr(svd, "randomized_svd", lambda *a, **k: calls.append(k.get("power_iters")) or real(*a, **k))
    got = svd.effective_rank(delta, 0.999, k=64)
    assert calls == [0]  # the sketch alone: no top-64 search after it
    assert got == (rank, rank) == _exact(delta)
    monkeypatch.setattr(svd, "randomized_svd", real)
    assert _full_search(monkeypatch, delta) == got


def test_what_the_sketch_cannot_settle_goes_to_the_full_search(monkeypatch):
    g = torch.Generator().manual_seed(1)
    full = torch.randn(600, 400, generator=g)  # a fine-tune: no low rank, no gap
    wide = _merged(600, 400, 28, torch.bfloat16)  # a rank past what the 32-column sketch settles
    real = svd.randomized_svd
    calls: list[int] = []
    monkeypatch.setattr(svd, "randomized_svd", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    for delta in (full, wide):
        calls.clear()
        got = svd.effective_rank(delta, 0.999, k=64)
        assert calls == [svd.SKETCH_K, 64]  # sketched, then searched
        assert got == _full_search(monkeypatch, delta)
    monkeypatch.setattr(svd, "randomized_svd", real)
    assert svd.effective_rank(full, 0.999, k=64) == (None, None)
    assert svd.effective_rank(wide, 0.999, k=64) == (28, 28) == _exact(wide)
