"""Hardening (issue 23): finite everywhere, and meaning we cannot reproduce refused.

* Every weight we dequantize — touched by the adapter or not — is checked: a NaN, Inf or negative scale
  (fp8 block, compressed-tensors, bitsandbytes, MXFP4) is one ``error:`` line naming file and tensor before
  anything is written, and values that overflow (a finite 3e38 scale, an fp8 NaN code) are refused by the
  weight's name; an fp8 scale of 0 is a warning.  A quantization companion with no quantized weight of its
  own is refused.
* Bad input always ends as one ``error:`` line, exit 1, nothing written, inputs byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import cli, diffusers_load, one_error, peft_as_mlx, read_gguf
from quant_models import deepseek_dequant, gpt_oss, llama, save_bnb, save_ct, save_fp8, save_mxfp4
from safetensors.torch import load_file, save_file
from tiny import peft_wrap

import lora_convert as lc

UNTOUCHED = "model.layers.0.mlp.down_proj.weight"  # no adapter below targets the MLP
TOUCHED = "model.layers.0.self_attn.q_proj.weight"


# -- harness ---------------------------------------------------------------------------------------------------------
def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def refused(
    work: Path, *needles: str, args: tuple[str, ...] | None = None, out: Path | None = None, code: int = 1
) -> str:
    """``merge adapter --base base`` (or ``args``) ends in one error line holding every needle, nothing is
    written at ``out`` (``work/out``) and the inputs are byte-identical."""
    before = {d: _digest(work / d) for d in ("base", "adapter") if (work / d).exists()}
    out = out or work / "out"
    res = cli(*(args or ("merge", work / "adapter", "--base", work / "base", "-o", out)))
    line = one_error(res, *needles, out=out, code=code)
    assert {d: _digest(work / d) for d in before} == before
    return line


def edit(path: Path, fn) -> None:
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path), metadata={"format": "pt"})


def _copy(src: Path, dst: Path) -> Path:
    for name in ("base", "adapter"):
        shutil.copytree(src / name, dst / name)
    return dst


# -- fp8 with block scales -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp8_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    save_fp8(llama(), root / "base")
    peft_wrap(llama(), r=4, lora_alpha=8, target_modules=["q_proj"]).save_pretrained(root / "adapter")
    return root


@pytest.fixture
def fp8(fp8_root, tmp_path):
    return _copy(fp8_root, tmp_path)


def _set_scale(work: Path, weight: str, value: float, where=(0, 0)) -> None:
    def fn(sd):
        s = sd[weight + "_scale_inv"].clone()
        s[where] = value
        sd[weight + "_scale_inv"] = s

    edit(work / "base" / "model.safetensors", fn)


@pytest.mark.parametrize("weight", [UNTOUCHED, TOUCHED])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_fp8_non_finite_scale_refused_touched_or_not(fp8, weight, value):
    _set_scale(fp8, weight, value)
    refused(fp8, f"base/model.safetensors: {weight}_scale_inv: holds NaN or Inf")


@pytest.mark.parametrize("weight", [UNTOUCHED, TOUCHED])
def test_fp8_negative_scale_refused(fp8, weight):
    _set_scale(fp8, weight, -0.5, where=(0, -1))
    refused(fp8, f"{weight}_scale_inv: holds a negative scale (-0.5)")


@pytest.mark.parametrize("weight", [UNTOUCHED, TOUCHED])
def test_fp8_finite_scale_whose_product_overflows(fp8, weight):
    """3e38 is a finite fp32 scale; × any fp8 value of 2 or more it is beyond fp32: the weight is named."""
    _set_scale(fp8, weight, 3e38)
    refused(fp8, f"base/model.safetensors: {weight}: dequantized to NaN or Inf (fp8-block", "overflows F32")


def test_fp8_nan_code_in_an_untouched_weight(fp8):
    def fn(sd):
        q = sd[UNTOUCHED].clone()
        q.view(torch.uint8)[3, 5] = 0x7F  # e4m3fn's NaN
        sd[UNTOUCHED] = q

    edit(fp8 / "base" / "model.safetensors", fn)
    refused(fp8, f"{UNTOUCHED}: dequantized to NaN or Inf")


def test_fp8_e8m0_nan_exponent(fp8):
    def fn(sd):
        s = torch.full(sd[UNTOUCHED + "_scale_inv"].shape, 120, dtype=torch.uint8)
        s[0, 1] = 255  # e8m0's NaN
        sd[UNTOUCHED + "_scale_inv"] = s.view(torch.float8_e8m0fnu)

    edit(fp8 / "base" / "model.safetensors", fn)
    refused(fp8, f"{UNTOUCHED}_scale_inv: holds NaN or Inf (an e8m0 exponent of 255 is NaN)")


def test_fp8_zero_scale_is_a_warning_and_reads_as_zeros(fp8):
    _set_scale(fp8, UNTOUCHED, 0.0, where=(0, 1))
    raw = load_file(str(fp8 / "base" / "model.safetensors"))
    res = lc.merge(fp8 / "adapter", base=fp8 / "base", output=fp8 / "m", dtype="fp32")
    warned = [w for w in res.warnings if UNTOUCHED + "_scale_inv" in w]
    assert len(warned) == 1 and "1 of its 2 scales are 0" in warned[0], res.warnings
    out = load_file(str(fp8 / "m" / "model.safetensors"))[UNTOUCHED]
    want = deepseek_dequant(raw[UNTOUCHED], raw[UNTOUCHED + "_scale_inv"].float())
    assert torch.equal(out, want) and not out[:, 128:].any() and out[:, :128].abs().max() > 0
    assert not [w for w in res.warnings if "are 0" in w and UNTOUCHED not in w]


def test_fp16_output_cannot_hold_a_dequantized_weight(fp8):
    """Scale 1000: finite in fp32 (up to 448000), beyond float16's 65504 — the copy names the weight."""
    _set_scale(fp8, UNTOUCHED, 1000.0)
    args = ("merge", fp8 / "adapter", "--base", fp8 / "base", "-o", fp8 / "out", "--dtype", "fp16")
    refused(fp8, f"{UNTOUCHED}: holds values beyond float16's range", "--dtype bf16", args=args)
    lc.merge(fp8 / "adapter", base=fp8 / "base", output=fp8 / "ok")  # bf16 holds it


