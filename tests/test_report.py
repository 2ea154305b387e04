"""`report`: parameter counts against PEFT/transformers, FLOPs against FlopCounterMode.

FLOP convention checked here: 2 FLOPs per multiply-add (FlopCounterMode's).  On a one-token
forward with no cache and eager attention, ``aten.mm``/``aten.addmm`` are exactly the
weight matmuls (base + LoRA branches) and ``aten.bmm`` exactly the attention score/value
products of one token attending to 1 position, which is the report's attention term at
``seq_len=1`` (4·n_heads·head_dim per layer).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from tiny import decoder_config
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, GPT2Config

from lora_convert.cli import main
from lora_convert.costs import build_report
from lora_convert.render import report_markdown

CASES = {
    "llama": (
        decoder_config(vocab=100, inter=64, max_positions=None),
        dict(
            r=4,
            lora_alpha=8,
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
                "embed_tokens",
                "lm_head",
            ],
            rank_pattern={"down_proj": 2},
            alpha_pattern={"v_proj": 4},
        ),
    ),
    "qwen2": (
        decoder_config("Qwen2Config", tie=True, max_positions=None),
        dict(
            r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"], layers_to_transform=[1]
        ),
    ),
    "gpt2": (
        GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=90, n_positions=64, bos_token_id=0, eos_token_id=0),
        dict(
            r=4,
            lora_alpha=4,
            target_modules=["c_attn", "c_proj", "c_fc"],
            fan_in_fan_out=True,
            modules_to_save=["ln_f"],
        ),
    ),
}


def _flops(model: torch.nn.Module) -> tuple[int, int]:
    """(weight matmuls, attention bmm) of a one-token forward."""
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(input_ids=torch.tensor([[3]]))
    g = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    assert set(g) <= {"aten.mm", "aten.addmm", "aten.bmm"}, g
    return g.get("aten.mm", 0) + g.get("aten.addmm", 0), g.get("aten.bmm", 0)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    name = request.param
    mcfg, lcfg = CASES[name]
    root = tmp_path_factory.mktemp(f"report-{name}")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(mcfg).save_pretrained(root / "base")
    model = AutoModelForCausalLM.from_pretrained(root / "base", attn_implementation="eager")
    model.eval()
    exp = {"base_params": model.num_parameters()}
    exp["base_mm"], exp["base_bmm"] = _flops(model)
    peft_model = get_peft_model(model, LoraConfig(**lcfg))
    peft_model.eval()
    exp["lora_params"], exp["all_params"] = peft_model.get_nb_trainable_parameters()
    exp["unmerged_mm"], exp["unmerged_bmm"] = _flops(peft_model)
    peft_model.save_pretrained(root / "adapter")
    un = root / "unmerged"
    un.mkdir()
    save_file(
        {k: v.detach().clone().contiguous() for k, v in peft_model.state_dict().items()}, str(un / "model.safetensors")
    )
    shutil.copy(root / "adapter" / "adapter_config.json", un)
    shutil.copy(root / "base" / "config.json", un)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(root / "merged")
    exp["merged_params"] = merged.num_parameters()
    exp["merged_mm"], exp["merged_bmm"] = _flops(merged)
    cfg_only = root / "config-only"
    cfg_only.mkdir()
    shutil.copy(root / "base" / "config.json", cfg_only)
    return name, root, exp


def _check_rows(rep, exp):
    un, mg, ad = rep.row("unmerged"), rep.row("merged"), rep.row("adapter")
    # parameters: PEFT's (trainable, all) and transformers' num_parameters
    assert un.lora_parameters == ad.lora_parameters == exp["lora_params"]
    assert un.total_parameters == ad.total_parameters == exp["all_params"]
    assert un.base_parameters == exp["base_params"] == exp["all_params"] - exp["lora_params"]
    assert mg.total_parameters == exp["merged_params"]
    # FLOPs: weight matmuls exactly, attention exactly at seq_len=1
    assert un.flops_base_matmul + un.flops_lora == exp["unmerged_mm"]
    assert mg.flops_base_matmul == exp["merged_mm"] == exp["base_mm"]
    assert un.flops_attention == exp["unmerged_bmm"] == exp["merged_bmm"]
    assert un.flops_total == exp["unmerged_mm"] + exp["unmerged_bmm"]
    assert mg.flops_total == ad.flops_total == exp["merged_mm"] + exp["merged_bmm"]
    assert un.overhead_percent == pytest.approx(100 * un.flops_lora / mg.flops_total, rel=1e-3)
    assert ad.merge_flops > 0 and ad.flops_lora == 0


@pytest.mark.parametrize("form", ["adapter", "unmerged", "merged"])
def test_counts_match_peft_and_flop_counter(case, form):
    name, root, exp = case
    rep = build_report(root / form, base=root / "base" if form == "adapter" else None, seq_len=1)
    if form == "merged":
        (row,) = rep.rows
        assert row.form == "plain" and row.total_parameters == exp["merged_params"]
        assert row.flops_base_matmul == exp["merged_mm"] and row.flops_attention == exp["merged_bmm"]
        return
    assert rep.source_form == form
    _check_rows(rep, exp)
    # bytes from headers: the measured form equals its files' tensors
    measured = rep.row(form)
    assert measured.measured
    weights = root / form / ("adapter_model.safetensors" if form == "adapter" else "model.safetensors")
    header = int.from_bytes(weights.read_bytes()[:8], "little")
    assert measured.bytes_total == weights.stat().st_size - 8 - header
    if form == "adapter":
        assert rep.row("merged").bytes_total == (
            root / "merged" / "model.safetensors"
        ).stat().st_size - 8 - int.from_bytes((root / "merged" / "model.safetensors").read_bytes()[:8], "little")


def test_adapter_base_from_adapter_config_and_from_config_only(case):
    name, root, exp = case
    auto = build_report(root / "adapter", seq_len=1)  # base_model_name_or_path is the local base folder
    assert auto.base_source == "weights"
    _check_rows(auto, exp)
    shapes = build_report(root / "adapter", base=root / "config-only", seq_len=1)
    assert shapes.base_source == "config.json"
    _check_rows(shapes, exp)
    assert shapes.row("adapter").bytes_total == auto.row("adapter").bytes_total


def test_breakdown_and_attention_convention(case):
    name, root, exp = case
    rep = build_report(root / "unmerged", seq_len=2048)
    un = rep.row("unmerged")
    assert sum(k.lora_parameters for k in rep.modules) == un.lora_parameters
    assert sum(k.extra_flops for k in rep.modules) == un.flops_lora
    assert sum(k.merge_flops for k in rep.modules) == rep.row("adapter").merge_flops
    m = rep.model
    assert un.flops_attention == 4 * 2048 * m.heads * m.head_dim * m.layers
    kinds = {k.kind: k for k in rep.modules}
    if name == "llama":
        assert kinds["down_proj"].ranks == [2] and kinds["v_proj"].scalings == [1.0]
        assert kinds["q_proj"].scalings == [2.0] and kinds["q_proj"].count == 2
        assert kinds["embed_tokens"].extra_flops == 2 * 4 * 32
        assert kinds["lm_head"].extra_flops == 2 * 4 * (32 + 100)
    elif name == "qwen2":
        assert rep.model.tied
        assert kinds["q_proj"].count == 1 and kinds["q_proj"].scalings == [pytest.approx(16 / 8**0.5, rel=1e-5)]
    else:
        assert kinds["other"].count == 2 and kinds["up_proj"].count == 2  # c_attn (fused qkv), c_fc
        assert kinds["o_proj"].count == 2 and kinds["down_proj"].count == 2  # attn.c_proj, mlp.c_proj
    md = report_markdown(rep)
    assert "| unmerged |" in md and "| merged |" in md and "| adapter |" in md
    assert ("| q_proj |" in md) == (name != "gpt2")


def test_cli_json_and_markdown(case):
    name, root, exp = case
    r = CliRunner().invoke(
        main, ["report", str(root / "adapter"), "--base", str(root / "base"), "--seq-len", "1", "--json"]
    )
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    rows = {row["form"]: row for row in d["rows"]}
    assert rows["unmerged"]["total_parameters"] == exp["all_params"]
    assert rows["merged"]["flops_total"] == exp["merged_mm"] + exp["merged_bmm"]
    r = CliRunner().invoke(main, ["report", str(root / "unmerged"), "--markdown"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("## Cost by storage form")
    r = CliRunner().invoke(main, ["report", str(root / "unmerged")])
    assert r.exit_code == 0, r.output
    assert "unmerged" in r.output
