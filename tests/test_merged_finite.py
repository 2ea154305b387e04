"""lora_math.merged_finite: the merge's cheaper finite check gives all_finite's verdict on every input,
including the cases its first pass (a sum) cannot settle alone."""

from __future__ import annotations

import pytest
import torch

from lora_convert.lora_math import all_finite, merged_finite


def _blocks() -> list[tuple[str, torch.Tensor]]:
    out = []
    for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        base = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)).to(dt)
        out.append((f"{dt} finite", base))
        for bad in (float("inf"), float("-inf"), float("nan")):
            t = base.clone()
            t[17, 5] = bad
            out.append((f"{dt} {bad}", t))
        both = base.clone()
        both[0, 0], both[1, 1] = float("inf"), float("-inf")  # sum is NaN, not Inf
        out.append((f"{dt} +inf-inf", both))
        big = torch.full((64, 48), torch.finfo(dt).max, dtype=dt)  # every element finite, the sum overflows
        out.append((f"{dt} sum overflows", big))
        out.append((f"{dt} empty", torch.empty(0, 48, dtype=dt)))
    return out


@pytest.mark.parametrize(("label", "t"), _blocks(), ids=[label for label, _ in _blocks()])
def test_same_verdict_as_all_finite(label: str, t: torch.Tensor) -> None:
    expect = "finite" in label or "overflows" in label or "empty" in label
    assert all_finite(t) is expect
    assert merged_finite(t) is expect