def test_fp16_output_cannot_hold_a_plain_weight(tmp_path):
    from tiny import llama as tiny_llama

    m = tiny_llama()
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[2, 3] = 1e5
    m.save_pretrained(tmp_path / "base")
    peft_wrap(tiny_llama(), r=4, lora_alpha=8, target_modules=["q_proj"]).save_pretrained(tmp_path / "adapter")
    args = ("merge", tmp_path / "adapter", "--base", tmp_path / "base", "-o", tmp_path / "out", "--dtype", "fp16")
    refused(tmp_path, "model.layers.1.mlp.up_proj.weight: holds values beyond float16's range", args=args)


@pytest.mark.parametrize(
    "stray, beside",
    [
        ("model.layers.1.self_attn.o_proj.weight_scale_inv", "beside a F32 weight that is not quantized"),
        ("model.norm.weight_scale_inv", "beside a BF16 weight that is not quantized"),
        ("model.layers.0.mlp.ghost.weight_scale_inv", "with no weight of its own"),
        ("model.layers.0.mlp.up_proj.input_scale", None),  # beside an fp8 weight: fp8-block has no input_scale
    ],
)
def test_orphan_quantization_companion_refused(fp8, stray, beside):
    def fn(sd):
        o_proj = "model.layers.1.self_attn.o_proj.weight"
        if stray == o_proj + "_scale_inv":  # half converted: the weight dequantized to F32, its scale left
            sd[o_proj] = deepseek_dequant(sd[o_proj], sd[o_proj + "_scale_inv"].float())
        else:
            sd[stray] = torch.ones(1, 1)

    edit(fp8 / "base" / "model.safetensors", fn)
    line = refused(fp8, f"base/model.safetensors: {stray}: a quantization companion", "(fp8)")
    assert beside is None or beside in line
    assert lc.detect(fp8 / "base").quantization["method"] == "fp8"  # detect still describes the base


def test_requantize_refuses_a_bad_scale_it_would_copy(fp8):
    """--requantize copies untouched weights byte for byte: their scales are checked all the same."""
    _set_scale(fp8, UNTOUCHED, float("nan"))
    args = ("merge", fp8 / "adapter", "--base", fp8 / "base", "-o", fp8 / "out", "--requantize")
    refused(fp8, f"{UNTOUCHED}_scale_inv: holds NaN or Inf", args=args)


# -- compressed-tensors fp8 ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ct_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    save_ct(llama(), root / "base", "FP8_DYNAMIC")  # one scale per output channel
    peft_wrap(llama(), r=4, lora_alpha=8, target_modules=["q_proj"]).save_pretrained(root / "adapter")
    return root


