"""Extraction's factorisations on a pool of threads (routes/factoring.py): the adapter does not depend on how many
run at once, and ΔW buffers taken for differences that turn out to be zero are given back (no hang)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from helpers import FIXTURES, ROOT, tree_digest
from safetensors.torch import load_file, save_file

import lora_convert as lc
from lora_convert.routes import extract, factoring

BASE, TUNED = FIXTURES / "tiny-llama-base", FIXTURES / "tiny-llama-merged"


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_the_adapter_does_not_depend_on_how_many_factorisations_run_at_once(tmp_path, monkeypatch, svd):
    digests = {}
    for workers in (1, 3):
        monkeypatch.setattr(extract, "plan_threads", lambda workers=workers: (workers, 1))
        res = lc.extract(TUNED, base=BASE, output=tmp_path / f"w{workers}", rank=4, svd=svd)
        digests[workers] = tree_digest(tmp_path / f"w{workers}")
        assert len(res.report.modules) == 8  # the modules the fixture changed: more than 3 factorisations + 1
    assert digests[1] == digests[3]


def test_plan_threads_keeps_every_core_busy_with_at_most_four_factorisations():
    assert factoring.plan_threads(1) == (1, 1)
    assert factoring.plan_threads(2) == (2, 1)
    assert factoring.plan_threads(8) == (4, 2)
    assert factoring.plan_threads(6) == (4, 1)


def test_signed_zero_differences_give_their_buffers_back(tmp_path):
    """-0.0 against 0.0 differs in bits, not in value: ΔW is formed in a pool buffer, found zero, and the buffer
    must come back — in more tensors than there are buffers, the extraction would otherwise wait forever."""
    base = load_file(BASE / "model.safetensors")
    tuned = dict(base)
    linears = [k for k, v in base.items() if v.ndim == 2 and "proj" in k]
    assert len(linears) > factoring.plan_threads()[0] + 1
    for k in linears:
        b, t = base[k].clone(), base[k].clone()
        b[0, 0], t[0, 0] = 0.0, -0.0
        base[k], tuned[k] = b, t
    for name, tensors in (("base", base), ("tuned", tuned)):
        (tmp_path / name).mkdir()
        shutil.copy(BASE / "config.json", tmp_path / name / "config.json")
        save_file(tensors, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
    assert torch.equal(base[linears[0]], tuned[linears[0]])  # equal values ...
    assert not torch.equal(base[linears[0]].view(torch.int16), tuned[linears[0]].view(torch.int16))  # ... other bits
    code = (
        "import sys, lora_convert as lc\n"
        "try:\n"
        "    lc.extract(sys.argv[1], base=sys.argv[2], output=sys.argv[3], rank=2)\n"
        "except lc.RouteError as e:\n"
        "    print('refused:', e)\n"
    )
    argv = [str(tmp_path / "tuned"), str(tmp_path / "base"), str(tmp_path / "out")]
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "refused:" in r.stdout and "differ" in r.stdout, r.stdout  # nothing changed: no adapter to write
