"""--device: the merge's fp32 tiles (and extraction's SVDs) on a CUDA device.  Without a GPU the CUDA cases
are skipped, and asking for one is a clear error before any work."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny import llama, peft_wrap

import lora_convert as lc

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("device")
    model = llama()
    model.save_pretrained(d / "base")
    pm = peft_wrap(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])
    pm.save_pretrained(d / "adapter")
    return d


def test_cuda_without_a_gpu_is_refused_before_any_work(pair, tmp_path):
    if CUDA:
        pytest.skip("a CUDA device is present")
    with pytest.raises(lc.RouteError, match="no CUDA device"):
        lc.merge(pair / "adapter", base=pair / "base", output=tmp_path / "m", device="cuda")
    with pytest.raises(lc.RouteError, match="cpu or cuda"):
        lc.merge(pair / "adapter", base=pair / "base", output=tmp_path / "m", device="tpu")
    assert not (tmp_path / "m").exists()


@pytest.mark.skipif(not CUDA, reason="no CUDA device (without one the device itself is refused first)")
def test_device_applies_to_merges_and_extraction_only(pair, tmp_path):
    with pytest.raises(lc.RouteError, match="applies to merges and extraction"):
        lc.convert(pair / "adapter", "unmerged", base=pair / "base", output=tmp_path / "u", device="cuda:0")


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", ["auto", "bf16"])
def test_cuda_merge_equals_the_cpu_merge(pair, tmp_path, dtype):
    lc.merge(pair / "adapter", base=pair / "base", output=tmp_path / "cpu", dtype=dtype)
    lc.merge(pair / "adapter", base=pair / "base", output=tmp_path / "gpu", dtype=dtype, device="cuda")
    a, b = load_file(tmp_path / "cpu" / "model.safetensors"), load_file(tmp_path / "gpu" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # fp32 GEMMs on two devices may differ in the last bit before rounding: within 1 ulp
        assert torch.allclose(a[k].float(), b[k].float(), rtol=2 * torch.finfo(a[k].dtype).eps, atol=0), k
