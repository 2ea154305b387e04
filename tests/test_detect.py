"""detect gets form, targets, ranks and flags right for every PEFT configuration, in both forms."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from tiny import gpt2, llama, peft_wrap, qwen2, save_unmerged

import lora_convert as lc
from lora_convert.cli import main

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]

CASES = {
    # name: (factory, model kwargs, lora kwargs, expected targets, ranks, dora, extra checks)
    "plain": (
        llama,
        {},
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        ["q_proj", "v_proj"],
        [8],
        False,
    ),
    "dora": (llama, {}, dict(r=4, lora_alpha=8, use_dora=True, target_modules=ATTN), sorted(ATTN), [4], True),
    "rslora": (
        llama,
        {},
        dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["o_proj"]),
        ["o_proj"],
        [16],
        False,
    ),
    "rank-pattern": (
        llama,
        {},
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 12}),
        ["down_proj", "q_proj"],
        [4, 12],
        False,
    ),
    "embed-lm-head": (
        llama,
        {},
        dict(r=8, lora_alpha=16, target_modules=["embed_tokens", "lm_head", "q_proj"]),
        ["embed_tokens", "lm_head", "q_proj"],
        [8],
        False,
    ),
    "modules-to-save": (
        llama,
        {},
        dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["norm"]),
        ["q_proj"],
        [4],
        False,
    ),
    "lora-bias": (
        qwen2,
        {"tie": False},
        dict(r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True),
        ["q_proj"],
        [4],
        False,
    ),
    "tokens": (
        qwen2,
        {},
        dict(r=4, lora_alpha=8, target_modules=["v_proj"], trainable_token_indices=[1, 2, 3]),
        ["v_proj"],
        [4],
        False,
    ),
    "gpt2": (gpt2, {}, dict(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True), ["c_attn"], [2], False),
    "layers": (
        llama,
        {"layers": 4},
        dict(r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=[1, 3]),
        ["q_proj"],
        [4],
        False,
    ),
}


@pytest.mark.parametrize("form", ["adapter", "unmerged"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_detect_forms_and_evidence(tmp_path, case, form):
    factory, mkw, lkw, targets, ranks, dora = CASES[case]
    pm = peft_wrap(factory(**mkw), **lkw)
    if form == "adapter":
        pm.save_pretrained(str(tmp_path / "x"))
    else:
        save_unmerged(pm, tmp_path / "x")
    res = CliRunner().invoke(main, ["detect", str(tmp_path / "x"), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["form"] == form
    (ad,) = d["adapters"]
    assert ad["name"] == "default"
    assert ad["target_modules"] == targets
    assert ad["ranks"] == ranks
    assert ad["dora"] is dora
    assert d["warnings"] == [] or all("tied" in w or "old" in w for w in d["warnings"])
    if case == "rslora":
        assert ad["use_rslora"] and ad["modules"][0]["scalings"] == [2.0]  # 8 / sqrt(16)
    if case == "rank-pattern":
        groups = {g["name"]: g for g in ad["modules"]}
        assert groups["down_proj"]["ranks"] == [12] and groups["down_proj"]["scalings"] == [round(8 / 12, 6)]
    if case == "modules-to-save":
        # Whatever PEFT wrapped (its matching of "norm" changed in 0.22: before, every layer norm; now only
        # model.norm): the saved copies are what the checkpoint holds, and detect must list exactly those.
        assert ad["modules_to_save"] == saved_module_names(pm)
    if case == "lora-bias":
        assert ad["lora_bias"] is True
    if case == "tokens":
        assert ad["trainable_tokens"]["embed_tokens"] == 3
    if case == "layers":
        assert ad["layers"] == [1, 3]


def test_named_adapter_and_old_layout(tmp_path):
    pm = peft_wrap(llama(), adapter_name="chat", r=4, lora_alpha=8, target_modules=["q_proj"])
    pm.save_pretrained(str(tmp_path / "a"))
    d = lc.detect(tmp_path / "a")
    assert d.form == "adapter" and d.adapters[0].name == "chat"
    save_unmerged(pm, tmp_path / "u")
    d = lc.detect(tmp_path / "u")
    assert d.form == "unmerged" and d.adapters[0].name == "chat"
    # older PEFT (< 0.7): base weight at q_proj.weight beside q_proj.lora_A.<name>.weight
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "u" / "model.safetensors"))
    old = {k.replace(".base_layer.", "."): v for k, v in sd.items()}
    save_file(old, str(tmp_path / "u" / "model.safetensors"))
    d = lc.detect(tmp_path / "u")
    assert d.form == "unmerged" and any("older PEFT layout" in w for w in d.warnings)
    lc.merge(tmp_path / "u", output=tmp_path / "m")  # and it still merges


def test_plain_base_merged(tmp_path):
    base = llama()
    base.save_pretrained(str(tmp_path / "base"))
    pm = peft_wrap(base, r=4, lora_alpha=8, target_modules=["q_proj"])
    pm.save_pretrained(str(tmp_path / "a"))
    lc.merge(tmp_path / "a", base=tmp_path / "base", output=tmp_path / "m")
    assert lc.detect(tmp_path / "m").form == "plain"
    assert lc.detect(tmp_path / "base", base=tmp_path / "base").form == "base"
    d = lc.detect(tmp_path / "m", base=tmp_path / "base")
    assert d.form == "merged"
    assert sorted(d.differs_from_base) == [f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)]
    # a full-rank change is a fine-tune, not a merged LoRA
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "base" / "model.safetensors")
    w = sd["model.layers.0.mlp.up_proj.weight"]
    sd["model.layers.0.mlp.up_proj.weight"] = w + 0.05 * torch.randn(
        w.shape, generator=torch.Generator().manual_seed(0)
    )
    (tmp_path / "ft").mkdir()
    save_file(sd, tmp_path / "ft" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "ft" / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    ft = lc.detect(tmp_path / "ft", base=tmp_path / "base")
    assert ft.form == "fine-tuned" and ft.differs_from_base == ["model.layers.0.mlp.up_proj.weight"]


def test_config_disagrees_with_tensors_warns(tmp_path):
    pm = peft_wrap(llama(), r=8, lora_alpha=16, target_modules=["q_proj"])
    pm.save_pretrained(str(tmp_path / "a"))
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["r"] = 16
    cfg["init_lora_weights"] = "pissa"
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    d = lc.detect(tmp_path / "a")
    assert d.adapters[0].ranks == [8]
    assert any("r=16" in w and "rank 8" in w for w in d.warnings)
    assert any("pissa" in w for w in d.warnings)


def test_detect_reads_headers_only(tmp_path, monkeypatch):
    pm = peft_wrap(llama(), r=4, lora_alpha=8, target_modules=["q_proj"])
    save_unmerged(pm, tmp_path / "u")
    from lora_convert.io import sources

    def boom(*a, **k):
        raise AssertionError("detect read tensor data")

    monkeypatch.setattr(sources.SafetensorsSource, "read_into", boom)
    assert lc.detect(tmp_path / "u").form == "unmerged"


def test_cli_human_output_and_errors(tmp_path):
    r = CliRunner().invoke(main, ["detect", "fixtures/tiny-llama-lora"])
    assert r.exit_code == 0 and "form: adapter" in r.stdout
    r = CliRunner().invoke(main, ["detect", str(tmp_path / "nope")])
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and "nope" in r.stderr
    r = CliRunner().invoke(main, ["detect"])
    assert r.exit_code == 2


def saved_module_names(pm) -> list[str]:
    """The modules PEFT wrapped for modules_to_save, named as in the base model."""
    from peft.utils import ModulesToSaveWrapper

    prefix = "base_model.model."
    names = [n.removeprefix(prefix) for n, m in pm.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    assert names, "PEFT wrapped no module: the case tests nothing"
    return sorted(names)
