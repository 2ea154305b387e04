"""``--dry-run`` (issue 25 item 11): the plan printed and in ``--json``, nothing written — checked on the file
system (the parent folder listed before and after: no output, no temporary folder) — and the plan's files,
tensor count and bytes equal what the real run then writes; its modules and ranks are detect's."""

from __future__ import annotations

import json
import os
from pathlib import Path

from click.testing import CliRunner
from tiny import llama, peft_wrap

import lora_convert as lc
from lora_convert.cli import main
from lora_convert.dry_run import DryRun

LORA, BASE, UNMERGED = "fixtures/tiny-llama-lora", "fixtures/tiny-llama-base", "fixtures/tiny-llama-unmerged"


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def dry_then_real(tmp_path: Path, args: list[str], name: str = "out") -> tuple[dict, dict]:
    """The dry run's document (nothing beside the target afterwards), then the real run's."""
    target = tmp_path / name
    before = listing(tmp_path)
    dry = run(*args, "-o", str(target), "--json", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert listing(tmp_path) == before  # no output, no temporary folder beside it
    doc = json.loads(dry.stdout)
    assert doc["schema"] == "dry-run/1" and doc["dry_run"] is True
    real = run(*args, "-o", str(target), "--json")
    assert real.exit_code == 0, real.output
    done = json.loads(real.stdout)
    assert doc["files"] == done["files"] and doc["tensors"] == done["tensors"] and doc["bytes_exact"] is True
    assert doc["total_bytes"] == done["total_bytes"] == sum((target / f).stat().st_size for f in done["files"])
    assert doc["config_changes"] == done["config_changes"] and doc["ops"] == done["ops"]
    return doc, done


def detect_ranks(path: str) -> dict[str, list[int]]:
    """detect's ranks per module kind (``q_proj``)."""
    res = lc.detect(path)
    return {g.name: g.ranks for a in res.adapters for g in a.modules}


def plan_ranks(doc: dict) -> dict[str, list[int]]:
    out: dict[str, set[int]] = {}
    for m in doc["modules"]:
        out.setdefault(m["module"].rsplit(".", 1)[-1], set()).add(m["rank"])
    return {k: sorted(v) for k, v in out.items()}


def test_merge_adapter_and_base(tmp_path):
    doc, done = dry_then_real(tmp_path, ["merge", LORA, "--base", BASE, "--dtype", "fp16"])
    assert doc["config_changes"] == {"dtype": "float16"} and doc["dtypes"] == {"F16": done["tensors"]}
    assert plan_ranks(doc) == detect_ranks(LORA)
    det = lc.detect(LORA).adapters[0]
    assert sorted({m["scaling"] for m in doc["modules"]}) == sorted({s for g in det.modules for s in g.scalings})
    # the blocks read: every base tensor once, whole (fixtures are tiny: one block each)
    base = lc.load_source(BASE)[0]
    lora = lc.load_source(LORA)[0]
    try:
        assert doc["read_bytes"] == sum(t.nbytes for t in base.tensors.values())
        assert doc["factor_bytes"] == sum(t.nbytes for n, t in lora.tensors.items() if "lora_" in n)
    finally:
        base.close()
        lora.close()


def test_convert_unmerged_to_adapter(tmp_path):
    doc, done = dry_then_real(tmp_path, ["convert", UNMERGED, "--to", "adapter"])
    assert "adapter_config.json" in doc["files"]
    assert plan_ranks(doc) == detect_ranks(UNMERGED)
    assert plan_ranks(doc) == detect_ranks(str(tmp_path / "out"))


def test_combine(tmp_path):
    args = ["combine", LORA, f"{LORA}:0.5", "--method", "cat"]
    doc, done = dry_then_real(tmp_path, args)
    assert [m["weight"] for m in doc["modules"]].count(0.5) == len(doc["modules"]) // 2
    assert plan_ranks(doc) == detect_ranks(LORA)
    assert {r for rs in detect_ranks(str(tmp_path / "out")).values() for r in rs} == {16}  # cat: ranks add


def test_tiny_model_with_a_rank_pattern_api_and_text(tmp_path):
    base_model = llama()
    base_model.save_pretrained(tmp_path / "base")
    pm = peft_wrap(base_model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    pm.save_pretrained(tmp_path / "lora")
    out = tmp_path / "merged"
    before = listing(tmp_path)
    plan = lc.merge(str(tmp_path / "lora"), base=str(tmp_path / "base"), output=out, dry_run=True)
    assert isinstance(plan, DryRun) and listing(tmp_path) == before
    assert plan_ranks(plan.to_dict()) == {"q_proj": [4], "v_proj": [2]} == detect_ranks(str(tmp_path / "lora"))
    peft_scaling = {
        n.removeprefix("base_model.model."): m.scaling["default"]
        for n, m in pm.named_modules()
        if isinstance(getattr(m, "scaling", None), dict)
    }
    assert {m["module"]: m["scaling"] for m in plan.modules} == peft_scaling  # q_proj 8/4, v_proj 8/2
    done = lc.merge(str(tmp_path / "lora"), base=str(tmp_path / "base"), output=out)
    assert (plan.files, plan.tensors, plan.total_bytes) == (done.files, done.tensors, done.total_bytes)
    text = run("merge", str(tmp_path / "lora"), "--base", str(tmp_path / "base"), "-o", str(out), "--dry-run")
    assert text.exit_code == 0, text.output
    assert "would write" in text.output and "the real run needs --force" in text.output
    assert f"{done.tensors} tensors" in text.output
