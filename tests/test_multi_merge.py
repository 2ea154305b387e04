"""Several adapters in one merge (``merge BASE --adapter A:w --adapter B:w``) and unmerge
(``convert MERGED --to base --adapter A``).

The reference is PEFT with the same adapters loaded and active together (``set_scale`` for the
weights): the merged model's logits must equal that model's (fp32, max |Δ| ≤ 1e-5).
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny import gpt2, llama, load_merged, logits, peft_stack, peft_wrap, qwen2

import lora_convert as lc
from lora_convert.cli import main

TOL = 1e-5
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]

# (model factory, model kwargs, [(lora kwargs, weight), ...])
CASES = {
    "llama-overlap-embed-head": (
        llama,
        {},
        [
            (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens", "down_proj"]), 0.7),
            (dict(r=6, lora_alpha=5, target_modules=["q_proj", "k_proj", "up_proj", "lm_head"]), -0.4),
        ],
    ),
    "llama-three-rslora-patterns": (
        llama,
        {},
        [
            (dict(r=4, lora_alpha=8, target_modules=ATTN), 1.0),
            (dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "o_proj"]), 0.5),
            (dict(r=4, lora_alpha=8, target_modules=["v_proj"], rank_pattern={"v_proj": 2}), 2.0),
        ],
    ),
    "qwen2-tied-embedding": (
        qwen2,
        {},
        [
            (dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]), 0.8),
            (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), 1.3),
        ],
    ),
    "gpt2-conv1d": (
        gpt2,
        {},
        [
            (dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True), 0.6),
            (dict(r=2, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True), -1.0),
        ],
    ),
    "qwen2-lora-bias": (
        qwen2,
        {"tie": False},
        [
            (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True), 0.5),
            (dict(r=4, lora_alpha=8, target_modules=["q_proj"]), 1.0),
        ],
    ),
    "llama-dora-disjoint-and-saved-module": (
        llama,
        {},
        [
            (dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "gate_proj"]), 0.7),
            (dict(r=4, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["norm"]), 1.2),
        ],
    ),
}


def _adapters(tmp_path, factory, model_kw, specs):
    """Save the base and each adapter (trained from its own seed); returns [(folder, weight)]."""
    factory(**model_kw).save_pretrained(tmp_path / "base")
    out = []
    for i, (lora_kw, weight) in enumerate(specs):
        folder = tmp_path / f"adapter{i}"
        peft_wrap(factory(**model_kw), seed=10 + i, **lora_kw).save_pretrained(folder)
        out.append((folder, weight))
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_several_adapters_match_peft_active_together(tmp_path, case):
    factory, model_kw, specs = CASES[case]
    adapters = _adapters(tmp_path, factory, model_kw, specs)
    want = logits(peft_stack(factory(**model_kw), adapters))
    res = lc.merge(tmp_path / "base", adapters=[f"{p}:{w}" for p, w in adapters], output=tmp_path / "merged")
    got = logits(load_merged(tmp_path / "merged"))
    assert (got - want).abs().max().item() <= TOL
    one = logits(peft_stack(factory(**model_kw), adapters[:1]))
    assert (got - one).abs().max().item() > 100 * TOL  # the other adapters did change the model
    assert res.ops.get("merge", 0) + res.ops.get("dora", 0) > 0


def test_one_fp32_pass_rounded_once(tmp_path):
    """bf16: every merged element is round(W + Σ wᵢ·ΔWᵢ) from fp32, not one rounding per adapter."""
    base = llama(dtype=torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    adapters = []
    for i, w in enumerate((0.7, -0.4)):
        peft_wrap(
            llama(dtype=torch.bfloat16), seed=10 + i, r=4, lora_alpha=8, target_modules=["q_proj"]
        ).save_pretrained(tmp_path / f"a{i}")
        adapters.append((tmp_path / f"a{i}", w))
    lc.merge(tmp_path / "base", adapters=[(str(p), w) for p, w in adapters], output=tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    w0 = load_file(tmp_path / "base" / "model.safetensors")[key].float()
    total = torch.zeros_like(w0)
    for p, w in adapters:
        sd = load_file(p / "adapter_model.safetensors")
        a = sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].float()
        b = sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].float()
        total += w * 2.0 * (b @ a)
    once = (w0 + total).to(torch.bfloat16)
    twice = (w0 + 0.7 * 2.0 * _ba(adapters[0][0])).to(torch.bfloat16).float() - 0.4 * 2.0 * _ba(adapters[1][0])
    assert (merged[key] != once).sum().item() <= 2  # fp32 summation order: at most a stray ulp or two
    assert (merged[key] != twice.to(torch.bfloat16)).sum().item() > 10  # per-adapter rounding differs


def _ba(folder):
    sd = load_file(folder / "adapter_model.safetensors")
    a = sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].float()
    return sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].float() @ a


def test_one_adapter_by_path_is_the_plain_merge_byte_for_byte(tmp_path):
    adapters = _adapters(tmp_path, llama, {}, [(dict(r=4, lora_alpha=8, target_modules=ATTN + ["embed_tokens"]), 1.0)])
    lc.merge(adapters[0][0], base=tmp_path / "base", output=tmp_path / "m1")
    lc.merge(tmp_path / "base", adapter=str(adapters[0][0]), output=tmp_path / "m2")
    a = (tmp_path / "m1" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "m2" / "model.safetensors").read_bytes()


def test_adapter_source_comes_first_with_weight_one(tmp_path):
    """merge A --base BASE --adapter B:0.5 is merge BASE --adapter A --adapter B:0.5."""
    adapters = _adapters(
        tmp_path,
        llama,
        {},
        [
            (dict(r=4, lora_alpha=8, target_modules=["q_proj"]), 1.0),
            (dict(r=4, lora_alpha=8, target_modules=["q_proj"]), 0.5),
        ],
    )
    (a, _), (b, _) = adapters
    lc.merge(a, base=tmp_path / "base", adapter=f"{b}:0.5", output=tmp_path / "m1")
    lc.merge(tmp_path / "base", adapters=[str(a), f"{b}:0.5"], output=tmp_path / "m2")
    assert (tmp_path / "m1" / "model.safetensors").read_bytes() == (tmp_path / "m2" / "model.safetensors").read_bytes()


def test_adapters_named_inside_an_unmerged_checkpoint(tmp_path):
    from peft import LoraConfig, get_peft_model
    from tiny import save_unmerged

    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    pm = get_peft_model(llama(), LoraConfig(**cfg), adapter_name="first")
    pm.add_adapter("second", LoraConfig(**cfg))
    pm.base_model.set_adapter(["first", "second"])
    from peft.tuners.lora import LoraLayer

    for mod in pm.modules():
        if isinstance(mod, LoraLayer):
            mod.set_scale("first", 0.7)
            mod.set_scale("second", -0.4)
    want = logits(pm.eval())
    save_unmerged(pm, tmp_path / "unmerged")
    for name in ("first", "second"):  # each adapter's own config, where PEFT's save_pretrained puts it
        pm.peft_config[name].save_pretrained(str(tmp_path / "unmerged" / name))
    lc.merge(tmp_path / "unmerged", adapters=["first:0.7", "second:-0.4"], output=tmp_path / "merged")
    assert (logits(load_merged(tmp_path / "merged")) - want).abs().max().item() <= TOL


def test_dora_with_another_adapter_on_the_same_module_is_refused(tmp_path):
    adapters = _adapters(
        tmp_path,
        llama,
        {},
        [
            (dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"]), 1.0),
            (dict(r=4, lora_alpha=8, target_modules=["q_proj"]), 1.0),
        ],
    )
    with pytest.raises(lc.UnsupportedError, match="one is DoRA"):
        lc.merge(tmp_path / "base", adapters=[str(p) for p, _ in adapters], output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_two_adapters_saving_the_same_module_are_refused(tmp_path):
    spec = dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["norm"])
    adapters = _adapters(tmp_path, llama, {}, [(spec, 1.0), (spec, 1.0)])
    with pytest.raises(lc.UnsupportedError, match=r"two adapters replace model\..*norm\.weight \(modules_to_save\)"):
        lc.merge(tmp_path / "base", adapters=[str(p) for p, _ in adapters], output=tmp_path / "out")


@pytest.mark.parametrize(
    "args, needle, code",  # code 2: the command line alone is wrong (a usage error)
    [
        (["--adapter", "{a}:heavy"], "the weight 'heavy' is not a number", 2),
        (["--adapter", "{a}:nan"], "must be a finite number", 2),
        (["--adapter", ":0.5"], "nothing before the weight", 2),
        (["--adapter", "no-such-adapter"], "neither a path nor an adapter of the source", 1),
        (["--adapter", "{a}", "--adapter", "{other}"], "adapters for different base models", 1),
    ],
)
def test_bad_stacks_fail_with_one_error_line_and_write_nothing(tmp_path, args, needle, code):
    adapters = _adapters(tmp_path, llama, {}, [(dict(r=4, lora_alpha=8, target_modules=["q_proj"]), 1.0)])
    a = adapters[0][0]
    other = tmp_path / "other"
    peft_wrap(llama(), seed=5, r=4, lora_alpha=8, target_modules=["q_proj"]).save_pretrained(other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "mistralai/Mistral-7B-v0.1"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    argv = ["merge", str(tmp_path / "base"), "-o", str(tmp_path / "out")] + [x.format(a=a, other=other) for x in args]
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.output
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_base_fails_on_shapes(tmp_path):
    adapters = _adapters(tmp_path, llama, {}, [(dict(r=4, lora_alpha=8, target_modules=["q_proj"]), 1.0)])
    peft_wrap(gpt2(), r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True).save_pretrained(tmp_path / "q")
    with pytest.raises(lc.AdapterError, match="match no tensor of the base"):
        lc.merge(tmp_path / "base", adapters=[str(adapters[0][0]), str(tmp_path / "q")], output=tmp_path / "out")


# -- unmerge -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_unmerge_gives_back_the_base_within_the_reported_bound(tmp_path, dtype):
    base = llama(dtype=dtype)
    base.save_pretrained(tmp_path / "base")
    specs = [
        (dict(r=4, lora_alpha=8, target_modules=ATTN + ["embed_tokens", "lm_head"]), 0.7),
        (dict(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"]), -0.4),
    ]
    adapters = []
    for i, (kw, w) in enumerate(specs):
        peft_wrap(llama(dtype=dtype), seed=10 + i, **kw).save_pretrained(tmp_path / f"a{i}")
        adapters.append(f"{tmp_path / f'a{i}'}:{w}")
    lc.merge(tmp_path / "base", adapters=adapters, output=tmp_path / "merged")
    res = lc.convert(tmp_path / "merged", "base", adapters=adapters, output=tmp_path / "unmerged")
    want = load_file(tmp_path / "base" / "model.safetensors")
    got = load_file(tmp_path / "unmerged" / "model.safetensors")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    bounds = res.report.bounds()
    assert set(got) == set(want) and res.ops == {"unmerge": 10, "copy": 11}
    for k in ("model.embed_tokens.weight", "lm_head.weight"):  # PEFT saved these whole: restored exactly
        assert k not in bounds and torch.equal(got[k], want[k])
    for k, bound in bounds.items():
        err = (got[k].double() - want[k].double()).abs().max().item()
        assert err <= bound, (k, err, bound)
        assert not torch.equal(merged[k], want[k])  # there was something to take out
    exact = sum(int((got[k] == want[k]).sum()) for k in bounds) / sum(want[k].numel() for k in bounds)
    assert exact > 0.3  # the bound is a bound: many elements come back exactly
    assert res.to_dict()["worst_bound"] == max(bounds.values())


def test_unmerge_of_a_peft_merge_keeps_a_tied_head_tied(tmp_path):
    """PEFT's merge of a tied model writes the embedding's ΔW into the shared tensor; the unmerge takes it
    out of both, and the result stays tied."""
    base = qwen2()
    base.save_pretrained(tmp_path / "base")
    pm = peft_wrap(qwen2(), r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    pm.save_pretrained(tmp_path / "a")
    pm.merge_and_unload().save_pretrained(tmp_path / "peft-merged")
    res = lc.convert(tmp_path / "peft-merged", "base", adapter=str(tmp_path / "a"), output=tmp_path / "un")
    assert "tie_word_embeddings" not in res.config_changes
    got, want = load_merged(tmp_path / "un"), load_merged(tmp_path / "base")
    assert got.config.tie_word_embeddings and "lm_head.weight" not in load_file(tmp_path / "un" / "model.safetensors")
    assert (logits(got) - logits(want)).abs().max().item() <= TOL


@pytest.mark.parametrize(
    "lora_kw, needle",
    [
        (dict(use_dora=True, target_modules=["q_proj"]), "DoRA .* cannot be unmerged"),
        (dict(target_modules=["q_proj"], modules_to_save=["norm"]), r"replaces model\..*norm\.weight"),
        (dict(target_modules=["q_proj"], trainable_token_indices=[3, 5]), "trainable tokens"),
    ],
)
def test_unmerge_refuses_what_the_merged_model_cannot_give_back(tmp_path, lora_kw, needle):
    llama().save_pretrained(tmp_path / "base")
    peft_wrap(llama(), r=4, lora_alpha=8, **lora_kw).save_pretrained(tmp_path / "a")
    lc.merge(tmp_path / "a", base=tmp_path / "base", output=tmp_path / "merged")
    with pytest.raises(lc.UnsupportedError, match=needle):
        lc.convert(tmp_path / "merged", "base", adapter=str(tmp_path / "a"), output=tmp_path / "un")
    assert not (tmp_path / "un").exists()


def test_unmerge_cli_reports_the_bound_and_needs_an_adapter(tmp_path):
    llama().save_pretrained(tmp_path / "base")
    peft_wrap(llama(), r=4, lora_alpha=8, target_modules=["q_proj"]).save_pretrained(tmp_path / "a")
    lc.merge(tmp_path / "a", base=tmp_path / "base", output=tmp_path / "merged")
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "merged"), "--to", "base", "-o", str(tmp_path / "x")])
    assert r.exit_code == 1 and "pass --adapter ADAPTER" in r.output
    r = CliRunner().invoke(
        main,
        [
            "convert",
            str(tmp_path / "merged"),
            "--to",
            "base",
            "--adapter",
            str(tmp_path / "a"),
            "-o",
            str(tmp_path / "un"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "2 tensors unmerged" in r.output and "within" in r.output
    r = CliRunner().invoke(
        main,
        ["convert", str(tmp_path / "a"), "--to", "base", "--adapter", str(tmp_path / "a"), "-o", str(tmp_path / "y")],
    )
    assert r.exit_code == 1 and "unmerging subtracts adapters from a merged model" in r.output
