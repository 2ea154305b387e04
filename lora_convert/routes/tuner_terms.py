"""A LoHa, LoKr or full-diff module's ΔW as the merge engine's row producer (:class:`lora_math.RowDelta`): its
factors read and checked against each other and the base weight, then handed to :mod:`..tuner_math`.

PEFT builds LoHa and LoKr only on ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` (its ``layers_mapping``):
a weight stored transposed (GPT-2's ``Conv1D``) has no LoHa/LoKr in PEFT, so one is refused by name
rather than given a reading PEFT never defined.
"""

from __future__ import annotations

import math

import torch

from .. import lora_math, tuner_math
from ..errors import AdapterError, UnsupportedError
from ..inventory import LoraModule
from ..io.reader import Checkpoint
from .common import check_finite

LOHA_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOHA_TUCKER = ("hada_t1", "hada_t2")
LOKR_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _read(m: LoraModule, ck: Checkpoint, name: str) -> torch.Tensor | None:
    key = m.factors.get(name)
    return check_finite(ck.read(key), ck, key) if key is not None else None


def _unfit(m: LoraModule, ck: Checkpoint, what: str, tensor: str | None = None) -> AdapterError:
    return AdapterError(
        f"{m.tuner} module {m.module}: {what}",
        path=ck.root,
        tensor=tensor or m.a_key,
        hint="is this adapter for this base model?",
    )


def delta(
    m: LoraModule, ck: Checkpoint, scaling: float, base_shape: tuple[int, ...], conv1d_hint: bool
) -> lora_math.RowDelta:
    """The module's ΔW (``scaling`` already holds the adapter's weight) on a base weight of ``base_shape``."""
    if len(base_shape) < 2:
        raise _unfit(m, ck, f"the base weight is {list(base_shape)}, not a matrix or a conv kernel")
    if len(base_shape) == 2 and conv1d_hint:
        raise UnsupportedError(
            f"{m.tuner} module {m.module} on a weight stored transposed (GPT-2's Conv1D, fan_in_fan_out): PEFT "
            f"builds {m.tuner.upper()} only on nn.Linear, nn.Conv1d and nn.Conv2d and refuses this layer",
            path=ck.root,
            tensor=m.a_key,
        )
    if m.tuner == "loha":
        return _loha(m, ck, scaling, base_shape)
    if m.tuner == "lokr":
        return _lokr(m, ck, scaling, base_shape)
    if m.tuner == "full":
        return _full(m, ck, scaling, base_shape)
    raise UnsupportedError(f"{m.tuner} module {m.module}: no merge for this tuner", path=ck.root, tensor=m.a_key)


def _loha(m: LoraModule, ck: Checkpoint, scaling: float, shape: tuple[int, ...]) -> lora_math.RowDelta:
    w1a, w1b, w2a, w2b = (_read(m, ck, n) for n in LOHA_FACTORS)
    t1, t2 = (_read(m, ck, n) for n in LOHA_TUCKER)
    if w1a is None or w1b is None or w2a is None or w2b is None:
        missing = next(n for n, t in zip(LOHA_FACTORS, (w1a, w1b, w2a, w2b), strict=True) if t is None)
        raise _unfit(m, ck, f"{missing} is missing")
    out, cols = shape[0], math.prod(shape[1:])
    if (t1 is None) != (t2 is None):
        raise _unfit(m, ck, "hada_t1 and hada_t2 come together (Tucker cores of both halves)")
    if t1 is not None and t2 is not None:
        kernel = math.prod(t1.shape[2:])
        for t, a, b, side in ((t1, w1a, w1b, "1"), (t2, w2a, w2b, "2")):
            r = t.shape[0] if t.dim() == 4 else -1
            if (
                t.dim() != 4
                or t.shape[1] != r
                or a.dim() != 2
                or b.dim() != 2
                or a.shape != (r, out)
                or b.shape[0] != r
                or b.shape[1] * math.prod(t.shape[2:]) != cols
                or math.prod(t.shape[2:]) != kernel
                or len(shape) < 3
                or b.shape[1] != shape[1]
            ):
                raise _unfit(
                    m,
                    ck,
                    f"Tucker factors hada_t{side} {list(t.shape)}, hada_w{side}_a {list(a.shape)}, hada_w{side}_b "
                    f"{list(b.shape)} do not build the base weight {list(shape)}",
                    m.factors[f"hada_t{side}"],
                )
    else:
        for a, b, side in ((w1a, w1b, "1"), (w2a, w2b, "2")):
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != out or b.shape[1] != cols or a.shape[1] != b.shape[0]:
                raise _unfit(
                    m,
                    ck,
                    f"hada_w{side}_a {list(a.shape)} @ hada_w{side}_b {list(b.shape)} is not the base weight's "
                    f"({out}, {cols})",
                    m.factors[f"hada_w{side}_a"],
                )
    return tuner_math.LohaDelta.build(w1a, w1b, w2a, w2b, scaling, shape, t1, t2)


