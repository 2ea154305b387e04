"""Extraction of a LoRA adapter from TUNED − BASE: tiny real models, real numbers."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from helpers import cli, one_error
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny import decoder_config
from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from lora_convert import extract
from lora_convert import svd as S
from lora_convert.compare import analyse_difference
from lora_convert.io.reader import open_checkpoint

torch.set_num_threads(2)
V, H = 96, 48


def _llama(tie=False):
    torch.manual_seed(0)
    return LlamaForCausalLM(decoder_config(vocab=V, hidden=H, inter=96, tie=tie, max_positions=None))


def _merge(base_dir, out_dir, r, targets, cls=LlamaForCausalLM, seed=1, dtype=None, rank_pattern=None):
    torch.manual_seed(seed)
    m = cls.from_pretrained(base_dir)
    pm = get_peft_model(
        m,
        LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, rank_pattern=rank_pattern or {}
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = pm.merge_and_unload()
    if dtype is not None:
        merged = merged.to(dtype)
    merged.save_pretrained(out_dir)
    return merged


def _qwen2(tie: bool) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(decoder_config("Qwen2Config", vocab=V, inter=64, tie=tie, max_positions=None))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    _llama().save_pretrained(d / "base")
    merged = _merge(d / "base", d / "tuned", 4, ["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"])
    return d, merged


def _load_quiet(base_dir, adapter_dir, cls=LlamaForCausalLM):
    """PeftModel.from_pretrained, returning the model and every warning/log message it produced."""
    msgs = []

    class H_(logging.Handler):
        def emit(self, rec):
            msgs.append(rec.getMessage())

    h = H_()
    logging.getLogger().addHandler(h)
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            p = PeftModel.from_pretrained(cls.from_pretrained(base_dir), adapter_dir)
    finally:
        logging.getLogger().removeHandler(h)
    msgs += [str(x.message) for x in w]
    bad = [m for m in msgs if any(w in m.lower() for w in ("missing", "unexpected", "tie", "fan_in_fan_out"))]
    return p.eval(), bad


def _logits(model):
    x = torch.arange(20).reshape(2, 10) % V
    with torch.no_grad():
        return model(x).logits


def test_recovers_merged_lora_exactly(pair, tmp_path):
    d, merged = pair
    res = extract(d / "tuned", base=d / "base", output=tmp_path / "a", rank=4)
    kinds = {m.module: m.kind for m in res.report.modules}
    assert len(res.report.modules) == 2 * 3 + 2 and kinds["model.embed_tokens"] == "embedding"
    assert kinds["lm_head"] == "lm_head"
    assert all(m.rank == 4 for m in res.report.modules)
    assert res.report.worst_error <= 1e-4, res.report.worst_error
    # independent check of ΔW from the written tensors
    sd = load_file(tmp_path / "a" / "adapter_model.safetensors")
    t, b = open_checkpoint(d / "tuned"), open_checkpoint(d / "base")
    pre = "base_model.model."
    for mod in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"):
        dw = t.read(mod + ".weight") - b.read(mod + ".weight")
        approx = sd[f"{pre}{mod}.lora_B.weight"] @ sd[f"{pre}{mod}.lora_A.weight"]
        assert ((dw - approx).norm() / dw.norm()) <= 1e-4
    dw = t.read("model.embed_tokens.weight") - b.read("model.embed_tokens.weight")
    approx = (sd[f"{pre}model.embed_tokens.lora_embedding_B"] @ sd[f"{pre}model.embed_tokens.lora_embedding_A"]).T
    assert ((dw - approx).norm() / dw.norm()) <= 1e-4
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 4 and cfg["rank_pattern"] == {}
    p, bad = _load_quiet(d / "base", tmp_path / "a")
    assert not bad, bad
    assert (_logits(p) - _logits(merged)).abs().max() <= 1e-4
    card = (tmp_path / "a" / "README.md").read_text()
    assert "| `lm_head` |" in card and "worst" in card


def test_randomized_near_eckart_young():
    torch.manual_seed(0)
    dw = torch.randn(1500, 700) @ torch.diag(torch.linspace(1, 0.2, 700)) @ torch.randn(700, 700) / 30
    r = 16
    f = S.factorise(dw, r, svd="randomized", seed=0)
    assert f.method == "randomized"
    B, A = f.factors(r)
    err = ((dw - B @ A).norm() / dw.norm()).item()
    s = torch.linalg.svdvals(dw.double())
    optimal = (s[r:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt()).item()
    assert err <= optimal * 1.01, (err, optimal)
    assert abs(f.relative_error(r) - err) <= 1e-3 * err  # the honest residual estimate matches the measured one
    ex = S.factorise(dw, r, svd="exact")
    assert abs(ex.relative_error(r) - optimal) <= 1e-4


def test_energy_and_max_error_pick_promised_ranks(tmp_path):
    d = tmp_path
    _llama().save_pretrained(d / "base")
    _merge(d / "base", d / "tuned", 8, ["q_proj", "o_proj"], rank_pattern={"o_proj": 2})
    for kw in ({"energy": 0.9}, {"max_error": 0.2}):
        res = extract(d / "tuned", base=d / "base", output=d / f"o{len(kw)}{list(kw)[0]}", **kw)
        t, b = open_checkpoint(d / "tuned"), open_checkpoint(d / "base")
        ranks = {}
        for m in res.report.modules:
            dw = t.read(m.module + ".weight") - b.read(m.module + ".weight")
            s2 = torch.linalg.svdvals(dw.double()).pow(2)
            frac = s2.cumsum(0) / s2.sum()
            err = (1 - frac).clamp_min(0).sqrt()
            ok = frac >= 0.9 if "energy" in kw else err <= 0.2
            assert m.rank == int(torch.nonzero(ok)[0]) + 1, (m.module, m.rank)
            if "energy" in kw:
                assert m.energy >= 0.9
            else:
                assert m.error <= 0.2 + 1e-6
            ranks[m.module] = m.rank
        assert len(set(ranks.values())) > 1, ranks
        out = d / f"o{len(kw)}{list(kw)[0]}"
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["rank_pattern"] and cfg["rank_pattern"] == cfg["alpha_pattern"]
        p, bad = _load_quiet(d / "base", out)
        assert not bad, bad
        for mod, r in ranks.items():
            layer = p.base_model.model.get_submodule(mod)
            assert layer.r["default"] == r and layer.scaling["default"] == 1.0
        # the adapter reproduces exactly the truncated ΔW the report promised
        q = p.base_model.model.get_submodule("model.layers.0.self_attn.q_proj")
        sd = load_file(out / "adapter_model.safetensors")
        assert torch.equal(
            q.lora_A["default"].weight, sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
        )


def test_filters_embeddings_and_1d(pair, tmp_path):
    d, merged = pair
    res = extract(
        d / "tuned", base=d / "base", output=tmp_path / "f", rank=4, layers="0", exclude=["v_proj"], embeddings="skip"
    )
    assert sorted(m.module for m in res.report.modules) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.self_attn.q_proj",
    ]
    reasons = {s["tensor"]: s["reason"] for s in res.report.skipped}
    assert reasons["model.layers.1.self_attn.q_proj.weight"] == "outside --layers"
    assert reasons["model.layers.0.self_attn.v_proj.weight"] == "matched by --exclude"
    assert (
        reasons["model.embed_tokens.weight"] == "--embeddings skip" and reasons["lm_head.weight"] == "--embeddings skip"
    )
    _, bad = _load_quiet(d / "base", tmp_path / "f")
    assert not bad
    res = extract(d / "tuned", base=d / "base", output=tmp_path / "inc", rank=4, include=[r"mlp"], embeddings="full")
    assert [m.module for m in res.report.modules] == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    assert sorted(s["module"] for s in res.report.saved_whole) == ["lm_head", "model.embed_tokens"]
    cfg = json.loads((tmp_path / "inc" / "adapter_config.json").read_text())
    assert sorted(cfg["modules_to_save"]) == ["lm_head", "model.embed_tokens"]
    p, bad = _load_quiet(d / "base", tmp_path / "inc")
    assert not bad, bad
    assert torch.equal(p.base_model.model.lm_head.modules_to_save["default"].weight, merged.lm_head.weight)


def test_changed_norm_reported_and_saved_on_request(pair, tmp_path):
    d, merged = pair
    m = LlamaForCausalLM.from_pretrained(d / "tuned")
    with torch.no_grad():
        m.model.norm.weight.add_(0.25)
    m.save_pretrained(tmp_path / "t2")
    res = extract(tmp_path / "t2", base=d / "base", output=tmp_path / "x", rank=4)
    reasons = {s["tensor"]: s["reason"] for s in res.report.skipped}
    assert "model.norm.weight" in reasons and "--save-other" in reasons["model.norm.weight"]
    assert any("left out" in w for w in res.warnings)
    res = extract(tmp_path / "t2", base=d / "base", output=tmp_path / "y", rank=4, save_other=True)
    assert "model.norm" in [s["module"] for s in res.report.saved_whole] and not res.report.skipped
    p, bad = _load_quiet(d / "base", tmp_path / "y")
    assert not bad, bad
    assert (_logits(p) - _logits(m)).abs().max() <= 1e-4


def test_tied_embeddings_qwen2(tmp_path):
    _qwen2(tie=True).save_pretrained(tmp_path / "base")
    merged = _merge(tmp_path / "base", tmp_path / "tuned", 4, ["q_proj", "embed_tokens"], cls=Qwen2ForCausalLM)
    assert "lm_head.weight" not in open_checkpoint(tmp_path / "tuned").tensors
    res = extract(tmp_path / "tuned", base=tmp_path / "base", output=tmp_path / "a", rank=4)
    assert res.report.worst_error <= 1e-4
    p, bad = _load_quiet(tmp_path / "base", tmp_path / "a", cls=Qwen2ForCausalLM)
    assert not bad, bad
    ref = _logits(merged)  # logits here are ~150 in size: compare relative to that (fp32 summation order)
    assert (_logits(p) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_gpt2_conv1d_and_position_embedding(tmp_path):
    """GPT-2 stores Conv1D weights (in, out), so ΔW is (B·A)ᵀ there; its square attn.c_proj would load
    without complaint in the wrong orientation.  wpe is an nn.Embedding: lora_embedding_A/B."""
    from tiny import gpt2
    from transformers import GPT2LMHeadModel

    gpt2().save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    pm = get_peft_model(
        GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["c_attn", "c_proj", "c_fc", "wpe"],
            fan_in_fan_out=True,
            init_lora_weights=False,
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = pm.merge_and_unload()
    merged.save_pretrained(tmp_path / "tuned")
    res = extract(tmp_path / "tuned", base=tmp_path / "base", output=tmp_path / "a", rank=4)
    kinds = {m.module: (m.kind, tuple(m.shape)) for m in res.report.modules}
    assert kinds["transformer.h.0.attn.c_attn"] == ("linear", (96, 32))  # (out, in), as PEFT's B·A
    assert kinds["transformer.wpe"][0] == "embedding"
    assert res.report.worst_error <= 1e-4, res.report.worst_error
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    p, bad = _load_quiet(tmp_path / "base", tmp_path / "a", cls=GPT2LMHeadModel)
    assert not bad, bad
    x = torch.arange(20).reshape(2, 10)
    with torch.no_grad():
        assert (p(x).logits - merged(x).logits).abs().max() <= 1e-4


def test_non_finite_difference_is_an_error(pair, tmp_path):
    from safetensors.torch import save_file

    from lora_convert.errors import CheckpointError

    d, _ = pair
    sd = load_file(d / "tuned" / "model.safetensors")
    sd["model.layers.1.self_attn.v_proj.weight"][3, 5] = float("inf")
    (tmp_path / "bad").mkdir()
    save_file(sd, tmp_path / "bad" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "bad" / "config.json").write_text((d / "tuned" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="v_proj.weight.*NaN or Inf") as got:
        extract(tmp_path / "bad", base=d / "base", output=tmp_path / "a", rank=4)
    assert got.value.path == str(tmp_path / "bad")  # the file that holds it, not the base
    assert not (tmp_path / "a").exists()
    # finite in both files, but their difference overflows fp32: an error, not an Inf fed to the SVD
    sd = load_file(d / "tuned" / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"][0, 0] = 3e38
    base_sd = load_file(d / "base" / "model.safetensors")
    base_sd["model.layers.0.mlp.up_proj.weight"][0, 0] = -3e38
    for name, tensors in (("big", sd), ("bigbase", base_sd)):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
        (tmp_path / name / "config.json").write_text((d / "tuned" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="up_proj.weight.*overflows fp32"):
        extract(tmp_path / "big", base=tmp_path / "bigbase", output=tmp_path / "b", rank=4)
    assert not (tmp_path / "b").exists()


def test_bf16_floor(tmp_path, capsys):
    torch.manual_seed(0)
    _llama().to(torch.bfloat16).save_pretrained(tmp_path / "base")
    _merge(tmp_path / "base", tmp_path / "tuned", 4, ["q_proj", "v_proj"], dtype=torch.bfloat16)
    res = extract(tmp_path / "tuned", base=tmp_path / "base", output=tmp_path / "a", rank=4)
    t, b = open_checkpoint(tmp_path / "tuned"), open_checkpoint(tmp_path / "base")
    assert t.info("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16
    dw = (
        t.read("model.layers.0.self_attn.q_proj.weight").float()
        - b.read("model.layers.0.self_attn.q_proj.weight").float()
    )
    s = torch.linalg.svdvals(dw.double())
    floor = (s[4:].pow(2).sum() / s.pow(2).sum()).sqrt().item()  # what bf16 rounding leaves beyond rank 4
    m = next(x for x in res.report.modules if x.module == "model.layers.0.self_attn.q_proj")
    assert abs(m.error - floor) <= 1e-4 and 1e-4 < floor < 0.2
    print(
        f"\nbf16 floor: worst {res.report.worst_error:.4f}, mean {res.report.mean_error:.4f} relative Frobenius error at rank 4"
    )


def test_analyse_difference(pair):
    d, _ = pair
    with open_checkpoint(d / "tuned") as t, open_checkpoint(d / "base") as b:
        res = analyse_difference(t, b)
    assert len(res["changed"]) == 8
    assert "q_proj, v_proj" in res["summary"] and "in all 2 layers" in res["summary"]
    assert "r=4" in res["summary"]


def test_cli_convert_to_adapter_takes_the_extraction_options(pair, tmp_path):
    from click.testing import CliRunner

    from lora_convert.cli import main

    d, merged = pair
    r = CliRunner().invoke(
        main,
        [
            "convert",
            str(d / "tuned"),
            "--to",
            "adapter",
            "--base",
            str(d / "base"),
            "-o",
            str(tmp_path / "a"),
            "--rank",
            "2",
            "--exclude",
            "embed|lm_head",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert {m["rank"] for m in out["modules"]} == {2}
    assert not any("embed" in m["module"] or "lm_head" in m["module"] for m in out["modules"])
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 2
    # the same options on a route that is not extraction: refused, nothing written
    r = CliRunner().invoke(
        main,
        [
            "convert",
            str(tmp_path / "a"),
            "--to",
            "merged",
            "--base",
            str(d / "base"),
            "-o",
            str(tmp_path / "m"),
            "--rank",
            "2",
        ],
    )
    assert r.exit_code == 1 and "--rank" in r.output and "extraction options" in r.output
    assert not (tmp_path / "m").exists()


def test_changed_bias_of_a_lora_module_is_carried(tmp_path):
    """Qwen2's q/k/v have biases; a fine-tune that changes them must not lose them: PEFT's bias='lora_only'
    saves <module>.base_layer.bias, and the adapter then reproduces the tuned model."""
    _qwen2(tie=False).save_pretrained(tmp_path / "base")
    merged = _merge(tmp_path / "base", tmp_path / "tuned0", 4, ["q_proj", "v_proj"], cls=Qwen2ForCausalLM)
    with torch.no_grad():
        merged.model.layers[1].self_attn.q_proj.bias.add_(0.5)
    merged.save_pretrained(tmp_path / "tuned")
    res = extract(tmp_path / "tuned", base=tmp_path / "base", output=tmp_path / "a", rank=4)
    assert res.report.carried_biases == [
        f"model.layers.{i}.self_attn.{p}.bias" for i in (0, 1) for p in ("q_proj", "v_proj")
    ]
    assert not res.report.skipped
    cfg_out = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg_out["bias"] == "lora_only"
    p, bad = _load_quiet(tmp_path / "base", tmp_path / "a", cls=Qwen2ForCausalLM)
    assert not bad, bad
    assert (_logits(p) - _logits(merged)).abs().max() <= 1e-4
    # and our own merge of that adapter gives the tuned model back
    import lora_convert as lc

    lc.merge(tmp_path / "a", base=tmp_path / "base", output=tmp_path / "m")
    again = Qwen2ForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert (_logits(again) - _logits(merged)).abs().max() <= 1e-4
    # without the bias the adapter would be visibly off: the test can fail
    with torch.no_grad():
        p.base_model.model.model.layers[1].self_attn.q_proj.base_layer.bias.sub_(0.5)
    assert (_logits(p) - _logits(merged)).abs().max() > 1e-3


def test_factor_dtype_bf16_is_measured_as_written(pair, tmp_path):
    from click.testing import CliRunner

    from lora_convert.cli import main

    d, merged = pair
    r = CliRunner().invoke(
        main,
        [
            "extract",
            str(d / "tuned"),
            "--base",
            str(d / "base"),
            "-o",
            str(tmp_path / "a"),
            "--rank",
            "4",
            "--factor-dtype",
            "bf16",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    sd = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    # the error reported is that of the bf16 factors: above fp32's ~1e-7, and equal to a recomputation
    t, b = open_checkpoint(d / "tuned"), open_checkpoint(d / "base")
    mod = "model.layers.0.self_attn.q_proj"
    dw = (t.read(mod + ".weight") - b.read(mod + ".weight")).double()
    approx = sd[f"base_model.model.{mod}.lora_B.weight"].double() @ sd[f"base_model.model.{mod}.lora_A.weight"].double()
    want = ((dw - approx).norm() / dw.norm()).item()
    got = next(m["error"] for m in out["modules"] if m["module"] == mod)
    assert 1e-4 < got < 2e-2 and abs(got - want) <= 1e-3 * want
    p, bad = _load_quiet(d / "base", tmp_path / "a")
    assert not bad, bad


def test_difference_is_allocated_only_when_a_block_differs(tmp_path, monkeypatch):
    """A tensor the fine-tune left alone must not cost a whole fp32 ΔW (Llama-3-8B's embedding: 2.1 GB);
    one that changes only past its first blocks gives the exact ΔW, zeros before the change."""
    from safetensors.torch import save_file

    import lora_convert.difference as D

    monkeypatch.setattr(D, "DELTA_BLOCK", 4 * 8 * 3)  # 3 rows of 8 per block: 4 blocks for 10 rows
    g = torch.Generator().manual_seed(0)
    w = torch.randn(10, 8, generator=g)
    late = w.clone()
    late[9] += torch.randn(8, generator=g)
    (tmp_path / "b").mkdir(), (tmp_path / "t").mkdir()
    save_file({"same": w, "late": w.clone(), "nan": w.clone()}, tmp_path / "b" / "model.safetensors")
    nan = w.clone()
    nan[7, 3] = float("nan")
    save_file({"same": w.clone(), "late": late, "nan": nan}, tmp_path / "t" / "model.safetensors")
    bk, tk = open_checkpoint(tmp_path / "b"), open_checkpoint(tmp_path / "t")
    calls = []

    def run(name):
        d = D.Difference(
            tk.rows_of(name), bk.rows_of(name), keep=True, out=lambda: calls.append(name) or torch.full((10, 8), 7.0)
        )
        for s, e in D.row_blocks(tuple(tk.info(name).shape)):
            d.add(s, tk.read_rows(name, s, e), bk.read_rows(name, s, e))
        return d, d.result()

    d, res = run("same")
    assert res is None and d.total == 0.0 and calls == []
    d, res = run("late")
    assert calls == ["late"] and torch.equal(res, late - w) and d.total == pytest.approx(float(((late - w) ** 2).sum()))
    with pytest.raises(Exception, match="NaN or Inf"):
        run("nan")


@pytest.mark.parametrize(
    ("fixture", "what", "hint"),
    [
        ("tiny-llama-lora", "this is an adapter", "convert --to merged --base BASE"),
        ("tiny-llama-unmerged", "this is an unmerged checkpoint", "convert --to adapter"),
    ],
)
def test_extract_from_a_lora_checkpoint_says_what_extraction_takes(tmp_path, fixture, what, hint):
    """`extract ADAPTER --base BASE` used to blame an --extract-options flag the CLI does not have."""
    fixtures = Path(__file__).resolve().parent.parent / "fixtures"
    out = tmp_path / "x"
    res = cli("extract", str(fixtures / fixture), "--base", str(fixtures / "tiny-llama-base"), "-o", str(out))
    line = one_error(res, fixture, "extraction takes a full model", what, hint, out=out)
    assert "--extract-options" not in line
