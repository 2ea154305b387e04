"""verify's common block — MERGED's bits equal the expected merge's — takes a shorter path through
:class:`~lora_convert.closeness.Agreement` (issue 26, item 2): every figure it leaves must be the general
path's, bit for bit, whatever the block holds (zeros, subnormals, Inf/NaN, fp16, no base, no bound)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lora_convert import closeness
from lora_convert.closeness import Agreement

FIELDS = [f.name for f in dataclasses.fields(Agreement) if f.name not in ("scratch", "_pool")]


def _blocks(dtype: torch.dtype, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """(merged, expected, base, bound, ΔW) blocks: equal ones of every kind of value, then one that differs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for kind in ("plain", "zeros", "tiny", "plain", "differs"):
        w = torch.randn(64, 48, generator=g) * 0.02
        if kind == "zeros":
            w[::3] = 0.0
        if kind == "tiny":
            w[1::4] = 2.0**-125 * torch.rand(w[1::4].shape, generator=g)  # down into the subnormals
            w[2::4] = -0.0
        base = w.to(dtype)
        delta = torch.randn(64, 48, generator=g) * 1e-3
        expected = (base.float() + delta).to(dtype)
        merged = expected.clone()
        if kind == "differs":
            merged.view(-1)[7] = float(merged.view(-1)[7]) * 1.5
        bound = (base.float().abs() * 1e-6 + 1e-9).contiguous()
        out.append((merged, expected, base, bound, delta))
    return out


def _run(blocks, dtype, fast: bool, monkeypatch, *, base=True, bound=True, delta=True, **kw) -> Agreement:
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(Agreement, "_add_equal", lambda *a: False)
        ag = Agreement(dtype, **kw)
        for merged, expected, b, bd, dx in blocks:
            ag.add(
                merged,
                expected,
                b if base else None,
                bd.clone() if bound else None,
                dx if delta else None,
            )
    return ag


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("parts", [{}, {"base": False}, {"bound": False}, {"delta": False}])
def test_the_equal_block_path_leaves_the_general_paths_figures(monkeypatch, dtype, parts):
    blocks = _blocks(dtype, seed=3)
    taken = []
    real = Agreement._add_equal
    monkeypatch.setattr(Agreement, "_add_equal", lambda self, *a: taken.append(real(self, *a)) or taken[-1])
    fast = _run(blocks, dtype, True, monkeypatch, **parts)
    assert taken == [True, True, True, True, False]  # the last block differs: the general path
    slow = _run(blocks, dtype, False, monkeypatch, **parts)
    for f in FIELDS:
        a, b = getattr(fast, f), getattr(slow, f)
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), f
    assert fast.worst > 1 and fast.beyond == 1  # and the figures are the real ones: one element off
    if parts.get("delta", True) and parts.get("base", True):
        assert fast.scale() is not None and abs(fast.scale() - 1) < 1e-2


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_block_equal_bit_for_bit_but_not_finite_is_the_general_paths(monkeypatch, bad):
    (merged, expected, base, bound, delta), *_ = _blocks(torch.bfloat16, seed=4)
    merged.view(-1)[5] = bad
    expected.view(-1)[5] = bad  # the same bits on both sides: NaN − NaN is no "equal"
    ag = Agreement(torch.bfloat16)
    assert not ag._add_equal(merged, expected, base, bound.clone(), delta, None)
    ag.add(merged, expected, base, bound.clone(), delta)
    assert ag.nonfinite == 1 and math.isinf(ag.worst)


def test_slack_and_extra_ulps_take_the_general_path():
    (merged, expected, base, bound, delta), *_ = _blocks(torch.bfloat16, seed=5)
    for kw in ({"slack": 2.0}, {"extra_ulps": 1.0}):
        assert not Agreement(torch.bfloat16, **kw)._add_equal(merged, expected, base, bound.clone(), delta, None)
    assert Agreement(torch.bfloat16)._add_equal(merged, expected, base, bound.clone(), delta, None)


def test_bf16_ulps_from_exponent_patterns_are_the_general_ones():
    """Every finite bf16 value from 2⁻¹¹⁹ up: its ulp read off the exponent pattern (the equal path) is the
    general path's ulp bit for bit."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = every[torch.isfinite(every) & (every.abs() >= 2.0**-119)]
    m = x.float()
    general = Agreement(torch.bfloat16)._ulp_of_larger(m, m.clone(), x, x.clone())
    shifted = torch.bitwise_and(x.view(torch.int16), 0x7F80).sub(closeness._BF16_ULP_SHIFT).view(torch.bfloat16)
    assert torch.equal(shifted.float(), general)
