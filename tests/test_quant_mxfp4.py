"""gpt-oss with MXFP4 experts: an attention LoRA merged into it, the experts dequantized (default) or
copied byte for byte (``--requantize``), and the MXFP4 re-quantization of expert weights.

Expert LoRA into MXFP4 (PEFT's ``target_parameters``) arrives with the MoE routes: the combination is
tested once both are in; here the expert stream is driven directly.
"""

from __future__ import annotations

import json

import torch
from quant_models import gpt_oss, load_dequantized, save_mxfp4
from safetensors.torch import load_file
from tiny import logits, peft_wrap

import lora_convert as lc
from lora_convert.io.quantized import find_layout
from lora_convert.io.reader import open_checkpoint
from lora_convert.pipeline import Buffers, Job
from lora_convert.quant import mxfp4
from lora_convert.routes.requantize import Requantization, requantize_jobs

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ("gate_up_proj", "down_proj")


def test_attention_lora_into_mxfp4_gpt_oss(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    save_mxfp4(gpt_oss(), tmp_path / "base")
    raw = load_file(str(tmp_path / "base" / "model.safetensors"))
    pm = peft_wrap(load_dequantized(tmp_path / "base"), r=4, lora_alpha=8, target_modules=ATTN)
    want = logits(pm)
    pm.save_pretrained(tmp_path / "adapter")
    res = lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "m", dtype="fp32")
    out = load_file(str(tmp_path / "m" / "model.safetensors"))
    for layer in range(2):
        for p in EXPERTS:
            k = f"model.layers.{layer}.mlp.experts.{p}"
            ref = convert_moe_packed_tensors(raw[k + "_blocks"], raw[k + "_scales"], dtype=torch.float32)
            assert out[k].shape == ref.shape and torch.equal(out[k], ref), k
    assert not any(k.endswith(("_blocks", "_scales")) for k in out)
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    assert res.ops["merge"] == 8
    assert (logits(load_dequantized(tmp_path / "m")) - want).abs().max() <= 1e-5

    lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "bf16")
    res = lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "rq", requantize=True)
    rq = load_file(str(tmp_path / "rq" / "model.safetensors"))
    assert set(rq) == set(raw)
    assert all(torch.equal(rq[k], raw[k]) for k in raw if "experts" in k)  # untouched: byte for byte
    assert res.report.copied == 4 and res.report.modules == []
    assert json.loads((tmp_path / "rq" / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    # the attention merge is the same bf16 one; the experts dequantize as before
    assert torch.equal(logits(load_dequantized(tmp_path / "rq")), logits(load_dequantized(tmp_path / "bf16")))


def test_mxfp4_requantize_stream(tmp_path):
    """The stream that re-quantizes a merged expert tensor, fed the (experts, in, out) fp32 values in
    blocks of any size: blocks and scales are the reference rounding of each expert's (out, in)."""
    save_mxfp4(gpt_oss(), tmp_path / "base")
    with open_checkpoint(tmp_path / "base") as ck:
        layout = find_layout(ck)
        t = layout.tensors["model.layers.1.mlp.experts.down_proj"]
        torch.manual_seed(3)
        merged = torch.randn(t.shape) * 0.05
        merged[2, :32, 5] = 0  # an all-zero 32-block: scale byte 0

        def blocks(buf):
            flat = merged.reshape(-1)
            for s in range(0, flat.numel(), 1000):  # pieces that cut through experts and rows
                yield flat[s : s + 1000].clone()

        report = Requantization(layout.scheme)
        jobs = requantize_jobs(Job(t.name, torch.float32, t.shape, blocks), t, ck, layout.config, report, lambda: None)
        assert [j.name for j in jobs] == [t.stored["weight"], t.stored["scale"]]
        got = [torch.cat([b.reshape(-1) for b in j.blocks(Buffers())]) for j in jobs]
    want_blocks, want_scales = mxfp4.quantize(merged.transpose(1, 2))
    assert torch.equal(got[0].view(want_blocks.shape), want_blocks)
    assert torch.equal(got[1].view(want_scales.shape), want_scales)
    assert want_scales[2, 5, 0] == 0
    err = (mxfp4.dequantize(want_blocks, want_scales).transpose(1, 2) - merged).norm() / merged.norm()
    assert abs(report.modules[0].rel_error - float(err)) < 1e-6 and 0.05 < err < 0.2
