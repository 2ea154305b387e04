"""Once-rounded references for merges into a 16-bit dtype, and the distance to them in units in the last place.

A merge into fp16/bf16 must equal ``dtype(fp32(W) + ΔW)``: one rounding, from the exact-in-fp32 sum.  ΔW here
is computed independently from the adapter file as PEFT defines it (``scaling · B @ A``, scaling = α/r, or
α/√r with rsLoRA), so a different fp32 summation order may move an element across a rounding boundary: at
most 1 ulp of the output dtype, never more.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

PREFIX = "base_model.model."


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """A 16-bit float's bit pattern as an integer that counts representable values in order (±0 alike)."""
    assert t.dtype in (torch.float16, torch.bfloat16), t.dtype
    u = t.view(torch.int16).to(torch.int32) & 0xFFFF
    return torch.where(u >= 0x8000, 0x8000 - u, u)


def ulps_apart(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Elementwise distance between two tensors of one 16-bit float dtype, in representable steps."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    return (_ordered(got) - _ordered(want)).abs()


def peft_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """``{base weight key: fp32 ΔW}`` of a plain LoRA adapter folder (Linear layers, no patterns, no DoRA)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern") and not cfg.get("use_dora"), cfg
    r = cfg["r"]
    scaling = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    w = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for k, a in w.items():
        if k.endswith(".lora_A.weight"):
            module = k.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            b = w[k.replace(".lora_A.", ".lora_B.")]
            out[f"{module}.weight"] = scaling * (b.float() @ a.float())
    assert out, f"no LoRA pairs in {adapter}"
    return out


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder, over all its shards."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def assert_rounded_once(merged: Path, base: Path, deltas: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Each tensor of ``merged`` is ``dtype(fp32(W) + ΔW)`` within 1 ulp where an adapter changes it, and
    exactly ``dtype(W)`` where none does; the same keys as the base."""
    got, want = read_tensors(merged), read_tensors(base)
    assert set(got) == set(want), set(got) ^ set(want)
    assert set(deltas) <= set(want), set(deltas) - set(want)
    for k, w in want.items():
        g = got[k]
        assert g.dtype == dtype, (k, g.dtype)
        if k not in deltas:
            assert torch.equal(g, w.to(dtype)), k
            continue
        once = (w.float() + deltas[k]).to(dtype)
        far = ulps_apart(g, once).max().item()
        assert far <= 1, f"{k}: {far} ulps from {dtype}(fp32(W) + ΔW)"
