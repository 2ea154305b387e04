"""detect and report on mixture-of-experts adapters: expert targets shown as such, PEFT's parameter
counts, and FLOPs per token for the experts a token goes through (FlopCounterMode on a one-token forward
with eager experts and attention: ``mm``/``addmm`` are the weight matmuls, ``bmm`` the attention)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from tiny import save_unmerged
from tiny_moe import FF, E, H, config, model, peft_experts, save_base, v4_adapter
from torch.utils.flop_counter import FlopCounterMode

import lora_convert as lc
from lora_convert.cli import main


def _flops(m) -> tuple[int, int]:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(input_ids=torch.tensor([[3]]))
    g = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    assert set(g) <= {"aten.mm", "aten.addmm", "aten.bmm"}, g
    return g.get("aten.mm", 0) + g.get("aten.addmm", 0), g.get("aten.bmm", 0)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "gpt_oss", "qwen2_moe"])
def test_report_counts_active_experts_and_peft_parameters(tmp_path, name):
    from transformers import AutoModelForCausalLM

    m = model(name)
    save_base(m, tmp_path / "base")
    eager = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", attn_implementation="eager", experts_implementation="eager"
    ).eval()
    mm, bmm = _flops(eager)
    # qwen2: the shared expert too (gate_proj with up_proj: PEFT 0.22 refuses one without the other)
    attn = ("q_proj", "gate_proj", "up_proj") if name == "qwen2_moe" else ("q_proj",)
    pm = peft_experts(m, r=3, alpha=6, attn=attn)
    trainable, total = pm.get_nb_trainable_parameters()
    pm.save_pretrained(str(tmp_path / "adapter"))
    rep = lc.report(tmp_path / "adapter", base=tmp_path / "base", seq_len=1)
    merged = rep.row("merged")
    assert merged.flops_base_matmul == mm and merged.flops_attention == bmm
    assert rep.row("adapter").lora_parameters == trainable
    assert rep.row("unmerged").total_parameters == total
    k = config(name).num_experts_per_tok
    # The ranks PEFT gave the experts: r = 3, except that on qwen2 PEFT 0.22 also turns the gate_proj +
    # up_proj targets into a gate_up_proj target of rank 2r (rank_pattern), which the adapter records.
    r_gate_up, r_down = (_expert_rank(pm, p) for p in ("gate_up_proj", "down_proj"))
    assert r_down == 3 and r_gate_up == (6 if name == "qwen2_moe" else 3)
    per_token = r_gate_up * (H + 2 * FF) + r_down * (FF + H)  # gate_up (in H, out 2I) and down
    experts_row = next(r for r in rep.modules if r.kind == "experts")
    assert experts_row.extra_flops == 2 * k * 2 * per_token  # 2 layers, k experts, 2 FLOPs a MAC
    assert experts_row.lora_parameters == 2 * E * per_token
    assert any("counted for the 2 a token goes through" in n for n in rep.notes)


def _expert_rank(pm, param: str) -> int:
    """The rank of PEFT's LoRA on the experts' fused ``param``, read off its lora_A (E·r, in)."""
    (r,) = {
        w.lora_A["default"].weight.shape[0] // E
        for w in pm.modules()
        if getattr(w, "parameter_name", None) == param and hasattr(w, "lora_A")
    }
    return r


def test_report_per_expert_adapter(tmp_path):
    """One LoRA pair per expert: parameters are the pairs stored; FLOPs those of the k experts used."""
    m = model("mixtral")
    save_base(m, tmp_path / "base")
    v4_adapter("mixtral", m, tmp_path / "adapter", r=2)
    rep = lc.report(tmp_path / "adapter", base=tmp_path / "base", seq_len=1)
    experts_row = next(r for r in rep.modules if r.kind == "experts")
    assert experts_row.count == 2 * E * 3
    assert experts_row.lora_parameters == 2 * E * 2 * (2 * (H + FF) + (FF + H))
    assert experts_row.extra_flops == 2 * 2 * 2 * 2 * (2 * (H + FF) + (FF + H))  # layers × k × 2·r·(in+out)


def test_detect_shows_expert_targets(tmp_path):
    """The issue's case: r=4 per expert, E=4, so the tensors hold 16 rows; no false rank warning."""
    m = model("qwen3_moe")
    pm = peft_experts(m, r=4, alpha=8)
    pm.save_pretrained(str(tmp_path / "adapter"))
    d = lc.detect(tmp_path / "adapter")
    assert d.warnings == []
    a = d.adapters[0]
    assert a.target_modules == ["down_proj", "gate_up_proj", "q_proj", "v_proj"]
    assert a.lora_parameters == pm.get_nb_trainable_parameters()[0]
    groups = {g.name: g for g in a.experts}
    assert set(groups) == {"gate_up_proj", "down_proj"}
    g = groups["gate_up_proj"]
    assert (g.layout, g.count, g.layers, g.experts, g.ranks) == ("fused", 2, [0, 1], [E], [4])
    assert (g.b_layout, g.b_layout_assumed, g.nested) == ("rank_major", True, True)
    assert groups["down_proj"].nested is False
    res = CliRunner().invoke(main, ["detect", str(tmp_path / "adapter"), "--json"])
    assert res.exit_code == 0, res.output
    js = json.loads(res.output)["adapters"][0]["experts"]
    assert {e["name"]: e["experts"] for e in js} == {"down_proj": [E], "gate_up_proj": [E]}
    res = CliRunner().invoke(main, ["detect", str(tmp_path / "adapter")])
    assert "expert LoRA" in res.output and "rank_major*" in res.output


def test_detect_marker_and_unmerged(tmp_path):
    m = model("gpt_oss")
    pm = peft_experts(m, r=2)
    un = save_unmerged(pm, tmp_path / "unmerged")
    cfg = json.loads((un / "adapter_config.json").read_text())
    cfg["lora_B_layout"] = "rank_major"
    (un / "adapter_config.json").write_text(json.dumps(cfg))
    d = lc.detect(un)
    assert d.form == "unmerged" and d.warnings == []
    groups = {g.name: g for g in d.adapters[0].experts}
    assert groups["gate_up_proj"].experts == [E] and groups["gate_up_proj"].b_layout_assumed is False
    cfg["lora_B_layout"] = "expert_major"
    (un / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(lc.AdapterError, match="lora_B_layout 'expert_major'"):
        lc.detect(un)


def test_detect_per_expert_adapter(tmp_path):
    m = model("qwen3_moe")
    v4_adapter("qwen3_moe", m, tmp_path / "adapter", router=True)
    a = lc.detect(tmp_path / "adapter").adapters[0]
    groups = {g.name: g for g in a.experts}
    assert set(groups) == {"gate_proj", "up_proj", "down_proj"}
    assert (groups["up_proj"].layout, groups["up_proj"].count, groups["up_proj"].experts) == ("per-expert", 2 * E, [E])
