"""``extract --dry-run`` (issue 24): the adapter described from headers alone, the SVD pass declared by the plan
and not run.  Where the headers settle the output (a fixed ``--rank``, every tensor to factor changed) the
described files, tensors and bytes are what the real run then writes; where they cannot (an energy criterion
picks the ranks in the pass) the ranks are unknown, the bytes an upper bound, and the output says so."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny import llama
from tiny_moe import model as moe_model

import lora_convert as lc
from lora_convert import svd
from lora_convert.cli import main
from lora_convert.dry_run import DryRun


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _pair(folder: Path, m: torch.nn.Module, *, seed: int = 5) -> tuple[Path, Path]:
    """BASE and a TUNED in which every matrix (and fused expert parameter) changed, norms and biases not."""
    m.save_pretrained(str(folder / "base"))
    tuned = copy.deepcopy(m)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.ndim >= 2 and "bias" not in name:  # (gpt-oss stores its experts' biases (E, out))
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    tuned.save_pretrained(str(folder / "tuned"))
    return folder / "tuned", folder / "base"


def _no_svd(*args, **kwargs):
    raise AssertionError("a dry run factored a matrix")


def _same_output(plan: DryRun, done) -> None:
    assert (plan.files, plan.tensors, plan.total_bytes, plan.ops) == (
        done.files,
        done.tensors,
        done.total_bytes,
        done.ops,
    )
    assert sum(plan.dtypes.values()) == done.tensors


@pytest.mark.parametrize("factor_dtype", ["fp32", "bf16"])
def test_fixed_rank_describes_what_the_run_writes(tmp_path, monkeypatch, factor_dtype):
    tuned, base = _pair(tmp_path, llama())
    out = tmp_path / "adapter"
    before = _listing(tmp_path)
    with monkeypatch.context() as mp:
        mp.setattr(svd, "factorise", _no_svd)  # the pass is declared, not run: no SVD while planning
        plan = lc.extract(tuned, base=base, output=out, rank=3, dtype=factor_dtype, dry_run=True)
    assert isinstance(plan, DryRun) and _listing(tmp_path) == before
    assert plan.bytes_exact and plan.dtypes == {"F32" if factor_dtype == "fp32" else "BF16": plan.tensors}
    assert plan.read_bytes == 2 * sum(  # every matrix of both checkpoints read once, in blocks, by the pass
        p.numel() * 4 for p in llama().parameters() if p.ndim >= 2
    ) + 2 * sum(p.numel() * 4 for p in llama().parameters() if p.ndim < 2)
    done = lc.extract(tuned, base=base, output=out, rank=3, dtype=factor_dtype)
    _same_output(plan, done)
    assert {(m["module"], m["kind"], m["rank"]) for m in plan.modules} == {
        (m.label, m.kind, m.rank) for m in done.report.modules
    }
    assert any("before the SVD pass" in a for a in plan.assumptions)


def test_energy_ranks_are_unknown_and_bytes_an_upper_bound(tmp_path, monkeypatch):
    tuned, base = _pair(tmp_path, llama())
    out = tmp_path / "adapter"
    with monkeypatch.context() as mp:
        mp.setattr(svd, "factorise", _no_svd)
        plan = lc.extract(tuned, base=base, output=out, energy=0.5, max_rank=6, dry_run=True)
    assert not plan.bytes_exact and {m["rank"] for m in plan.modules} == {None}
    assert any("unknown until the SVD pass" in a and "--max-rank 6" in a for a in plan.assumptions)
    done = lc.extract(tuned, base=base, output=out, energy=0.5, max_rank=6)
    assert (plan.files, plan.tensors, plan.ops) == (done.files, done.tensors, done.ops)
    assert min(m.rank for m in done.report.modules) < 6  # the criterion did pick smaller ranks...
    assert done.total_bytes < plan.total_bytes  # ...so the real adapter is smaller than the bound
    at_bound = lc.extract(tuned, base=base, output=tmp_path / "at-bound", rank=6)
    assert plan.total_bytes == at_bound.total_bytes  # the bound is the adapter at --max-rank


def test_unchanged_tensors_make_the_plan_an_upper_bound(tmp_path):
    """The fixture's merge changed 8 of its 16 matrices: the dry run counts all 16 (it reads no data), says so."""
    args = dict(base="fixtures/tiny-llama-base", rank=4)
    plan = lc.extract("fixtures/tiny-llama-merged", output=tmp_path / "x", dry_run=True, **args)
    done = lc.extract("fixtures/tiny-llama-merged", output=tmp_path / "x", **args)
    assert (plan.tensors, done.tensors) == (32, 16) and plan.total_bytes > done.total_bytes
    assert any("counted as changed" in a and "leaves out those equal to the base" in a for a in plan.assumptions)


def test_fused_experts_are_described_as_written(tmp_path, monkeypatch):
    m = moe_model("gpt_oss")  # fused (E, in, out), read transposed by PEFT, with expert biases left unchanged
    tuned, base = _pair(tmp_path, m)
    out = tmp_path / "adapter"
    with monkeypatch.context() as mp:
        mp.setattr(svd, "factorise", _no_svd)
        plan = lc.extract(tuned, base=base, output=out, rank=2, dry_run=True)
    done = lc.extract(tuned, base=base, output=out, rank=2)
    _same_output(plan, done)
    assert plan.ops["experts"] == done.ops["experts"] > 0


def test_cli_prints_the_plan_and_its_assumptions(tmp_path):
    res = CliRunner().invoke(
        main,
        ["extract", "fixtures/tiny-llama-merged", "--base", "fixtures/tiny-llama-base", "-o", str(tmp_path / "x")]
        + ["--energy", "0.9", "--dry-run"],
    )
    assert res.exit_code == 0, res.output
    assert "would write 32 tensors" in res.output and "nothing written" in res.output
    assert "assumes: ranks are unknown until the SVD pass runs" in res.output.replace("\n  ", " ")
    assert not (tmp_path / "x").exists()


def test_an_existing_output_is_refused_before_the_svd_pass(tmp_path, monkeypatch):
    """The output is taken before the pre-pass runs: a user who forgot --force hears it at once, not after
    every matrix has been factored."""
    tuned, base = _pair(tmp_path, llama())
    (tmp_path / "adapter").mkdir()
    monkeypatch.setattr(svd, "factorise", _no_svd)
    with pytest.raises(lc.OutputError, match="already exists"):
        lc.extract(tuned, base=base, output=tmp_path / "adapter", rank=2)
