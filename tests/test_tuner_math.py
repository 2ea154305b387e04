"""LoHa / LoKr ΔW by row blocks (tuner_math) against PEFT's own ``get_delta_weight``, on every layer kind and
factor layout PEFT builds, and the merge tile that sums them beside LoRA products (one rounding)."""

from __future__ import annotations

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, get_peft_model
from tiny import LayerKinds

from lora_convert import lora_math, tuner_math

TARGETS = ["lin", "conv", "pw", "c1", "c1p"]


def _layers(cfg):
    torch.manual_seed(0)
    pm = get_peft_model(LayerKinds(), cfg)
    return {n: getattr(pm.base_model.model, n) for n in TARGETS}


def _param(layer, name):
    d = getattr(layer, name)
    return d["default"].detach() if "default" in d else None


def _blocks(delta, rows: int, step: int) -> torch.Tensor:
    return torch.cat([delta.rows(s, min(s + step, rows)) for s in range(0, rows, step)])


CONFIGS = {
    "loha": LoHaConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False),
    "loha-tucker": LoHaConfig(r=4, alpha=6, target_modules=TARGETS, init_weights=False, use_effective_conv2d=True),
    "lokr": LoKrConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False),
    "lokr-both": LoKrConfig(r=1, alpha=3, target_modules=TARGETS, init_weights=False, decompose_both=True),
    "lokr-tucker": LoKrConfig(
        r=1, alpha=8, target_modules=TARGETS, init_weights=False, decompose_both=True, use_effective_conv2d=True
    ),
    "lokr-factor": LoKrConfig(r=2, alpha=5, target_modules=TARGETS, init_weights=False, decompose_factor=4),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_rows_equal_peft_delta(kind: str) -> None:
    layers = _layers(CONFIGS[kind])
    for name, layer in layers.items():
        shape = tuple(layer.get_base_layer().weight.shape)
        s = layer.scaling["default"]
        p = {n: _param(layer, n) for n in layer.adapter_layer_names}
        if (kind, name) == ("lokr-tucker", "c1"):  # PEFT's own torch.kron call fails on this Conv1d layout
            with pytest.raises(RuntimeError, match="view size"):
                layer.get_delta_weight("default")
            w1 = p["lokr_w1"]
            w2 = torch.einsum("ijkl,ip,jr->prkl", p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
            want = torch.einsum("ij,pqkl->ipjqkl", w1, w2).reshape(shape[0], -1) * s  # kron, spelled out
        else:
            want = layer.get_delta_weight("default").detach().reshape(shape[0], -1)
        if kind.startswith("loha"):
            d = tuner_math.LohaDelta.build(
                p["hada_w1_a"], p["hada_w1_b"], p["hada_w2_a"], p["hada_w2_b"], s, shape, p["hada_t1"], p["hada_t2"]
            )
        else:
            w1 = tuner_math.lokr_side(p["lokr_w1"], p["lokr_w1_a"], p["lokr_w1_b"])
            w2 = tuner_math.lokr_side(p["lokr_w2"], p["lokr_w2_a"], p["lokr_w2_b"], p["lokr_t2"])
            b1 = tuner_math.lokr_side_bound(p["lokr_w1"], p["lokr_w1_a"], p["lokr_w1_b"])
            b2 = tuner_math.lokr_side_bound(p["lokr_w2"], p["lokr_w2_a"], p["lokr_w2_b"], p["lokr_t2"])
            d = tuner_math.LokrDelta.build(w1, w2, s, shape, bounds=(b1, b2))
        assert d.shape == tuple(want.shape)
        mag = d.magnitude(1.0).rows(0, shape[0])  # verify's bound: P ≥ |ΔW|, and not loose where factors agree
        assert (mag >= want.abs() * (1 - 1e-6)).all() and d.depth >= 2
        for step in (1, 5, shape[0]):
            torch.testing.assert_close(_blocks(d, shape[0], step), want, rtol=1e-6, atol=1e-6, msg=f"{kind} {name}")


def test_tile_sums_lora_and_tuner_terms_rounding_once() -> None:
    torch.manual_seed(3)
    w = torch.randn(10, 12, dtype=torch.bfloat16)
    lora = lora_math.DeltaFactors(torch.randn(10, 2), torch.randn(2, 12), 0.5)
    loha = tuner_math.LohaDelta.build(
        torch.randn(10, 3), torch.randn(3, 12), torch.randn(10, 3), torch.randn(3, 12), 0.3, (10, 12)
    )
    lokr = tuner_math.LokrDelta.build(torch.randn(2, 3), torch.randn(5, 4), 0.7, (10, 12))
    full = w.float() + lora.rows(0, 10) + loha.rows(0, 10) + lokr.rows(0, 10)
    out = torch.empty(4, 12, dtype=torch.bfloat16)
    got = torch.cat(
        [lora_math.merge_rows(w[s : s + 4], [lora, loha, lokr], s, out[: len(w[s : s + 4])]).clone() for s in (0, 4, 8)]
    )
    assert torch.equal(got, full.to(torch.bfloat16))
    torch.testing.assert_close(lora_math.delta_rows([loha, lokr], 2, 7), (loha.rows(0, 10) + lokr.rows(0, 10))[2:7])
    kron = torch.kron(torch.randn(2, 3), torch.randn(5, 4))
    assert not torch.equal(lokr.rows(0, 10), kron)  # (a real product, compared next)
    w1, w2 = lokr.w1, lokr.w2
    torch.testing.assert_close(lokr.rows(0, 10), torch.kron(w1, w2) * 0.7)


def test_lokr_shapes_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="elements"):
        tuner_math.LokrDelta.build(torch.ones(2, 3), torch.ones(5, 4), 1.0, (10, 13))
    with pytest.raises(ValueError, match="rows"):
        tuner_math.LokrDelta.build(torch.ones(2, 3), torch.ones(5, 4), 1.0, (5, 24))
    with pytest.raises(ValueError, match="halves"):
        tuner_math.lokr_side(None, torch.ones(2, 1), None)
