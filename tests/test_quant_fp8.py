"""Merging into fp8 bases: DeepSeek/Qwen3-style block scales and compressed-tensors fp8.

The default merge is ``round(dequantize(base) + ΔW)`` tensor for tensor and gives PEFT's unmerged logits
on the dequantized base; ``--requantize`` writes the library's own quantization of the fp32 merged weight,
loads with the same quantization_config, and copies untouched weights byte for byte.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import cli
from quant_models import llama, load_dequantized, plain_from, save_ct, save_fp8
from safetensors.torch import load_file
from tiny import logits, peft_wrap

import lora_convert as lc

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def _adapter(base_model, tmp_path, **kw):
    """PEFT's adapter on the dequantized base, its unmerged logits and ΔW of every target (fp32)."""
    pm = peft_wrap(base_model, r=4, lora_alpha=8, target_modules=TARGETS, **kw)
    want = logits(pm)
    deltas = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            deltas[name.removeprefix("base_model.model.") + ".weight"] = mod.get_delta_weight("default").float()
    pm.save_pretrained(tmp_path / "adapter")
    return want, deltas


def _merged(path):
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def fp8_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    deq = save_fp8(llama(), root / "base")
    return root / "base", deq


def test_fp8_block_merge_equals_dequantize_plus_delta(fp8_base, tmp_path):
    base, deq = fp8_base
    want, deltas = _adapter(load_dequantized(base), tmp_path)
    res = lc.merge(tmp_path / "adapter", base=base, output=tmp_path / "bf16")
    out = _merged(tmp_path / "bf16")
    raw = load_file(str(base / "model.safetensors"))
    assert not any(k.endswith("_scale_inv") for k in out) and all(v.dtype == torch.bfloat16 for v in out.values())
    for k, w in deq.items():  # every fp8 weight: dequantized (+ΔW where targeted), rounded once to bf16
        expect = w + deltas[k] if k in deltas else w
        assert torch.equal(out[k], expect.to(torch.bfloat16)), k
    assert torch.equal(out["lm_head.weight"], raw["lm_head.weight"])
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert "dequantized" in (tmp_path / "bf16" / "README.md").read_text()
    assert res.ops == {"copy": 13, "merge": 8} and res.config_changes == {"quantization_config": None}
    lc.merge(tmp_path / "adapter", base=base, output=tmp_path / "fp32", dtype="fp32")
    got = logits(load_dequantized(tmp_path / "fp32"))
    assert (got - want).abs().max() <= 1e-5


def test_fp8_partial_blocks_use_the_ceil_grid(tmp_path):
    """Shapes that are not multiples of 128 (DeepSeek's kv_a_proj is 576 rows): the edge blocks are
    partial, as DeepSeek's kernel reads them (transformers 5.24 mis-reads them, so no model load here)."""
    model = llama(hidden=128, inter=200)
    deq = save_fp8(model, tmp_path / "base", aligned=False)
    plain = {k: v for k, v in _merged(tmp_path / "base").items() if not k.endswith("_scale_inv")}
    base_model = plain_from(tmp_path / "base", {**plain, **deq})
    _, deltas = _adapter(base_model, tmp_path)
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "out", dtype="fp32")
    out = _merged(tmp_path / "out")
    k = "model.layers.0.mlp.gate_proj.weight"
    assert out[k].shape == (200, 128)
    assert torch.equal(out[k], deq[k] + deltas[k])
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], deq["model.layers.1.mlp.up_proj.weight"])


def test_fp8_requantize_recomputes_block_scales(fp8_base, tmp_path):
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.utils.quantization_config import FineGrainedFP8Config

    base, deq = fp8_base
    base_deq = load_dequantized(base)
    want, deltas = _adapter(base_deq, tmp_path)
    res = lc.merge(tmp_path / "adapter", base=base, output=tmp_path / "rq", requantize=True)
    out, raw = _merged(tmp_path / "rq"), load_file(str(base / "model.safetensors"))
    assert set(out) == set(raw)
    for k in raw:  # untouched: byte for byte
        if k not in deltas and k.removesuffix("_scale_inv") not in deltas:
            assert torch.equal(out[k].view(torch.uint8), raw[k].view(torch.uint8)), k

    class _Q:
        quantization_config = FineGrainedFP8Config()

    k = "model.layers.1.self_attn.v_proj.weight"
    ref = Fp8Quantize(_Q()).convert({k: deq[k] + deltas[k]})  # the library's quantization of the fp32 merge
    assert torch.equal(out[k].view(torch.uint8), ref[k].view(torch.uint8))
    assert torch.equal(out[k + "_scale_inv"], ref[k + "_scale_inv"])
    cfg = json.loads((tmp_path / "rq" / "config.json").read_text())
    assert cfg["quantization_config"] == json.loads((base / "config.json").read_text())["quantization_config"]
    rq = res.report
    assert rq is not None and rq.copied == 6 and len(rq.modules) == 8
    assert all(0 < m.rel_error < 0.05 and m.delta > 0 for m in rq.modules)
    assert res.to_dict()["requantized"]["modules"][0]["tensor"] == rq.modules[0].tensor
    # the requantized model loads with its quantization_config; its logits stay within fp8's own error
    got = logits(load_dequantized(tmp_path / "rq"))
    own = (logits(base_deq) - logits(llama().float())).abs().max()  # what fp8 does to the base's logits
    assert 0 < (got - want).abs().max() <= 2 * own


