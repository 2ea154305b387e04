"""combine: the adapter PEFT's add_weighted_adapter makes, bit for bit, for every combination type
(the same seed for dare), written one module at a time; what PEFT gets wrong is refused."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny import gpt2, llama, logits, peft_stack, peft_wrap

import lora_convert as lc
from lora_convert.cli import main

SEED = 1234
SPECS = {  # name: (r, alpha, targets) — different ranks, alphas and targets, embeddings included
    "a": (4, 8, ["q_proj", "v_proj", "embed_tokens", "down_proj"]),
    "b": (4, 16, ["q_proj", "v_proj", "embed_tokens", "o_proj"]),
    "c": (6, 3, ["q_proj", "k_proj", "embed_tokens", "up_proj"]),
}
CASES = [
    ("ab", [0.7, -0.4], "linear", {}),
    ("ac", [0.7, -0.4], "cat", {}),
    ("abc", [0.7, -0.4, 1.3], "cat", {}),
    ("ac", [0.7, -0.4], "svd", {}),
    ("abc", [0.7, -0.4, 1.3], "svd", dict(svd_rank=3)),
    ("ac", [0.7, -0.4], "svd", dict(svd_clamp=0.9)),
    ("ab", [0.7, -0.4], "ties", dict(density=0.5)),
    ("ab", [0.7, -0.4], "ties", dict(density=0.3, majority_sign_method="frequency")),
    ("ab", [0.7, -0.4], "magnitude_prune", dict(density=0.29)),
    ("ab", [0.7, -0.4], "dare_linear", dict(density=0.5)),
    ("ab", [0.7, -0.4], "dare_ties", dict(density=0.6)),
    ("abc", [0.7, -0.4, 1.3], "ties_svd", dict(density=0.5)),
    ("ac", [0.7, -0.4], "dare_linear_svd", dict(density=0.5)),
    ("abc", [0.7, -0.4, 1.3], "dare_ties_svd", dict(density=0.5, svd_rank=5)),
    ("abc", [0.7, -0.4, 1.3], "magnitude_prune_svd", dict(density=0.5)),
    ("a", [0.5], "ties", dict(density=0.5)),  # one adapter: PEFT combines linearly, whatever the method
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    for i, (name, (r, alpha, targets)) in enumerate(SPECS.items()):
        peft_wrap(llama(), seed=10 + i, r=r, lora_alpha=alpha, target_modules=targets).save_pretrained(root / name)
    return root


def _peft_combined(root, names, weights, method, out, factory=llama, **kw):
    """PEFT's own: the sources loaded as usual, torch.manual_seed(SEED), add_weighted_adapter, saved."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(factory(), str(root / names[0]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(root / n), adapter_name=n)
    torch.manual_seed(SEED)
    model.add_weighted_adapter(list(names), weights, "new", combination_type=method, **kw)
    model.save_pretrained(str(out), selected_adapters=["new"])
    return out / "new"


def _ours(root, names, weights, method, out, **kw):
    return lc.combine(
        [str(root / n) for n in names],
        weights=weights,
        method=method,
        output=out,
        seed=SEED,
        density=kw.get("density"),
        rank=kw.get("svd_rank"),
        svd_clamp=kw.get("svd_clamp"),
        majority_sign=kw.get("majority_sign_method", "total"),
    )


