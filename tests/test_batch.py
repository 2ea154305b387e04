"""``lora-convert batch JOBS``: every job's output byte for byte the single command's, a failed job stopping no other
(its error line the single command's own), a rerun skipping what finished with the same inputs, a bad job file one
error line, and no ray without --ray."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FIXTURES, ROOT, cli, one_error

BASE, LORA, MERGED = (str(FIXTURES / n) for n in ("tiny-llama-base", "tiny-llama-lora", "tiny-llama-merged"))

# Command lines with relative outputs: run in two folders, the model cards quote the same line.
JOBS = [
    f"merge {LORA} --base {BASE} -o out/merged --dtype bf16",
    f"verify out/merged --base {BASE} --adapter {LORA}",
    f"extract {MERGED} --base {BASE} -o out/extracted --rank 4 --svd exact",
    f"convert {LORA} --to mlx --base {BASE} -o out/mlx",
    f"convert {LORA} --to gguf --base {BASE} -o out/lora.gguf",
    f"combine {LORA} {LORA}:0.5 --method cat -o out/combined",
    f"merge {LORA} --base {FIXTURES}/no-such-base -o out/bad",  # fails: its error line, nothing else stops
    "verify out/bad --base {BASE} --adapter {LORA}".replace("{BASE}", BASE).replace("{LORA}", LORA),  # blocked
    f"verify {MERGED} --base {BASE} --adapter {LORA}:2",  # not ok: a failed job, with verify's verdict line
]


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _in(folder: Path, *args: object):
    """``lora-convert ARGS`` with ``folder`` as the working directory (the jobs' outputs are relative), and ARGS as
    the process's command line (the model card quotes it)."""
    here, argv = os.getcwd(), sys.argv
    os.chdir(folder)
    sys.argv = ["lora-convert", *map(str, args)]
    try:
        return cli(*args)
    finally:
        os.chdir(here)
        sys.argv = argv


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """The batch run once (a pool of two workers), and each command run alone in another folder."""
    a, b = tmp_path_factory.mktemp("batch"), tmp_path_factory.mktemp("single")
    (a / "jobs.yaml").write_text("jobs:\n" + "".join(f"  - {json.dumps(j)}\n" for j in JOBS), encoding="utf-8")
    first = _in(a, "batch", "jobs.yaml", "--json", "--workers", "2")
    singles = [_in(b, *j.split()) for j in JOBS]
    second = _in(a, "batch", "jobs.yaml", "--json")  # the rerun
    return a, b, first, singles, second


def test_outputs_are_the_single_commands_byte_for_byte(ran):
    a, b, first, singles, _ = ran
    assert [r.exit_code for r in singles] == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    got, want = _tree(a / "out"), _tree(b / "out")
    assert sorted(got) == sorted(want)
    assert {"merged/model.safetensors", "extracted/adapter_model.safetensors", "lora.gguf"} <= set(got)
    assert "merged/README.md" in got and b"lora-convert merge" in got["merged/README.md"]  # the card quotes the job
    for name in want:
        assert got[name] == want[name], name


def test_a_failed_job_is_its_error_line_and_stops_no_other(ran):
    _, _, first, singles, _ = ran
    assert first.exit_code == 1
    doc = json.loads(first.stdout)
    assert doc["schema"] == "batch/1" and doc["ok"] is False
    status = {j["name"]: j["status"] for j in doc["jobs"]}
    assert status == {
        "1:merge": "done",
        "2:verify": "done",
        "3:extract": "done",
        "4:convert": "done",
        "5:convert": "done",
        "6:combine": "done",
        "7:merge": "failed",
        "8:verify": "blocked",
        "9:verify": "failed",
    }
    bad = next(j for j in doc["jobs"] if j["name"] == "7:merge")
    alone = one_error(singles[6], "no-such-base")  # the line the command prints alone
    assert "error: " + bad["error"] == alone
    blocked = next(j for j in doc["jobs"] if j["name"] == "8:verify")
    assert blocked["error"] == "needs the output of 7:merge"
    assert f"error: job 7:merge: {bad['error']}" in first.stderr  # every failure on stderr too
    assert doc["counts"] == {"done": 6, "failed": 2, "blocked": 1}
    verdict = next(j for j in doc["jobs"] if j["name"] == "9:verify")["error"]
    assert verdict.startswith("not ok: ") and verdict == singles[8].stdout.strip().splitlines()[-1]


def test_docs_json_md_shows_the_batch_document(ran):
    """docs/json.md's batch/1 example carries exactly the keys the document and each job have."""
    import re

    text = (ROOT / "docs" / "json.md").read_text()
    example = next(d for d in map(json.loads, re.findall(r"```json\n(.*?)```", text, re.S)) if d["schema"] == "batch/1")
    real = json.loads(ran[2].stdout)
    assert set(example) == set(real)
    assert all(set(j) == set(real["jobs"][0]) for j in example["jobs"])
    assert {j["status"] for j in example["jobs"]} <= {"done", "skipped", "failed", "blocked"}


def test_a_rerun_skips_what_finished_with_the_same_inputs(ran):
    a, _, first, _, second = ran
    doc = json.loads(second.stdout)
    status = {j["name"]: j["status"] for j in doc["jobs"]}
    assert [status[f"{i}:{c}"] for i, c in enumerate(["merge", "verify", "extract", "convert"], 1)] == ["skipped"] * 4
    assert status["7:merge"] == "failed" and status["8:verify"] == "blocked"  # a failure is never recorded
    assert status["9:verify"] == "failed"
    records = sorted((a / "jobs.yaml.state").glob("*.json"))
    assert len(records) == 6
    rec = json.loads(records[0].read_text())
    assert set(rec) == {"version", "job", "identity", "output"}


def test_changed_input_or_output_reruns_the_job(tmp_path, monkeypatch):
    """A record is what identified the inputs: a touched adapter, or an output file removed, and that job runs
    again (with --force, as it would alone: the output exists); the other is skipped."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(LORA, "a")
    shutil.copytree(LORA, "b")
    Path("jobs.jsonl").write_text(
        json.dumps({"name": "m", "run": f"merge a --base {BASE} -o merged --force"})
        + "\n"
        + json.dumps(["convert", "b", "--to", "mlx", "--base", BASE, "-o", "mlx", "--force"])
        + "\n",
        encoding="utf-8",
    )
    runs = []
    for change in (None, "touch", "remove"):
        if change == "touch":
            st = os.stat("a/adapter_model.safetensors")
            os.utime("a/adapter_model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        elif change == "remove":
            Path("mlx/adapter_config.json").unlink()
        res = cli("batch", "jobs.jsonl", "--json", "--workers", "1")
        assert res.exit_code == 0, res.output
        runs.append([j["status"] for j in json.loads(res.stdout)["jobs"]])
    assert runs == [["done", "done"], ["done", "skipped"], ["skipped", "done"]]
    assert (tmp_path / "mlx" / "adapter_config.json").is_file()


@pytest.mark.parametrize(
    ("text", "needle", "name"),
    [
        ("jobs: [merge a -o b\n", "not valid YAML", "jobs.yaml"),
        ("- detect x\n", "job 1: the command is 'detect'", "jobs.yaml"),
        ("- merge x --bogus\n", "job 1 (1:merge): No such option '--bogus'", "jobs.yaml"),
        ("- merge x\n", "job 1 (1:merge): Missing option '-o'", "jobs.yaml"),
        ("- {run: merge x -o y, when: now}\n", "job 1: a job mapping has run:", "jobs.yaml"),
        ("- {name: a, run: merge x -o y}\n- {name: a, run: merge x -o z}\n", "job 2: the name 'a'", "jobs.yaml"),
        ("- merge x -o y --dry-run\n", "--dry-run has no place in a batch", "jobs.yaml"),
        ("- merge x -o y --help\n", "--help has no place in a job", "jobs.yaml"),
        ("jobs: []\n", "lists no jobs", "jobs.yaml"),
        ('["merge", "x", "-o", "y"]\n{"run": 3}\n', "job 2: a job is a command line", "jobs.jsonl"),
        ('["merge", "x", "-o", "y"]\nnot json\n', "line 2 is not JSON", "jobs.jsonl"),
    ],
)
def test_a_bad_job_file_is_one_error_line_and_runs_nothing(tmp_path, text, needle, name):
    jobs = tmp_path / name
    jobs.write_text(text, encoding="utf-8")
    one_error(cli("batch", jobs), str(jobs), needle, code=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no state folder, no output


def test_missing_job_file_is_one_error_line(tmp_path):
    one_error(cli("batch", tmp_path / "nope.yaml"), "nope.yaml", "cannot read the job file", code=2)


NO_RAY = """
import sys, runpy
sys.argv = ["lora-convert", *sys.argv[1:]]
try:
    runpy.run_module("lora_convert.cli", run_name="__main__")
except SystemExit as e:
    code = e.code
print("RAY_IMPORTED" if "ray" in sys.modules else "NO_RAY", file=sys.stderr)
"""


def test_batch_without_ray_never_imports_ray(tmp_path):
    (tmp_path / "jobs.yaml").write_text(f"- convert {LORA} --to mlx --base {BASE} -o {tmp_path}/mlx\n")
    run = subprocess.run(
        [sys.executable, "-c", NO_RAY, "batch", str(tmp_path / "jobs.yaml"), "--workers", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert run.stderr.splitlines()[-1] == "NO_RAY", run.stderr
    assert "ok: 1 jobs: 1 done" in run.stdout
    assert (tmp_path / "mlx" / "adapters.safetensors").is_file()


def test_the_pool_admits_jobs_by_their_memory_footprint():
    """Extraction holds its largest ΔW in fp32 once per factorising thread (one per core, at most 4) and once more
    beside a worker; a merge streams (a worker only).  The pool starts a job while the footprints in flight fit the
    memory, and always one."""
    from safetensors import safe_open

    from lora_convert.fleet import PROCESS_BYTES, Job, LocalPool, footprint

    with safe_open(f"{BASE}/model.safetensors", "pt") as f:
        largest = max(
            f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1]
            for k in f.keys()
            if len(f.get_slice(k).get_shape()) == 2
        )
    extract = Job(1, "e", "extract", (), {"tuned": MERGED, "base": BASE, "output": "x"})
    merge = Job(2, "m", "merge", (), {"source": LORA, "base": BASE, "output": "y"})
    assert footprint(extract) == PROCESS_BYTES + (min(os.cpu_count() or 1, 4) + 1) * 4 * largest
    assert footprint(merge) == PROCESS_BYTES
    pool = LocalPool(workers=4, memory=2 * PROCESS_BYTES)  # no process starts before a job is submitted
    assert pool.fits(10 * PROCESS_BYTES, running=0)  # one job always runs, however large
    pool._held = {"a": (merge, PROCESS_BYTES)}  # one worker's footprint in flight
    assert pool.fits(PROCESS_BYTES, running=1) and not pool.fits(PROCESS_BYTES + 1, running=1)
    pool._held = {"a": (merge, 0), "b": (merge, 0), "c": (merge, 0), "d": (merge, 0)}
    assert not pool.fits(0, running=4)  # every worker busy
    pool.close()


def test_jobs_that_read_each_others_outputs_are_blocked_not_hung(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("jobs.yaml").write_text(f"- merge b --base {BASE} -o a\n- merge a --base {BASE} -o b\n")
    res = cli("batch", "jobs.yaml", "--json")
    assert res.exit_code == 1
    jobs = json.loads(res.stdout)["jobs"]
    assert [(j["status"], j["error"]) for j in jobs] == [
        ("blocked", "its inputs are outputs of jobs that wait for it")
    ] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.yaml"]  # nothing ran, no state recorded


def test_the_package_batch_stays_the_function_once_the_fleet_module_is_imported():
    """``lora_convert.batch`` is the API function: the module that runs fleets is imported lazily (start-up), and a
    submodule of the same name, once imported, would have replaced the package's attribute with itself (this broke
    ``lc.batch(...)`` after a ``merge --ray``: 'module' object is not callable)."""
    code = (
        "import lora_convert as lc, lora_convert.fleet, lora_convert.cluster, lora_convert.api as api\n"
        "assert lc.batch is api.batch and callable(lc.batch), lc.batch\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
