"""``detect --base`` and extraction measure ‖ΔW‖² and ‖W_tuned‖² inside the difference pass, block by block
while each block is in cache (issue 26, item 4): the figures must be the separate passes' bit for bit —
``svd.frobenius_sq`` of the whole ΔW and of each tuned block — since the relative change and the SVD's
energies print them."""

from __future__ import annotations

import pytest
import torch

from lora_convert import svd
from lora_convert.difference import Difference, row_blocks


class _Rows:
    def __init__(self, t: torch.Tensor) -> None:
        self.t, self.path, self.name, self.shape = t, "mem", "w", tuple(t.shape)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.t[start:stop]


@pytest.mark.parametrize("first_changed", [0, 1500])  # from the first block, or after blocks left alone
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_sums_made_in_the_difference_pass_are_the_separate_passes(first_changed, dtype):
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(3100, 1024, generator=g) * 0.02).to(dtype)  # 1024 rows a block: four blocks
    tuned = base.clone()
    tuned[first_changed:] += (torch.randn(3100 - first_changed, 1024, generator=g) * 1e-3).to(dtype)
    d = Difference(_Rows(tuned), _Rows(base), keep=True, measure_tuned=True)
    block_sums = []
    for s, e in row_blocks(tuple(tuned.shape)):
        d.add(s, tuned[s:e], base[s:e])
        block_sums.append(d.tuned_sq)
        assert d.tuned_sq == svd.frobenius_sq(tuned[s:e])  # the very figure a second widening would give
    assert len(block_sums) == 4
    delta = d.result()
    want = tuned.float() - base.float()
    assert torch.equal(delta, want)
    assert d.total == svd.frobenius_sq(want) and d.total > 0


def test_an_unchanged_tensor_measures_zero():
    t = torch.randn(300, 64).to(torch.bfloat16)
    d = Difference(_Rows(t), _Rows(t.clone()), keep=True)
    for s, e in row_blocks(tuple(t.shape)):
        d.add(s, t[s:e], t[s:e])
    assert d.result() is None and d.total == 0.0