@pytest.mark.parametrize("value, needle", [(float("nan"), "holds NaN or Inf"), (-1.0, "holds a negative scale (-1)")])
def test_compressed_tensors_bad_scale(ct_root, tmp_path, value, needle):
    work = _copy(ct_root, tmp_path)

    def fn(sd):
        s = sd[UNTOUCHED + "_scale"].clone()
        s[7] = value
        sd[UNTOUCHED + "_scale"] = s

    edit(work / "base" / "model.safetensors", fn)
    refused(work, f"base/model.safetensors: {UNTOUCHED}_scale: {needle}")


def test_compressed_tensors_orphan_scale(ct_root, tmp_path):
    """lm_head is left unquantized (ignore): a weight_scale beside it belongs to nothing."""
    work = _copy(ct_root, tmp_path)
    edit(work / "base" / "model.safetensors", lambda sd: sd.update({"lm_head.weight_scale": torch.ones(1)}))
    refused(work, "lm_head.weight_scale: a quantization companion beside a", "(compressed-tensors)")


# -- bitsandbytes ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bnb_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bnb")
    model = llama(hidden=64, inter=128)
    save_bnb(
        model, root / "nf4-dq" / "base", load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
    )
    save_bnb(model, root / "fp4" / "base", load_in_4bit=True, bnb_4bit_quant_type="fp4")
    save_bnb(model, root / "int8" / "base", load_in_8bit=True)
    for case in ("nf4-dq", "fp4", "int8"):
        pm = peft_wrap(llama(hidden=64, inter=128), r=4, lora_alpha=8, target_modules=["q_proj"])
        pm.save_pretrained(root / case / "adapter")
    return root


def _set(key: str, index: int, value: float):
    def fn(sd):
        t = sd[key].clone()
        t.view(-1)[index] = value
        sd[key] = t

    return fn


def _huge(weight: str):
    """Finite block maxima and code book whose products are beyond fp32 (1e30 · 1e30)."""

    def fn(sd):
        sd[weight + ".absmax"] = torch.full_like(sd[weight + ".absmax"], 1e30)
        sd[weight + ".quant_map"] = sd[weight + ".quant_map"] * 1e30

    return fn


def _nested_offset(value: str):
    blob = UNTOUCHED + ".quant_state.bitsandbytes__nf4"

    def fn(sd):
        state = json.loads(bytes(sd[blob].tolist()))
        text = json.dumps(state).replace(f'"nested_offset": {state["nested_offset"]}', f'"nested_offset": {value}')
        sd[blob] = torch.tensor(list(text.encode()), dtype=torch.uint8)

    return fn


@pytest.mark.parametrize(
    "case, fn, needle",
    [
        ("int8", _set(UNTOUCHED.removesuffix(".weight") + ".SCB", 3, float("nan")), ".down_proj.SCB: holds NaN or Inf"),
        ("int8", _set(TOUCHED.removesuffix(".weight") + ".SCB", 3, -2.0), "q_proj.SCB: holds a negative scale (-2)"),
        ("fp4", _set(UNTOUCHED + ".absmax", 5, float("inf")), f"{UNTOUCHED}.absmax: holds NaN or Inf"),
        ("fp4", _set(UNTOUCHED + ".absmax", 0, -1.0), f"{UNTOUCHED}.absmax: holds a negative scale (-1)"),
        ("fp4", _set(UNTOUCHED + ".quant_map", 3, float("nan")), f"{UNTOUCHED}.quant_map: holds NaN or Inf"),
        ("nf4-dq", _set(UNTOUCHED + ".nested_absmax", 0, float("nan")), f"{UNTOUCHED}.nested_absmax: holds NaN"),
        ("nf4-dq", _set(UNTOUCHED + ".nested_absmax", 0, -3.0), f"{UNTOUCHED}.nested_absmax: holds a negative"),
        ("nf4-dq", _set(UNTOUCHED + ".nested_quant_map", 9, float("inf")), f"{UNTOUCHED}.nested_quant_map: holds"),
        (
            "nf4-dq",
            _nested_offset("NaN"),
            "bitsandbytes__nf4: bitsandbytes quant state: nested_offset must be a finite number",
        ),
        (
            "nf4-dq",
            _nested_offset("1e39"),
            "bitsandbytes__nf4: bitsandbytes quant state: nested_offset must be a finite number",
        ),
        (
            "nf4-dq",
            _nested_offset('"0.5"'),
            "bitsandbytes__nf4: bitsandbytes quant state: nested_offset must be a finite number",
        ),
        ("fp4", _huge(UNTOUCHED), f"{UNTOUCHED}: dequantized to NaN or Inf (bnb-fp4: a stored value is NaN, or value"),
    ],
)
def test_bitsandbytes_bad_scales(bnb_root, tmp_path, case, fn, needle):
    work = _copy(bnb_root / case, tmp_path)
    edit(work / "base" / "model.safetensors", fn)
    refused(work, "base/model.safetensors: ", needle)


