"""The quantization math against the formats' own libraries, and the dequantized view read in ranges
that cut through rows, blocks and experts (the copy stage reads 1 MB element ranges of any shape)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lora_convert.io.quantized import dequantized, find_layout
from lora_convert.io.reader import open_checkpoint
from lora_convert.quant import fp8, mxfp4


def test_mxfp4_rounding_is_the_references():
    """triton_kernels' downcast_to_mxfp_torch (what transformers calls): round to nearest e2m1, ties to
    the even code, saturate at 6, keep the sign of a value that rounds to zero."""
    x = torch.tensor([0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 6.5, 100.0, -0.1, -0.75, -5.0, 0.0])
    want = [0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, -0.0, -1.0, -4.0, 0.0]
    codes = mxfp4._e2m1_codes(x)
    got = torch.tensor([mxfp4.E2M1[c] for c in codes.tolist()])
    assert torch.equal(got, torch.tensor(want)) and codes[11] == 8  # -0.0 keeps its sign bit
    # the scale: amax/6 rounded UP to a power of two (exact powers kept), stored as its exponent byte
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 32] = 6.0, 6.1
    _, scales = mxfp4.quantize(w)
    assert scales.tolist() == [[127, 128]]


def test_mxfp4_dequantize_is_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), dtype=torch.uint8)
    scales = torch.randint(110, 135, (3, 10, 4), dtype=torch.uint8)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    assert torch.equal(mxfp4.dequantize(blocks, scales).transpose(1, 2), ref)
    values = mxfp4.dequantize(blocks, scales)
    again = mxfp4.dequantize(*mxfp4.quantize(values))
    assert torch.equal(again, values)  # quantize(dequantize(q)) keeps the values (not always the bytes)


@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_block_quantize_is_transformers(ue8m0):
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.utils.quantization_config import FineGrainedFP8Config

    class _Q:
        quantization_config = FineGrainedFP8Config(scale_fmt="ue8m0" if ue8m0 else "float")

    torch.manual_seed(1)
    w = torch.randn(256, 384) * 0.02
    w[:128, :128] = 0  # an all-zero block: scale 1
    ref = Fp8Quantize(_Q()).convert({"a.weight": w})
    sdt = ref["a.weight_scale_inv"].dtype
    q, s = fp8.quantize_fp8_block(w, (128, 128), ue8m0=ue8m0, scale_dtype=sdt)
    assert torch.equal(q.view(torch.uint8), ref["a.weight"].view(torch.uint8))
    assert torch.equal(s.float(), ref["a.weight_scale_inv"].float())
    rows = fp8.dequantize_rows(q[100:300], s.float(), 100, (128, 128))
    assert torch.equal(
        rows, q[100:300].float() * s.float().repeat_interleave(128, 0)[100:300].repeat_interleave(128, 1)
    )


def test_ct_quantize_is_compressed_tensors():
    """Given the scale, our division and clamp give compressed-tensors' own fp8 bytes (partial edge blocks
    too), and its decompression of them is our dequantization rounded to the scale dtype."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    torch.manual_seed(2)
    w = (torch.randn(200, 320) * 0.02).bfloat16()
    q, scale = fp8.quantize_fp8_divided(w.float(), (128, 128), torch.bfloat16)
    comp = BaseCompressor.get_value_from_registry("float-quantized")
    scheme = preset_name_to_scheme("FP8_BLOCK", ["Linear"])
    ref = comp.compress({"weight": w.float(), "weight_scale": scale}, scheme)["weight"]  # fp32, as merged
    assert torch.equal(q.view(torch.uint8), ref.view(torch.uint8))
    back = comp.decompress({"weight": q, "weight_scale": scale}, scheme)["weight"]
    assert torch.equal(back, fp8.dequantize_rows(q, scale, 0, (128, 128)).to(back.dtype))


def _write(path, tensors, qc, config_extra=None):
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(
        json.dumps({"model_type": "llama", "quantization_config": qc, **(config_extra or {})})
    )


def _ranges(n):
    torch.manual_seed(5)
    cuts = sorted({0, n, *torch.randint(1, n, (12,)).tolist()})
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def test_view_reads_any_element_range(tmp_path):
    """fp8 (partial edge blocks), bitsandbytes nf4 with double quantization, MXFP4 experts: every
    element range of the dequantized view equals the whole tensor dequantized at once."""
    import bitsandbytes as bnb

    torch.manual_seed(4)
    w = torch.randn(200, 136) * 0.02
    q, s = fp8.quantize_fp8_block(w, (128, 128))
    _write(
        tmp_path / "fp8",
        {"l.weight": q, "l.weight_scale_inv": s},
        {"quant_method": "fp8", "weight_block_size": [128, 128]},
    )
    packed, state = bnb.functional.quantize_4bit(w.bfloat16(), blocksize=64, quant_type="nf4", compress_statistics=True)
    stored = {"l.weight": packed, **{f"l.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    _write(tmp_path / "bnb", stored, {"quant_method": "bitsandbytes", "load_in_4bit": True})
    b, sc = mxfp4.quantize(torch.randn(3, 40, 64) * 0.05)
    _write(tmp_path / "mx", {"e.gate_up_proj_blocks": b, "e.gate_up_proj_scales": sc}, {"quant_method": "mxfp4"})
    whole = {
        "fp8": fp8.dequantize_rows(q, s, 0, (128, 128)),
        "bnb": bnb.functional.dequantize_4bit(packed, state),
        "mx": mxfp4.dequantize(b, sc).transpose(1, 2),
    }
    for kind, name in (("fp8", "l.weight"), ("bnb", "l.weight"), ("mx", "e.gate_up_proj")):
        with open_checkpoint(tmp_path / kind) as ck:
            view = dequantized(ck, find_layout(ck))
            assert list(view.tensors) == [name]
            ref = whole[kind].to(view.info(name).dtype).reshape(-1)
            for a, z in _ranges(ref.numel()):
                assert torch.equal(view.read_flat(name, a, z), ref[a:z]), (kind, a, z)
            assert torch.equal(view.read_rows(name, 1, 2).reshape(-1), view.read(name)[1:2].reshape(-1))
