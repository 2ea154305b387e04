"""Quantized bases that do not add up: one ``error:`` line naming the tensor, exit 1, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import cli, front_door, one_error
from quant_models import llama, save_fp8
from safetensors.torch import load_file, save_file
from tiny import peft_wrap

W = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def quant(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_bad")
    save_fp8(llama(), root / "base")
    peft_wrap(llama(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).save_pretrained(root / "adapter")
    return root


@pytest.fixture
def work(quant, tmp_path):
    for name in ("base", "adapter"):
        shutil.copytree(quant / name, tmp_path / name)
    return tmp_path


def _edit(work, fn):
    path = work / "base" / "model.safetensors"
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path), metadata={"format": "pt"})


def _config(work, fn):
    p = work / "base" / "config.json"
    cfg = json.loads(p.read_text())
    fn(cfg)
    p.write_text(json.dumps(cfg))


def _merge(work, *extra):
    out = work / "out"
    return cli("merge", str(work / "adapter"), "--base", str(work / "base"), "-o", str(out), *extra), out


def test_scale_missing(work):
    _edit(work, lambda sd: sd.pop(W + "_scale_inv"))
    res, out = _merge(work)
    one_error(res, f"{W}: quantized weight without its weight_scale_inv", out=out)


def test_scale_of_the_wrong_shape(work):
    import torch

    _edit(work, lambda sd: sd.__setitem__(W + "_scale_inv", torch.ones(2, 1)))
    res, out = _merge(work)
    one_error(res, f"{W}_scale_inv: weight_scale_inv has shape [2, 1], expected [1, 1]", out=out)


def test_block_size_gives_the_grid(work):
    _config(work, lambda c: c["quantization_config"].update(weight_block_size=[64, 64]))
    res, out = _merge(work, "--requantize")
    down = "model.layers.0.mlp.down_proj.weight_scale_inv"  # the first fp8 weight in the file
    one_error(res, f"{down}: weight_scale_inv has shape [1, 2], expected [2, 4]", out=out)


def test_unknown_scheme(work):
    import torch

    shutil.rmtree(work / "base")
    llama().save_pretrained(work / "base")
    _config(work, lambda c: c.update(quantization_config={"quant_method": "awq", "bits": 4}))
    _edit(
        work, lambda sd: sd.__setitem__("model.layers.0.self_attn.q_proj.qweight", torch.zeros(4, 4, dtype=torch.int32))
    )
    res, out = _merge(work)
    one_error(
        res, "model.layers.0.self_attn.q_proj", "quantized with awq, which lora-convert cannot dequantize", out=out
    )


def test_requantize_needs_a_quantized_base(work):
    _config(work, lambda c: c.pop("quantization_config"))
    res, out = _merge(work, "--requantize")
    one_error(res, "down_proj.weight_scale_inv: the base holds quantized weights but config.json has no", out=out)
    plain = work / "plain"
    llama().save_pretrained(plain)
    res = cli("merge", str(work / "adapter"), "--base", str(plain), "-o", str(out), "--requantize")
    one_error(res, "--requantize: the base is not quantized", out=out)


def test_detect_and_report_name_the_scheme(work):
    d = front_door("detect", str(work / "base"), "--json")
    assert d.returncode == 0 and d.stderr.strip().endswith("NO_TORCH"), d.stderr[-400:]
    q = json.loads(d.stdout)["quantization"]
    assert q["method"] == "fp8" and q["scheme"] == "fp8 e4m3, 128×128 blocks" and q["tensors"] == 14
    assert q["stored_bytes"] < q["dequantized_bytes"]["BF16"] / 1.9
    r = front_door("report", str(work / "adapter"), "--base", str(work / "base"), "--json")
    assert r.returncode == 0 and r.stderr.strip().endswith("NO_TORCH"), r.stderr[-400:]
    rep = json.loads(r.stdout)
    assert rep["quantization"]["method"] == "fp8"
    merged = next(x for x in rep["rows"] if x["form"] == "merged")
    assert "F8_E4M3" not in merged["bytes"] and merged["bytes"]["BF16"] > 0


def test_unmerged_on_a_quantized_base(tmp_path):
    from tiny import save_unmerged

    save_unmerged(peft_wrap(llama(), r=4, lora_alpha=8, target_modules=["q_proj"]), tmp_path / "u")
    cfg = json.loads((tmp_path / "u" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "u" / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    res = cli("merge", str(tmp_path / "u"), "-o", str(out))
    one_error(res, "an unmerged checkpoint on a quantized base", "convert --to adapter", out=out)


def test_requantize_refuses_what_the_scheme_cannot_hold(work):
    """A saved layer (modules_to_save) of another shape than the quantized weight it replaces."""
    import torch

    adapter = work / "adapter2"
    peft_wrap(llama(), r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["o_proj"]).save_pretrained(
        adapter
    )
    path = adapter / "adapter_model.safetensors"
    sd = load_file(str(path))
    key = next(k for k in sd if "layers.1.self_attn.o_proj" in k)
    sd[key] = torch.zeros(64, 128)
    save_file(sd, str(path))
    out = work / "out"
    res = cli("merge", str(adapter), "--base", str(work / "base"), "-o", str(out), "--requantize")
    one_error(
        res,
        "model.layers.1.self_attn.o_proj: merged weight of shape [64, 128] cannot be re-quantized into the base's "
        "fp8-block layout of shape [128, 128]",
        out=out,
    )