@pytest.mark.parametrize("case, stray", [("fp4", "model.norm.weight.absmax"), ("int8", "lm_head.SCB")])
def test_bitsandbytes_orphan_companion(bnb_root, tmp_path, case, stray):
    work = _copy(bnb_root / case, tmp_path)
    edit(work / "base" / "model.safetensors", lambda sd: sd.update({stray: torch.ones(4)}))
    needle = f"{stray}: a quantization companion" if case == "fp4" else "lm_head.weight: 8-bit weight stored as BF16"
    refused(work, needle)


def test_bitsandbytes_zero_absmax_is_an_all_zero_block(bnb_root, tmp_path):
    """bitsandbytes writes 0 for an all-zero block: no warning, the block reads as zeros (its library's)."""
    import bitsandbytes.functional as F

    work = _copy(bnb_root / "fp4", tmp_path)
    edit(work / "base" / "model.safetensors", _set(UNTOUCHED + ".absmax", 1, 0.0))
    raw = load_file(str(work / "base" / "model.safetensors"))
    res = lc.merge(work / "adapter", base=work / "base", output=work / "m", dtype="fp32")
    assert not [w for w in res.warnings if "are 0" in w]
    parts = {k[len(UNTOUCHED) + 1 :]: v for k, v in raw.items() if k.startswith(UNTOUCHED + ".")}
    want = F.dequantize_4bit(raw[UNTOUCHED], F.QuantState.from_dict(parts, device="cpu")).float()
    got = load_file(str(work / "m" / "model.safetensors"))[UNTOUCHED]
    assert torch.equal(got, want) and not got.reshape(-1)[64:128].any()


# -- MXFP4 -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mxfp4_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mxfp4")
    save_mxfp4(gpt_oss(), root / "base")
    peft_wrap(gpt_oss(), r=4, lora_alpha=8, target_modules=["q_proj"]).save_pretrained(root / "adapter")
    return root


EXPERT = "model.layers.1.mlp.experts.down_proj"


def test_mxfp4_nan_exponent(mxfp4_root, tmp_path):
    work = _copy(mxfp4_root, tmp_path)

    def fn(sd):
        s = sd[EXPERT + "_scales"].clone()
        s[2, 5, 1] = 255
        sd[EXPERT + "_scales"] = s

    edit(work / "base" / "model.safetensors", fn)
    refused(work, f"base/model.safetensors: {EXPERT}_scales: holds NaN or Inf (an e8m0 exponent of 255 is NaN)")


def test_mxfp4_exponent_whose_product_overflows(mxfp4_root, tmp_path):
    """2^127 · 6 is beyond bf16 (and fp32): the blocks are named."""
    work = _copy(mxfp4_root, tmp_path)

    def fn(sd):
        s, b = sd[EXPERT + "_scales"].clone(), sd[EXPERT + "_blocks"].clone()
        s[3, 0, 0], b[3, 0, 0, 0] = 254, 0x77  # two codes of 6.0
        sd[EXPERT + "_scales"], sd[EXPERT + "_blocks"] = s, b

    edit(work / "base" / "model.safetensors", fn)
    refused(work, f"base/model.safetensors: {EXPERT}_blocks: dequantized to NaN or Inf (mxfp4")