def _lokr(m: LoraModule, ck: Checkpoint, scaling: float, shape: tuple[int, ...]) -> lora_math.RowDelta:
    f = {n: _read(m, ck, n) for n in LOKR_FACTORS}
    sides = []
    for side in ("1", "2"):
        whole, a, b = f[f"lokr_w{side}"], f[f"lokr_w{side}_a"], f[f"lokr_w{side}_b"]
        t = f["lokr_t2"] if side == "2" else None
        if whole is None and (a is None or b is None):
            missing = f"lokr_w{side}_a" if a is None else f"lokr_w{side}_b"
            raise _unfit(m, ck, f"lokr_w{side} is missing and so is {missing}")
        if whole is not None and (a is not None or b is not None):
            raise _unfit(m, ck, f"holds lokr_w{side} and its low-rank halves: PEFT keeps one or the other")
        if whole is None and a is not None and b is not None:
            ok = a.dim() == 2 and b.dim() == 2 and a.shape[1 if t is None else 0] == b.shape[0]
            if t is not None:
                ok = ok and t.dim() == 4 and t.shape[0] == a.shape[0] and t.shape[1] == b.shape[0]
            if not ok:
                shapes = f"lokr_w{side}_a {list(a.shape)}, lokr_w{side}_b {list(b.shape)}"
                shapes += f", lokr_t2 {list(t.shape)}" if t is not None else ""
                raise _unfit(m, ck, f"{shapes} do not multiply", m.factors[f"lokr_w{side}_a"])
        elif t is not None:
            raise _unfit(m, ck, "lokr_t2 beside a whole lokr_w2: PEFT has a Tucker core only for w2_a/w2_b")
        sides.append((tuner_math.lokr_side(whole, a, b, t), tuner_math.lokr_side_bound(whole, a, b, t)))
    try:
        return tuner_math.LokrDelta.build(sides[0][0], sides[1][0], scaling, shape, bounds=(sides[0][1], sides[1][1]))
    except ValueError as exc:
        raise _unfit(m, ck, f"{exc}") from None


def _full(m: LoraModule, ck: Checkpoint, scaling: float, shape: tuple[int, ...]) -> lora_math.RowDelta:
    """LyCORIS's full ``diff``: ΔW stored whole.  It is kron([[1]], diff), so :class:`~..tuner_math.LokrDelta`
    serves its rows (and verify's bound: a side stored whole is exact) with no producer of its own."""
    diff = _read(m, ck, "diff")
    if diff is None:
        raise _unfit(m, ck, "diff is missing")
    if tuple(diff.shape) != tuple(shape):
        raise _unfit(m, ck, f"diff {list(diff.shape)} is not the base weight's shape {list(shape)}", m.factors["diff"])
    return tuner_math.LokrDelta.build(torch.ones(1, 1), diff, scaling, shape)