@pytest.mark.parametrize("scheme", ["FP8", "FP8_DYNAMIC", "FP8_BLOCK"])
def test_compressed_tensors_fp8(tmp_path, scheme):
    from compressed_tensors.compressors import BaseCompressor

    save_ct(llama(), tmp_path / "base", scheme)
    raw = load_file(str(tmp_path / "base" / "model.safetensors"))
    base_deq = load_dequantized(tmp_path / "base")  # transformers + compressed-tensors decompress
    want, deltas = _adapter(base_deq, tmp_path)
    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "m", dtype="fp32")
    out = _merged(tmp_path / "m")
    assert not any(k.endswith(("weight_scale", "input_scale")) for k in out)
    qc = json.loads((tmp_path / "base" / "config.json").read_text())["quantization_config"]
    fmt = BaseCompressor.get_value_from_registry(qc["format"])
    from compressed_tensors.quantization import preset_name_to_scheme

    k = "model.layers.0.mlp.down_proj.weight"
    ct = fmt.decompress(
        {"weight": raw[k], "weight_scale": raw[k + "_scale"]}, preset_name_to_scheme(scheme, ["Linear"])
    )
    assert torch.equal(out[k], ct["weight"].float() + deltas[k])
    assert (logits(load_dequantized(tmp_path / "m")) - want).abs().max() <= 1e-5
    res = lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "rq", requantize=True)
    rq = _merged(tmp_path / "rq")
    assert set(rq) == set(raw) and rq[k].dtype == torch.float8_e4m3fn
    assert rq[k + "_scale"].shape == raw[k + "_scale"].shape and rq[k + "_scale"].dtype == raw[k + "_scale"].dtype
    again = fmt.decompress(
        {"weight": rq[k], "weight_scale": rq[k + "_scale"]}, preset_name_to_scheme(scheme, ["Linear"])
    )
    assert (again["weight"].float() - out[k]).abs().max() <= out[k].abs().max() / 16  # fp8: 3 mantissa bits
    assert all(m.rel_error < 0.05 for m in res.report.modules)
    got = logits(load_dequantized(tmp_path / "rq"))
    assert (got - want).abs().max() <= 2 * (logits(base_deq) - logits(llama().float())).abs().max()


def test_cli_requantize_table_and_json(fp8_base, tmp_path):
    base, _ = fp8_base
    peft_wrap(llama().float(), r=4, lora_alpha=8, target_modules=["q_proj"]).save_pretrained(tmp_path / "adapter")
    res = cli("merge", str(tmp_path / "adapter"), "--base", str(base), "-o", str(tmp_path / "a"), "--requantize")
    assert res.exit_code == 0, res.output
    assert "re-quantized (fp8 e4m3, 128×128 blocks); 12 untouched quantized weights copied" in res.output
    assert res.output.count("128x128") == 2, res.output  # one row per merged weight
    res = cli(
        "merge", str(tmp_path / "adapter"), "--base", str(base), "-o", str(tmp_path / "b"), "--requantize", "--json"
    )
    got = json.loads(res.stdout)["requantized"]
    assert got["copied"] == 12 and [m["tensor"] for m in got["modules"]] == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
    ]
    assert all(0 < m["rel_error"] < 0.05 and m["error_vs_delta"] > 0 for m in got["modules"])
    card = (tmp_path / "b" / "README.md").read_text()
    assert "## Re-quantization error" in card and "re-quantized in its scheme" in card


def test_verify_refuses_a_requantized_merge_and_passes_the_dequantized_one(fp8_base, tmp_path):
    """A --requantize output differs from BASE + ΔW by fp8's rounding: verify must say why it cannot judge it
    (naming the scheme), not call untouched weights 'changed outside the adapter'."""
    base, _ = fp8_base
    _adapter(load_dequantized(base), tmp_path)
    lc.merge(tmp_path / "adapter", base=base, output=tmp_path / "rq", requantize=True)
    lc.merge(tmp_path / "adapter", base=base, output=tmp_path / "deq")
    assert lc.verify(tmp_path / "deq", base=base, adapters=[str(tmp_path / "adapter")]).ok
    with pytest.raises(lc.UnsupportedError, match="MERGED is quantized") as e:
        lc.verify(tmp_path / "rq", base=base, adapters=[str(tmp_path / "adapter")])
    assert "without --requantize" in e.value.for_cli() and str(tmp_path / "rq") in str(e.value)