# -- combine: weights bounded so that products stay within fp32, every output finite -----------------------------------
@pytest.fixture(scope="module")
def combine_root(tmp_path_factory):
    """a: a plain LoRA (scaling 2); big: the same with factors ×100 (|A| up to ~50)."""
    from tiny import llama as tiny_llama

    root = tmp_path_factory.mktemp("combine")
    peft_wrap(tiny_llama(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).save_pretrained(root / "a")
    shutil.copytree(root / "a", root / "big")
    edit(root / "big" / "adapter_model.safetensors", lambda sd: sd.update({k: v * 100 for k, v in sd.items()}))
    return root


def _combine_cli(root: Path, out: Path, *specs: str, method: str = "cat"):
    return cli(
        "combine",
        *[str(root / s) if ":" not in s else str(root / s.split(":")[0]) + ":" + s.split(":")[1] for s in specs],
        "--method",
        method,
        "-o",
        out,
    )


@pytest.mark.parametrize("method", ["cat", "linear", "svd", "ties"])
@pytest.mark.parametrize("weight", ["1e300", "-1e300", "2e38"])
def test_combine_weight_times_scaling_beyond_fp32(combine_root, tmp_path, method, weight):
    before = _digest(combine_root)
    extra = ("--density", "0.5") if method == "ties" else ()
    res = cli(
        "combine",
        combine_root / "a",
        f"{combine_root / 'a'}:{weight}",
        "--method",
        method,
        *extra,
        "-o",
        tmp_path / "out",
    )
    line = one_error(
        res,
        f"adapter 2 ('{combine_root / 'a'}'): weight {float(weight):g} × scaling 2 =",
        "is beyond float32",
        out=tmp_path / "out",
    )
    assert "q_proj.lora_A.weight" in line and _digest(combine_root) == before


@pytest.mark.parametrize("method, needle", [("cat", "lora_A.weight overflows float32"), ("svd", "ΔW of")])
def test_combine_product_with_the_factors_overflows(combine_root, tmp_path, method, needle):
    """|w·s| = 2e37 is within fp32, but × factors of ~50 it is not: the output is refused by name."""
    res = cli("combine", combine_root / "a", f"{combine_root / 'big'}:1e37", "--method", method, "-o", tmp_path / "o")
    one_error(res, needle, f"adapter '{combine_root / 'big'}' × 1e+37", out=tmp_path / "o")


def test_combine_large_weights_within_fp32_equal_peft(combine_root, tmp_path):
    """The bound is fp32's range, not tighter: a weight of 1e30 combines as PEFT's add_weighted_adapter does."""
    from peft import PeftModel
    from tiny import llama as tiny_llama

    model = PeftModel.from_pretrained(tiny_llama(), str(combine_root / "a"), adapter_name="x")
    model.load_adapter(str(combine_root / "a"), adapter_name="y")
    model.add_weighted_adapter(["x", "y"], [1.0, 1e30], "new", combination_type="cat")
    model.save_pretrained(str(tmp_path / "peft"), selected_adapters=["new"])
    lc.combine([str(combine_root / "a"), f"{combine_root / 'a'}:1e30"], method="cat", output=tmp_path / "ours")
    ref = load_file(str(tmp_path / "peft" / "new" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)
    assert max(v.abs().max().item() for v in got.values()) > 1e29


# -- extraction: factors finite --------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["self_attn.o_proj", "mlp.down_proj"])
def test_extract_factors_beyond_fp16(tmp_path, module):
    """A finite ΔW (its norm well within fp32, which the difference checks) whose √σ is beyond fp16's 65504:
    fp16 factors would be Inf.  fp32 factors of it are fine (and equal ΔW's rank-1 SVD)."""
    from tiny import llama as tiny_llama

    tiny_llama().save_pretrained(tmp_path / "base")
    tuned = tiny_llama()
    name = f"model.layers.1.{module}.weight"
    with torch.no_grad():
        w = tuned.get_parameter(name)
        w.add_(torch.full_like(w, 1e10))  # B = A = 1e5 everywhere (rank 1)
    tuned.save_pretrained(tmp_path / "tuned")
    before = _digest(tmp_path)
    args = ("extract", tmp_path / "tuned", "--base", tmp_path / "base", "-o", tmp_path / "out", "--rank", "2")
    line = one_error(
        cli(*args, "--factor-dtype", "fp16"),
        f"tuned/model.safetensors: {name}: the difference from the base factors into NaN or Inf in fp16",
        "--factor-dtype fp32 holds up to 3.4e38",
        out=tmp_path / "out",
    )
    assert "Traceback" not in line and _digest(tmp_path) == before
    lc.extract(tmp_path / "tuned", base=tmp_path / "base", output=tmp_path / "ok", rank=2, include=[module])
    sd = load_file(str(tmp_path / "ok" / "adapter_model.safetensors"))
    a = sd[f"base_model.model.model.layers.1.{module}.lora_A.weight"]
    b = sd[f"base_model.model.model.layers.1.{module}.lora_B.weight"]
    delta = (
        load_file(str(tmp_path / "tuned" / "model.safetensors"))[name]
        - load_file(str(tmp_path / "base" / "model.safetensors"))[name]
    )
    assert torch.isfinite(a).all() and b.abs().max() > 65504
    assert ((b @ a) - delta).abs().max() <= 1e-5 * delta.abs().max()


# -- meaning we cannot reproduce: DoRA said, no magnitudes -------------------------------------------------------------
def _peft_logits(base_dir: Path, adapter: Path):
    from peft import PeftModel
    from tiny import logits
    from transformers import AutoModelForCausalLM

    return logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter)))


