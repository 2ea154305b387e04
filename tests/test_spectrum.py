"""``spectrum TUNED --base BASE``: its singular values equal an independent ``torch.linalg.svdvals`` of each ΔW, its
chosen rank is the one ``extract`` picks, its chart parses as SVG, its ``--json`` keys are documented."""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from helpers import cli, one_error
from safetensors.torch import load_file
from tiny import llama, peft_wrap

import lora_convert as lc
from lora_convert import api

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj", "embed_tokens"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama and the same model with a rank-4 PEFT LoRA merged in (attention, MLP, embeddings)."""
    root = tmp_path_factory.mktemp("spectrum")
    base, tuned = root / "base", root / "tuned"
    llama().save_pretrained(base)
    pm = peft_wrap(llama(), r=4, lora_alpha=8, target_modules=TARGETS)
    pm.merge_and_unload().save_pretrained(tuned)
    return tuned, base


def _deltas(tuned: Path, base: Path) -> dict[str, torch.Tensor]:
    t, b = load_file(tuned / "model.safetensors"), load_file(base / "model.safetensors")
    return {k[: -len(".weight")]: t[k] - b[k] for k in t if t[k].ndim == 2 and k in b}  # fp32, as stored


def test_singular_values_and_errors_equal_svdvals(pair):
    tuned, base = pair
    res = api.spectrum(tuned, base=base, energy=0.95)
    deltas = {m: d for m, d in _deltas(tuned, base).items() if bool(d.abs().max() > 0)}
    assert {m.module for m in res.modules} == set(deltas)  # every changed module, no other
    assert {g.group for g in res.groups} == {"attention", "mlp", "embeddings"}
    for m in res.modules:
        d = deltas[m.module]
        s = torch.linalg.svdvals(d).double()
        assert m.method == "exact" and len(m.singular_values) == min(d.shape)
        got = torch.tensor(m.singular_values, dtype=torch.float64)
        torch.testing.assert_close(got, s, rtol=1e-6, atol=1e-6 * float(s[0]))
        total = float(s.pow(2).sum())
        for k in (1, 2, 4, len(m.error)):
            tail = float(s[k:].pow(2).sum())
            assert m.error[k - 1] == pytest.approx(math.sqrt(tail / total), rel=1e-4, abs=1e-6)
            assert m.energy[k - 1] == pytest.approx(1 - tail / total, rel=1e-5, abs=1e-6)
        assert m.error[3] < 1e-5  # the merged LoRA has rank 4
        r = int(torch.nonzero(torch.cumsum(s.pow(2), 0) >= 0.95 * total)[0]) + 1
        assert m.rank == r
        assert m.parameters == r * sum(d.shape)
    assert res.adapter_parameters == sum(m.parameters for m in res.modules)
    assert res.adapter_bytes == 4 * res.adapter_parameters
    for g in res.groups:  # a group's curve: its modules' residuals over their energies, summed
        members = [deltas[m.module] for m in res.modules if m.group == g.group]
        total = sum(float(d.double().pow(2).sum()) for d in members)
        tail = sum(float(torch.linalg.svdvals(d).double()[2:].pow(2).sum()) for d in members)
        assert g.error[1] == pytest.approx(math.sqrt(tail / total), rel=1e-4)


@pytest.mark.parametrize("criterion", [{"energy": 0.9}, {"max_error": 0.3}, {"rank": 3}])
def test_chosen_rank_is_what_extract_picks(pair, tmp_path, criterion):
    tuned, base = pair
    res = api.spectrum(tuned, base=base, **criterion)
    got = lc.extract(tuned, base=base, output=tmp_path / "x", **criterion).report
    assert {m.module: m.rank for m in res.modules} == {m.module: m.rank for m in got.modules}
    assert res.adapter_parameters == sum(m.rank * sum(m.shape) for m in got.modules)