def _same_adapter(ref, got):
    a, b = load_file(ref / "adapter_model.safetensors"), load_file(got / "adapter_model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca, cb = (json.loads((p / "adapter_config.json").read_text()) for p in (ref, got))
    assert sorted(ca.pop("target_modules")) == cb.pop("target_modules")
    assert {k: v for k, v in ca.items() if cb.get(k) != v} == {}


@pytest.mark.parametrize("names, weights, method, kw", CASES, ids=[f"{c[2]}-{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bit_exact_with_peft(sources, tmp_path, names, weights, method, kw):
    ref = _peft_combined(sources, list(names), weights, method, tmp_path / "peft", **kw)
    res = _ours(sources, list(names), weights, method, tmp_path / "ours", **kw)
    _same_adapter(ref, tmp_path / "ours")
    targets = {t for n in names for t in SPECS[n][2]}
    assert res.ops == {"combine": sum(1 if t == "embed_tokens" else 2 for t in targets)}  # 2 layers, 1 embedding


def test_loads_in_peft_without_warnings_and_cat_is_the_exact_sum(sources, tmp_path):
    from peft import PeftModel

    lc.combine([f"{sources / 'a'}:0.7", f"{sources / 'c'}:-0.4"], method="cat", output=tmp_path / "cat")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(llama(), str(tmp_path / "cat"))
    assert not [w for w in caught if "key" in str(w.message).lower()], [str(w.message) for w in caught]
    want = logits(peft_stack(llama(), [(sources / "a", 0.7), (sources / "c", -0.4)]))
    assert (logits(model) - want).abs().max().item() < 1e-5


def test_dare_seed_changes_the_masks(sources, tmp_path):
    for seed in (1, 2):
        lc.combine(
            [str(sources / "a"), str(sources / "b")],
            method="dare_linear",
            density=0.5,
            seed=seed,
            output=tmp_path / f"s{seed}",
        )
    a, b = (load_file(tmp_path / f"s{s}" / "adapter_model.safetensors") for s in (1, 2))
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "method, kw", [("svd", {}), ("dare_ties_svd", dict(density=0.5)), ("dare_linear", dict(density=0.5))]
)
def test_gpt2_conv1d_bit_exact(tmp_path, method, kw):
    spec = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    for i, n in enumerate("xy"):
        peft_wrap(gpt2(), seed=20 + i, **spec).save_pretrained(tmp_path / n)
    ref = _peft_combined(tmp_path, ["x", "y"], [0.6, 0.9], method, tmp_path / "peft", factory=gpt2, **kw)
    _ours(tmp_path, ["x", "y"], [0.6, 0.9], method, tmp_path / "ours", **kw)
    _same_adapter(ref, tmp_path / "ours")


def test_rslora_sources_are_written_with_scaling_one(tmp_path):
    for i, n in enumerate("xy"):
        peft_wrap(llama(), seed=30 + i, r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj"]).save_pretrained(
            tmp_path / n
        )
    res = lc.combine([f"{tmp_path / 'x'}:0.5", str(tmp_path / "y")], method="cat", output=tmp_path / "cat")
    assert any("use_rslora false" in w for w in res.warnings)
    assert json.loads((tmp_path / "cat" / "adapter_config.json").read_text())["use_rslora"] is False
    from peft import PeftModel

    got = logits(PeftModel.from_pretrained(llama(), str(tmp_path / "cat")))
    want = logits(peft_stack(llama(), [(tmp_path / "x", 0.5), (tmp_path / "y", 1.0)]))
    assert (got - want).abs().max().item() < 1e-5


REFUSALS = {
    "dora": (dict(use_dora=True), "DoRA adapters cannot be combined"),
    "modules-to-save": (dict(modules_to_save=["norm"]), "modules_to_save"),
    "lora-bias": (dict(lora_bias=True), "lora_bias adapters cannot be combined"),
    "layers": (dict(layers_to_transform=[0]), "differ in layers_to_transform"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_what_peft_gets_wrong_is_refused(tmp_path, case):
    extra, needle = REFUSALS[case]
    peft_wrap(llama(), seed=1, r=4, lora_alpha=8, target_modules=["q_proj"], **extra).save_pretrained(tmp_path / "x")
    peft_wrap(llama(), seed=2, r=4, lora_alpha=8, target_modules=["q_proj"]).save_pretrained(tmp_path / "y")
    r = CliRunner().invoke(
        main, ["combine", str(tmp_path / "x"), str(tmp_path / "y"), "--method", "cat", "-o", str(tmp_path / "out")]
    )
    assert r.exit_code == 1 and r.output.startswith("error:") and needle in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, needle, code",  # code 2: the command line alone is wrong (a usage error)
    [
        (["{a}", "{c}", "--method", "linear"], "linear needs adapters of one rank", 1),
        (["{a}", "{c}", "--method", "ties"], "--method ties needs --density", 2),
        (["{a}", "{c}", "--method", "magic"], "unknown --method 'magic'", 2),
        (["{a}", "{c}", "--method", "cat", "--weights", "0.5"], "1 weights for 2 adapters", 2),
        (["{a}", "{c}", "--method", "cat", "--weights", "0.5,x"], "the weight 'x' is not a number", 2),
        (["{a}:2", "{c}", "--method", "cat", "--weights", "1,1"], "either as REF:WEIGHT or with --weights", 2),
        (["{a}", "{c}", "--method", "svd", "--rank", "40"], "exceeds", 1),
        (["{a}", "{g}", "--method", "cat"], "adapters for different base models", 1),
    ],
)
def test_bad_input_is_one_error_line(sources, tmp_path, args, needle, code):
    peft_wrap(gpt2(), r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True).save_pretrained(tmp_path / "g")
    cfg = json.loads((tmp_path / "g" / "adapter_config.json").read_text())
    (tmp_path / "g" / "adapter_config.json").write_text(json.dumps(dict(cfg, base_model_name_or_path="openai/gpt2")))
    (tmp_path / "a").symlink_to(sources / "a")
    cfg = json.loads((sources / "a" / "adapter_config.json").read_text())
    (tmp_path / "a2").mkdir()
    for f in ("adapter_model.safetensors",):
        (tmp_path / "a2" / f).symlink_to(sources / "a" / f)
    (tmp_path / "a2" / "adapter_config.json").write_text(
        json.dumps(dict(cfg, base_model_name_or_path="meta-llama/Llama-2-7b"))
    )
    fill = {"a": tmp_path / ("a2" if "{g}" in args else "a"), "c": sources / "c", "g": tmp_path / "g"}
    argv = ["combine", *[x.format(**fill) for x in args], "-o", str(tmp_path / "out")]
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == code, r.output
    assert len(r.output.strip().splitlines()) == 1 and r.output.startswith("error:") and needle in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_regex_targets_are_joined_as_peft_joins_them(tmp_path):
    for i, (n, rx) in enumerate([("x", r".*\.(q_proj|v_proj)"), ("y", r".*\.layers\.1\.mlp\.up_proj")]):
        peft_wrap(llama(), seed=40 + i, r=4, lora_alpha=8, target_modules=rx).save_pretrained(tmp_path / n)
    ref = _peft_combined(tmp_path, ["x", "y"], [1.0, 0.5], "svd", tmp_path / "peft")
    _ours(tmp_path, ["x", "y"], [1.0, 0.5], "svd", tmp_path / "ours")
    a, b = load_file(ref / "adapter_model.safetensors"), load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    got = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["target_modules"]
    assert got == json.loads((ref / "adapter_config.json").read_text())["target_modules"]