@pytest.mark.parametrize("strip", ["all", "one"])
def test_peft_use_dora_without_magnitudes(tmp_path, strip):
    """PEFT loads such an adapter as DoRA with m = ‖W‖ (not the plain LoRA of the tensors, nor the trained
    DoRA): no reading is what was trained, so every route refuses, naming adapter_config.json."""
    from tiny import llama as tiny_llama
    from tiny import logits

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    targets = ["q_proj", "v_proj"]
    peft_wrap(tiny_llama(), r=4, lora_alpha=8, target_modules=targets, use_dora=True).save_pretrained(
        tmp_path / "adapter"
    )
    plain = peft_wrap(tiny_llama(), r=4, lora_alpha=8, target_modules=targets)  # the same factors (same seed)
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    sd = load_file(str(path))
    mags = sorted(k for k in sd if "magnitude" in k)
    drop = mags if strip == "all" else mags[:1]
    save_file({k: v for k, v in sd.items() if k not in drop}, str(path))
    # what PEFT makes of it: neither the plain LoRA nor the trained DoRA
    got = _peft_logits(tmp_path / "base", tmp_path / "adapter")
    assert (got - logits(plain)).abs().max() > 1e-3
    n = len(drop)
    needle = f"adapter_config.json: {drop[0].replace('.lora_magnitude_vector', '.lora_A.weight')}: use_dora is true"
    for args in (
        ("merge", tmp_path / "adapter", "--base", tmp_path / "base", "-o", tmp_path / "out"),
        ("convert", tmp_path / "adapter", "--to", "gguf", "--base", tmp_path / "base", "-o", tmp_path / "out.gguf"),
        ("convert", tmp_path / "adapter", "--to", "mlx", "-o", tmp_path / "out"),
    ):
        what = f"but {n} of the {len(mags)} LoRA modules hold no DoRA magnitude"
        refused(tmp_path, needle, what, "PEFT", args=args, out=Path(args[-1]))