def test_cli_json_and_svg_plot(pair, tmp_path):
    tuned, base = pair
    svg = tmp_path / "chart.svg"
    r = cli("spectrum", tuned, "--base", base, "--energy", "0.9", "--plot", svg, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["schema"] == "spectrum/1" and doc["plot"] == str(svg)
    text = (Path(__file__).resolve().parents[1] / "docs" / "json.md").read_text()
    example = next(json.loads(b) for b in re.findall(r"```json\n(.*?)```", text, re.S) if '"spectrum/1"' in b)
    assert set(example) == set(doc)
    assert set(example["modules"][0]) == set(doc["modules"][0])
    assert set(example["groups"][0]) == set(doc["groups"][0])
    root = ET.parse(svg).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag == f"{ns}svg"
    lines = {p.get("data-group"): p for p in root.iter(f"{ns}polyline")}
    assert set(lines) == {g["group"] for g in doc["groups"]}
    for g in doc["groups"]:
        assert len(lines[g["group"]].get("points").split()) == len(g["error"])
    marks = {c.get("data-group"): int(c.get("data-rank")) for c in root.iter(f"{ns}circle")}
    assert marks == {g["group"]: g["ranks"][1] for g in doc["groups"]}


def test_cli_text(pair):
    tuned, base = pair
    r = cli("spectrum", tuned, "--base", base, "--max-error", "0.5")
    assert r.exit_code == 0, r.output
    assert "relative error by group (max error 0.5)" in r.stdout and "adapter parameters" in r.stdout
    assert "model.layers.0.mlp.up_proj" in r.stdout


def test_plot_must_be_svg_and_writes_nothing(pair, tmp_path):
    tuned, base = pair
    out = tmp_path / "chart.png"
    one_error(cli("spectrum", tuned, "--base", base, "--plot", out), "--plot", ".svg", out=out, code=2)


def test_equal_models_say_so(pair):
    tuned, base = pair
    one_error(cli("spectrum", base, "--base", base), "no changed tensor")


def test_large_matrices_take_the_randomized_path(pair, monkeypatch):
    """Past EXACT_SPECTRUM_DIM the top values come from svd.randomized_svd, said per module; on a rank-4 ΔW its
    top values are the exact ones and the error at rank 4 is rounding."""
    from lora_convert import spectrum

    tuned, base = pair
    monkeypatch.setattr(spectrum, "EXACT_SPECTRUM_DIM", 8)
    res = api.spectrum(tuned, base=base, max_rank=6, include=["up_proj"])
    deltas = _deltas(tuned, base)
    assert res.modules and {m.method for m in res.modules} == {"randomized"}
    for m in res.modules:
        s = torch.linalg.svdvals(deltas[m.module]).double()
        assert len(m.singular_values) == 6
        torch.testing.assert_close(torch.tensor(m.singular_values[:4], dtype=torch.float64), s[:4], rtol=1e-4, atol=0)
        assert m.error[3] < 1e-3 and m.error[0] == pytest.approx(
            math.sqrt(float(s[1:].pow(2).sum() / s.pow(2).sum())), rel=1e-4
        )


def test_experts_group_and_ranks_match_extract(tmp_path):
    """Routed experts (fused parameters): one row per expert in the ``experts`` group, its singular values an
    independent svdvals of tuned − base, its rank extract's (the largest any expert of the parameter needs)."""
    from tiny_moe import load, model, peft_experts, save_base

    m = model("mixtral")
    save_base(m, tmp_path / "base")
    peft_experts(m, r=6, attn=()).merge_and_unload().save_pretrained(str(tmp_path / "tuned"))
    res = api.spectrum(tmp_path / "tuned", base=tmp_path / "base", energy=0.9, max_rank=8)
    got = lc.extract(tmp_path / "tuned", base=tmp_path / "base", output=tmp_path / "x", energy=0.9, max_rank=8)
    ex = [m for m in res.modules if m.group == "experts"]
    assert ex and {g.group for g in res.groups} >= {"experts"}
    assert {m.module: m.rank for m in ex} == {m.label: m.rank for m in got.report.modules if m.kind == "experts"}
    base = {k: v.detach() for k, v in load(tmp_path / "base").named_parameters()}
    tuned = {k: v.detach() for k, v in load(tmp_path / "tuned").named_parameters()}
    assert len(ex) == sum(1 for m in got.report.modules if m.kind == "experts")
    for m in ex:
        path, e = m.module[:-1].split("[")
        s = torch.linalg.svdvals((tuned[path][int(e)] - base[path][int(e)]).float()).double()
        top = torch.tensor(m.singular_values, dtype=torch.float64)
        torch.testing.assert_close(top, s[: len(top)], rtol=1e-4, atol=1e-5 * float(s[0]))


def test_plot_into_a_missing_folder_is_one_error(pair, tmp_path):
    tuned, base = pair
    out = tmp_path / "nowhere" / "chart.svg"
    one_error(cli("spectrum", tuned, "--base", base, "--plot", out), "no such folder", str(out.parent))
    assert not out.parent.exists()


def test_conv1d_model_ranks_match_extract(tmp_path):
    """GPT-2 stores Conv1D weights (in, out): the spectrum is of the (out, in) view extract factors."""
    from tiny import gpt2

    gpt2().save_pretrained(tmp_path / "base")
    pm = peft_wrap(gpt2(), r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    pm.merge_and_unload().save_pretrained(tmp_path / "tuned")
    res = api.spectrum(tmp_path / "tuned", base=tmp_path / "base", max_error=0.2)
    got = lc.extract(tmp_path / "tuned", base=tmp_path / "base", output=tmp_path / "x", max_error=0.2).report
    assert {m.module: (m.rank, m.shape) for m in res.modules} == {m.module: (m.rank, m.shape) for m in got.modules}
    assert {m.group for m in res.modules} == {"attention", "mlp"}
    assert all(m.error[2] < 1e-5 for m in res.modules)  # rank 3 merged in


def test_svd_option_picks_the_path(pair, monkeypatch):
    """--svd randomized takes the fast path on any size, --svd exact svdvals past EXACT_SPECTRUM_DIM."""
    from lora_convert import spectrum

    tuned, base = pair
    monkeypatch.setattr(spectrum, "EXACT_SPECTRUM_DIM", 8)
    for how, want in (("randomized", "randomized"), ("exact", "exact"), ("auto", "randomized")):
        res = api.spectrum(tuned, base=base, svd=how, max_rank=6, include=["up_proj"])
        assert {m.method for m in res.modules} == {want}, how
