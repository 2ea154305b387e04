"""A batch whose driver is killed (SIGKILL to it and its workers, at whatever point the fleet has reached): every
output that appeared is whole and the single command's byte for byte, nothing half written is published, and the
next run cleans up, finishes the rest and skips what was done."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import FIXTURES, ROOT, TMP_MARK, cli

BASE, LORA = (str(FIXTURES / n) for n in ("tiny-llama-base", "tiny-llama-lora"))
N = 6


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _batch(folder: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lora_convert.cli", "batch", "jobs.yaml", "--json", "--workers", "2"],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its workers in its process group: one killpg takes the whole fleet down
    )


def test_a_killed_batch_publishes_nothing_half_written_and_the_rerun_completes(tmp_path):
    ref = tmp_path / "ref"
    assert cli("merge", LORA, "--base", BASE, "-o", ref, "--dtype", "bf16").exit_code == 0
    want = {k: v for k, v in _tree(ref).items() if k != "README.md"}  # the card quotes each job's own line
    work = tmp_path / "fleet"
    (work / "out").mkdir(parents=True)
    jobs = [f"merge {LORA} --base {BASE} -o out/m{i} --dtype bf16" for i in range(N)]
    (work / "jobs.yaml").write_text("jobs:\n" + "".join(f"  - {json.dumps(j)}\n" for j in jobs), encoding="utf-8")

    proc = _batch(work)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120 and proc.poll() is None:
        if any(p.name.startswith("m") and TMP_MARK not in p.name for p in (work / "out").iterdir()):
            break  # one output published, others on their way
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()

    published = [p for p in (work / "out").iterdir() if TMP_MARK not in p.name]
    for p in published:
        got = {k: v for k, v in _tree(p).items() if k != "README.md"}
        assert got == want, f"{p.name} is published but not whole"

    proc = _batch(work)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    doc = json.loads(stdout)
    statuses = sorted(j["status"] for j in doc["jobs"])
    assert statuses.count("done") + statuses.count("skipped") == N, statuses
    assert not [p for p in (work / "out").iterdir() if TMP_MARK in p.name], "the rerun left a temp folder"
    for i in range(N):
        got = {k: v for k, v in _tree(work / "out" / f"m{i}").items() if k != "README.md"}
        assert got == want, f"m{i}"


def test_an_output_published_before_its_record_is_adopted_only_if_the_job_made_it(tmp_path):
    """The window the kill above lands in most often, made on purpose: the job started (its pending record), its
    output renamed into place, no final record.  The rerun takes the output as the job's; an output that was
    there before the job started is never taken for it."""
    from lora_convert.fleet import Job, State

    job = Job(
        1,
        "m",
        "merge",
        ("merge", LORA, "--base", BASE, "-o", str(tmp_path / "m")),
        {"source": LORA, "base": BASE, "output": tmp_path / "m"},
    )
    book = State(tmp_path / "state")
    book.started(job)
    assert not book.finished(job)  # started, nothing published
    assert cli("merge", LORA, "--base", BASE, "-o", tmp_path / "m").exit_code == 0
    assert book.finished(job) and book.path(job).is_file()  # adopted, and recorded
    other = Job(
        2,
        "o",
        "merge",
        ("merge", LORA, "--base", BASE, "-o", str(tmp_path / "m"), "--dtype", "bf16"),
        {"source": LORA, "base": BASE, "output": tmp_path / "m"},
    )
    book.started(other)  # its output is already there (someone else's): never adopted
    assert not book.finished(other)