def test_peft_magnitudes_without_use_dora(tmp_path):
    """The reverse: DoRA magnitudes beside use_dora: false.  PEFT drops them and gives the plain LoRA (not the
    DoRA the tensors describe), so every route refuses, naming the first magnitude vector."""
    from tiny import llama as tiny_llama
    from tiny import logits

    tiny_llama().save_pretrained(tmp_path / "base")
    targets = ["q_proj", "v_proj"]
    dora = peft_wrap(tiny_llama(), r=4, lora_alpha=8, target_modules=targets, use_dora=True)
    dora.save_pretrained(tmp_path / "adapter")
    plain = peft_wrap(tiny_llama(), r=4, lora_alpha=8, target_modules=targets)  # the same factors (same seed)
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), use_dora=False)))
    got = _peft_logits(tmp_path / "base", tmp_path / "adapter")  # what PEFT makes of it: the plain LoRA
    assert (got - logits(plain)).abs().max() <= 1e-5 and (got - logits(dora)).abs().max() > 1e-4
    mags = sorted(k for k in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")) if "magnitude" in k)
    needle = f"adapter_config.json: {mags[0]}: use_dora is false but {len(mags)} of the {len(mags)} LoRA modules"
    for args in (
        ("merge", tmp_path / "adapter", "--base", tmp_path / "base", "-o", tmp_path / "out"),
        ("convert", tmp_path / "adapter", "--to", "gguf", "--base", tmp_path / "base", "-o", tmp_path / "out.gguf"),
    ):
        refused(tmp_path, needle, "PEFT would drop them", args=args, out=Path(args[-1]))


def test_diffusers_metadata_use_dora_without_magnitudes(tmp_path):
    """diffusers loads the file as DoRA (magnitudes from the weight norms): its output differs from the plain
    LoRA's, so the merge, which would give the plain LoRA, refuses by the file's name."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    from tiny import peft_unet, unet

    model, want = peft_unet(tmp_path)  # plain LoRA, saved base at tmp_path / "unet"
    meta = dict(model.peft_config["default"].to_dict(), use_dora=True)
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "adapter"), unet_lora_layers=get_peft_model_state_dict(model), unet_lora_adapter_metadata=meta
    )
    assert (diffusers_load(tmp_path / "adapter", unet()) - want).abs().max().item() > 1e-2
    file = tmp_path / "adapter" / "pytorch_lora_weights.safetensors"
    d = lc.detect(tmp_path / "adapter")  # detect still describes it, and says why it is refused
    assert any("unet.use_dora: true" in w for w in d.warnings), d.warnings
    args = ("merge", tmp_path / "adapter", "--base", tmp_path / "unet", "-o", tmp_path / "out")
    shutil.copytree(tmp_path / "unet", tmp_path / "base")  # (refused() checks base/ and adapter/ stay intact)
    refused(tmp_path, f"{file}: unet.", "lora_adapter_metadata has unet.use_dora: true but 54 of the 54", args=args)
    args = ("convert", tmp_path / "adapter", "--to", "kohya", "-o", tmp_path / "out")
    refused(tmp_path, "diffusers would load them as DoRA", args=args)


@pytest.mark.parametrize("config", [{"fine_tune_type": "dora"}, {"fine_tune_type": None, "use_dora": True}])
def test_mlx_dora_without_magnitudes(tmp_path, config):
    from tiny import llama as tiny_llama

    tiny_llama().save_pretrained(tmp_path / "base")
    pm = peft_wrap(tiny_llama(), r=4, lora_alpha=8, target_modules=["q_proj"])
    peft_as_mlx(pm, tmp_path / "adapter", 2.0, **{k: v for k, v in config.items() if v is not None})
    if config["fine_tune_type"] is None:
        p = tmp_path / "adapter" / "adapter_config.json"
        p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "fine_tune_type"}))
    refused(tmp_path, "has no DoRA magnitude .m (fine_tune_type dora)")


# -- mergekit's bias deltas: merged, with a warning naming PEFT's behaviour ------------------------------------------
def test_lora_b_bias_without_lora_bias_is_merged_and_said(tmp_path):
    """mergekit writes a bias delta as lora_B.bias and leaves lora_bias out of adapter_config.json: merged
    as mergekit means (the merged biases are the tuned model's), with a warning; PEFT drops them."""
    from peft import LoraConfig, PeftModel
    from tiny import qwen2

    base = qwen2(tie=False)
    base.save_pretrained(tmp_path / "base")
    torch.manual_seed(5)
    tuned = qwen2(tie=False)
    sd: dict[str, torch.Tensor] = {}
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    with torch.no_grad():  # the tuned model: base + B·A on the weights, + δ on the biases
        for mod in modules:
            lin = tuned.get_submodule(mod)
            a, b = torch.randn(4, lin.in_features) * 0.1, torch.randn(lin.out_features, 4) * 0.1
            delta = torch.randn(lin.out_features) * 0.1
            lin.weight.add_(b @ a)
            lin.bias.add_(delta)
            p = f"base_model.model.{mod}"
            sd.update({f"{p}.lora_A.weight": a, f"{p}.lora_B.weight": b, f"{p}.lora_B.bias": delta})
    (tmp_path / "adapter").mkdir()
    save_file(sd, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj"]).to_dict()  # as mergekit: alpha = r
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items() if k != "lora_bias"}
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))

    res = lc.merge(tmp_path / "adapter", base=tmp_path / "base", output=tmp_path / "m", dtype="fp32")
    warned = [w for w in res.warnings if "lora_B.bias" in w]
    assert len(warned) == 1, res.warnings
    assert "2 module(s) hold lora_B.bias" in warned[0] and "lora_bias is false in adapter_config.json" in warned[0]
    assert "merged as mergekit" in warned[0] and "PEFT would drop them" in warned[0]
    out = load_file(str(tmp_path / "m" / "model.safetensors"))
    for mod in modules:
        want = tuned.get_submodule(mod)
        assert torch.equal(out[f"{mod}.bias"], want.bias.detach())  # base bias + 1·δ, as the tuned model's
        assert torch.allclose(out[f"{mod}.weight"], want.weight.detach(), atol=1e-6)
    # PEFT: lora_B has no bias when lora_bias is false, so the deltas are dropped (the base's biases stay)
    import warnings as _w

    with _w.catch_warnings():
        _w.simplefilter("ignore")
        peft_merged = PeftModel.from_pretrained(qwen2(tie=False), str(tmp_path / "adapter")).merge_and_unload()
    for mod in modules:
        assert torch.equal(peft_merged.get_submodule(mod).bias, base.get_submodule(mod).bias)
        assert not torch.equal(peft_merged.get_submodule(mod).bias, tuned.get_submodule(mod).bias)
    assert lc.detect(tmp_path / "adapter").warnings == warned  # detect says it too


