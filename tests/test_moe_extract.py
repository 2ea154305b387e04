"""Extraction from a merged mixture-of-experts model: each expert's ΔP factored, packed into one PEFT
target_parameters pair per fused parameter (or one module per stored expert tensor), loading in PEFT with
no missing or unexpected keys and giving the fine-tune's logits back."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import cli, one_error
from tiny_moe import E, load, load_clean, logits, model, peft_experts, save_base

import lora_convert as lc


def _tuned(tmp_path, name, **kw):
    m = model(name)
    save_base(m, tmp_path / "base")
    pm = peft_experts(m, **kw)
    ref = logits(pm)
    pm.merge_and_unload().save_pretrained(str(tmp_path / "tuned"))
    return ref


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_extract_experts_as_target_parameters(tmp_path, name):
    ref = _tuned(tmp_path, name, r=2)
    res = lc.extract(tmp_path / "tuned", base=tmp_path / "base", output=tmp_path / "ex", rank=2)
    reports = [m for m in res.report.modules if m.kind == "experts"]
    assert len(reports) == 2 * 2 * E  # layers × parameters × experts, each with its own error
    assert {m.expert for m in reports} == set(range(E)) and max(m.error for m in reports) < 1e-5
    cfg = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == [
        f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("down_proj", "gate_up_proj")
    ]
    assert (logits(load_clean(tmp_path / "base", tmp_path / "ex")) - ref).abs().max() <= 1e-5


def test_extract_energy_gives_every_expert_the_largest_rank(tmp_path):
    """Ranks chosen per expert differ; PEFT needs one per parameter: the largest, zero-padded nowhere.

    Judged by an independent exact SVD of each expert's ΔW (tuned − base): the rank of each parameter is the
    largest of its experts' smallest ranks keeping 90% of the energy, and each expert's rank-k factors, as
    PEFT merges them, are the optimal rank-k approximation (Eckart–Young) up to rounding."""
    ref = _tuned(tmp_path, "mixtral", r=6, attn=())  # rank-6 deltas: 90% of the energy needs fewer
    res = lc.extract(tmp_path / "tuned", base=tmp_path / "base", output=tmp_path / "ex", energy=0.9, max_rank=8)
    reports = [m for m in res.report.modules if m.kind == "experts"]
    by_param: dict[str, set[int]] = {}
    for m in reports:
        by_param.setdefault(m.module, set()).add(m.rank)
        assert m.energy >= 0.9 - 1e-9
    assert all(len(r) == 1 for r in by_param.values())
    pm = load_clean(tmp_path / "base", tmp_path / "ex")
    assert (logits(pm) - ref).abs().max() < 0.5 * (ref - logits(load(tmp_path / "base"))).abs().max()

    base = dict(load(tmp_path / "base").named_parameters())
    tuned = dict(load(tmp_path / "tuned").named_parameters())
    ours = dict(pm.merge_and_unload().named_parameters())
    chosen = set()
    for path, (k,) in by_param.items():
        smallest = []
        for e in range(E):
            d = (tuned[path][e] - base[path][e]).double()
            s2 = torch.linalg.svdvals(d) ** 2
            total = s2.sum().item()
            smallest.append(int((s2.cumsum(0) >= 0.9 * total).nonzero()[0]) + 1)
            optimal = s2[k:].sum().sqrt().item()  # the rank-k truncation's error
            err = (d - (ours[path][e] - base[path][e]).double()).norm().item()
            rounding = 1e-6 * base[path][e].norm().item()  # fp32 storage of tuned and merged weights
            assert err <= optimal * (1 + 1e-5) + rounding, (path, e, k, err, optimal)
            assert 1 - err**2 / total >= 0.9, (path, e, k, err**2 / total)
        assert k == max(smallest), (path, k, smallest)
        chosen.update(smallest)
    assert len(chosen) > 1 and max(chosen) < 6, chosen  # the experts did differ and truncation did happen


def test_extract_per_expert_modules(tmp_path):
    """--moe-layout per-expert: one LoRA module per stored expert tensor (v4 names), which PEFT converts."""
    ref = _tuned(tmp_path, "qwen3_moe", r=2)
    res = lc.extract(
        tmp_path / "tuned", base=tmp_path / "base", output=tmp_path / "ex", rank=2, moe_layout="per-expert"
    )
    assert res.ops["lora"] == 2 * (2 + 3 * E)
    cfg = json.loads((tmp_path / "ex" / "adapter_config.json").read_text())
    assert "target_parameters" not in cfg or not cfg["target_parameters"]
    assert (logits(load_clean(tmp_path / "base", tmp_path / "ex")) - ref).abs().max() <= 1e-5


def test_extract_per_expert_refused_for_fused_experts(tmp_path):
    _tuned(tmp_path, "gpt_oss", r=2)
    with pytest.raises(lc.RouteError, match="store the experts fused"):
        lc.extract(tmp_path / "tuned", base=tmp_path / "base", output=tmp_path / "ex", moe_layout="per-expert")
    assert not (tmp_path / "ex").exists()


def test_expert_factors_beyond_fp16_refused_by_the_experts_name(tmp_path):
    """One expert's ΔP with √σ beyond fp16's 65504: fp16 factors would be Inf, so extraction refuses, naming
    the fused parameter and the expert, and writes nothing; fp32 factors of it are fine."""
    m = model("qwen3_moe")
    save_base(m, tmp_path / "base")
    with torch.no_grad():
        m.get_parameter("model.layers.1.mlp.experts.down_proj")[1].add_(1e10)  # rank 1, B = A = 1e5
    save_base(m, tmp_path / "tuned")
    args = ("extract", tmp_path / "tuned", "--base", tmp_path / "base", "-o", tmp_path / "out", "--rank", "2")
    one_error(
        cli(*args, "--factor-dtype", "fp16"),
        "tuned: model.layers.1.mlp.experts.down_proj[1]: the difference from the base factors into NaN or Inf in fp16",
        "--factor-dtype fp32 holds up to 3.4e38",
        out=tmp_path / "out",
    )
    res = lc.extract(tmp_path / "tuned", base=tmp_path / "base", output=tmp_path / "ok", rank=2)
    worst = max(r.error for r in res.report.modules if r.kind == "experts")
    assert worst < 1e-5
