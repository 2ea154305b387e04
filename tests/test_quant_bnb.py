"""Merging into bitsandbytes bases as transformers + bitsandbytes save them (4-bit nf4/fp4 with and
without double quantization, 8-bit): our dequantization is bitsandbytes' own bit for bit, the merge is
``round(dequantize(base) + ΔW)`` with PEFT's unmerged logits, and ``--requantize`` gives the bytes
bitsandbytes' quantizer gives for the fp32 merged weight and loads back as a 4-bit/8-bit model.

Widths are multiples of 64: bitsandbytes 0.50.2's CPU ``dequantize_4bit`` misreads a (64, 96) weight
(its own round trip errs 0.29 where the blocks' true error is 0.12; ours reads the flat blocks its
quantizer wrote), so it cannot be the reference there.
"""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch
from quant_models import llama, plain_from, quiet, save_bnb
from safetensors.torch import load_file
from tiny import logits, peft_wrap

import lora_convert as lc

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
CASES = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}


def _bnb_dequant(raw: dict, key: str) -> torch.Tensor:
    """bitsandbytes' own dequantization of a stored weight (what PEFT merges into)."""
    F = bnb.functional
    if key.removesuffix(".weight") + ".SCB" in raw:
        return F.int8_vectorwise_dequant(raw[key], raw[key.removesuffix(".weight") + ".SCB"])
    parts = {k[len(key) + 1 :]: v for k, v in raw.items() if k.startswith(key + ".")}
    return F.dequantize_4bit(raw[key], F.QuantState.from_dict(parts, device="cpu"))


@pytest.fixture(scope="module", params=sorted(CASES))
def bnb_base(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model = llama(hidden=64, inter=128)
    save_bnb(model, root / "base", **CASES[request.param])
    raw = load_file(str(root / "base" / "model.safetensors"))
    quantized = [k for k in raw if k.endswith("proj.weight")]
    deq = {k: _bnb_dequant(raw, k) for k in quantized}
    plain = {k: v for k, v in raw.items() if k.endswith(("norm.weight", "embed_tokens.weight", "lm_head.weight"))}
    return request.param, root / "base", raw, deq, {**plain, **deq}


def _adapter(base_model, path):
    pm = peft_wrap(base_model, r=4, lora_alpha=8, target_modules=TARGETS)
    want = logits(pm)
    deltas = {
        n.removeprefix("base_model.model.") + ".weight": m.get_delta_weight("default").float()
        for n, m in pm.named_modules()
        if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {})
    }
    pm.save_pretrained(path)
    return want, deltas


def test_bnb_merge_equals_dequantize_plus_delta(bnb_base, tmp_path):
    case, base, raw, deq, weights = bnb_base
    want, deltas = _adapter(plain_from(base, weights), tmp_path / "adapter")
    res = lc.merge(tmp_path / "adapter", base=base, output=tmp_path / "m", dtype="fp32")
    out = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert set(out) == set(weights)
    for k, w in deq.items():
        assert torch.equal(out[k], w.float() + deltas[k] if k in deltas else w.float()), k
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    assert res.ops == {"copy": 13, "merge": 8}
    from tiny import load_merged

    assert (logits(load_merged(tmp_path / "m")) - want).abs().max() <= 1e-5
    bf16 = load_file(
        str(lc.merge(tmp_path / "adapter", base=base, output=tmp_path / "b").output + "/model.safetensors")
    )
    k = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(bf16[k], (deq[k].float() + deltas[k]).to(torch.bfloat16))


def test_bnb_requantize_is_bitsandbytes_own(bnb_base, tmp_path):
    from transformers import AutoModelForCausalLM

    case, base, raw, deq, weights = bnb_base
    want, deltas = _adapter(plain_from(base, weights), tmp_path / "adapter")
    res = lc.merge(tmp_path / "adapter", base=base, output=tmp_path / "rq", requantize=True)
    out = load_file(str(tmp_path / "rq" / "model.safetensors"))
    assert set(out) == set(raw)
    for k in raw:  # whatever the LoRA did not touch is byte for byte the base's
        module = k.split(".weight")[0].removesuffix(".SCB").removesuffix(".weight_format")
        if module + ".weight" not in deltas:
            assert torch.equal(out[k], raw[k]), k
    F = bnb.functional
    k = "model.layers.0.mlp.up_proj.weight"
    merged = deq[k].float() + deltas[k]  # the fp32 merge, quantized by bitsandbytes in one call
    if case == "int8":
        q, scb, _ = F.int8_vectorwise_quant(merged, threshold=0.0)
        assert torch.equal(out[k], q) and torch.equal(out[k.removesuffix(".weight") + ".SCB"], scb)
    else:
        q, state = F.quantize_4bit(merged, blocksize=64, quant_type=case[:3], compress_statistics=case.endswith("dq"))
        assert torch.equal(out[k], q)
        assert torch.equal(out[k + ".absmax"], state.absmax)
        got = F.dequantize_4bit(
            out[k],
            F.QuantState.from_dict({n[len(k) + 1 :]: v for n, v in out.items() if n.startswith(k + ".")}, device="cpu"),
        )
        assert torch.equal(got, F.dequantize_4bit(q, state).to(got.dtype))
    rq = res.report
    assert rq is not None and rq.copied == 6 and len(rq.modules) == 8
    reported = {m.tensor: m for m in rq.modules}
    written = {k: _bnb_dequant(out, k).float() for k in deq}
    for k, delta in deltas.items():  # the error reported is the one written
        exact = deq[k].float() + delta
        assert reported[k].rel_error == pytest.approx(float((written[k] - exact).norm() / exact.norm()), rel=1e-3)
    # it loads back as a quantized model with that config and computes with those weights, as closely as
    # bitsandbytes' CPU forward computes with the base's own (it rounds block maxima to bf16 for its kernel)
    quiet()
    kw = dict(device_map="cpu", dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "rq"), **kw)
    noise = (logits(AutoModelForCausalLM.from_pretrained(str(base), **kw)) - logits(plain_from(base, weights))).abs()
    assert (
        json.loads((tmp_path / "rq" / "config.json").read_text())["quantization_config"]["quant_method"]
        == "bitsandbytes"
    )
    assert (logits(loaded) - logits(plain_from(base, {**weights, **written}))).abs().max() <= 3 * noise.max() + 1e-5
    assert (logits(loaded) - want).abs().max() > 0