# -- GGUF: norms saved whole refused by default, dropped and listed with --drop-norms ---------------------------------
NORMS = ["model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight", "model.norm.weight"]


@pytest.fixture
def mergekit_like(tmp_path):
    """A LoRA adapter with norm vectors saved whole, as mergekit-extract-lora writes them (modules_to_save)."""
    from tiny import llama as tiny_llama

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    peft_wrap(tiny_llama(), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).save_pretrained(
        tmp_path / "adapter"
    )
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    edit(path, lambda sd: sd.update({f"base_model.model.{k}": base.get_parameter(k).detach() * 1.1 for k in NORMS}))
    p = tmp_path / "adapter" / "adapter_config.json"
    p.write_text(json.dumps(dict(json.loads(p.read_text()), modules_to_save=sorted(k.split(".")[-2] for k in NORMS))))
    return tmp_path


def _gguf_args(work: Path, *extra: str) -> tuple:
    return ("convert", work / "adapter", "--to", "gguf", "--base", work / "base", "-o", work / "a.gguf", *extra)


def test_gguf_refuses_whole_norms_by_default(mergekit_like):
    w = mergekit_like
    refused(
        w,
        "adapter: base_model.model.model.layers.0.input_layernorm.weight: 3 norm weight(s) saved whole",
        "GGUF LoRA cannot carry them",
        "--drop-norms",
        args=_gguf_args(w),
        out=w / "a.gguf",
    )


def test_gguf_drop_norms_writes_the_pairs_and_lists_the_norms(mergekit_like):
    import gguf

    w = mergekit_like
    res = cli(*_gguf_args(w, "--drop-norms", "--json"))
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [d["tensor"] for d in doc["dropped"]] == sorted(f"base_model.model.{k}" for k in NORMS)
    assert all("llama.cpp's LoRA loader ignores it" in d["reason"] for d in doc["dropped"])
    assert any("3 norm weight(s) saved whole were left out" in x for x in doc["warnings"])
    names = {t.name for t in gguf.GGUFReader(str(w / "a.gguf")).tensors}
    assert names == {f"blk.{i}.attn_{p}.weight.lora_{ab}" for i in (0, 1) for p in "qv" for ab in "ab"}
    assert not any("norm" in n for n in names)
    # the pairs are the adapter's: v is not permuted, so lora_a = A and lora_b = B (f32)
    _, tensors = read_gguf(w / "a.gguf")
    sd = load_file(str(w / "adapter" / "adapter_model.safetensors"))
    v = "base_model.model.model.layers.1.self_attn.v_proj"
    assert torch.equal(tensors["blk.1.attn_v.weight.lora_a"][0], sd[f"{v}.lora_A.weight"])
    assert torch.equal(tensors["blk.1.attn_v.weight.lora_b"][0], sd[f"{v}.lora_B.weight"])
    text = cli(*_gguf_args(w, "--drop-norms", "--force"))  # the text output lists them too
    assert text.exit_code == 0 and all(f"dropped: base_model.model.{k}" in text.stdout for k in NORMS)


def test_drop_norms_leaves_other_whole_tensors_refused(mergekit_like):
    w = mergekit_like
    edit(
        w / "adapter" / "adapter_model.safetensors",
        lambda sd: sd.update({"base_model.model.model.layers.0.mlp.up_proj.weight": torch.zeros(64, 32)}),
    )
    refused(
        w,
        "model.layers.0.mlp.up_proj.weight",
        "cannot be written as GGUF",
        args=_gguf_args(w, "--drop-norms"),
        out=w / "a.gguf",
    )


def test_drop_norms_is_a_gguf_option(mergekit_like):
    w = mergekit_like
    args = ("convert", w / "adapter", "--to", "mlx", "--base", w / "base", "-o", w / "out", "--drop-norms")
    refused(w, "--drop-norms applies to --to gguf only, not --to mlx", args=args, code=2)  # a usage error
