"""``extract --ray``: one extraction's differences and SVDs split by module group into Ray tasks on a two-node
cluster (``ray.cluster_utils.Cluster``), the factors gathered on the driver: the adapter byte for byte the local
run's (a tiny Llama through the CLI and the API, a tiny MoE's experts through the API).

As in tests/test_ray.py, all of Ray runs in ONE child inside a network namespace that holds only loopback
(``unshare -n``), where Ray falls back to 127.0.0.1; the child checks every node's NodeManagerAddress is ``127.*``
before it runs anything and reports back as JSON.  Without the right to make a namespace (not root), those tests
skip and say so.  The local references are made in the child before Ray starts, with the same torch threads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import FIXTURES, ROOT, loopback_namespace_unavailable, tree_digest
from safetensors.torch import load_file, save_file
from tiny_moe import logits, model, peft_experts, save_base

from lora_convert.io.output import TMP_MARK

BASE, TUNED = str(FIXTURES / "tiny-llama-base"), str(FIXTURES / "tiny-llama-merged")

# Loaded by every Python of the cluster (PYTHONPATH): in a Ray worker, each group of extraction jobs run leaves a
# note NODE_ID.PID.NS.THREADS.JOBS in LC_NOTES (THREADS: torch's thread count the jobs ran with), then waits
# LC_SLOW seconds so that the groups overlap and spread.
SITECUSTOMIZE = r"""
import os, sys
if os.environ.get("LC_NOTES") and "default_worker" in (sys.argv[0] if sys.argv else ""):
    import time
    import torch
    import lora_convert.pipeline as p
    orig = p.execute
    def watched(blocks, seen):
        def run(buf):
            seen.add(torch.get_num_threads())  # inside execute, as the job's SVD runs
            yield from blocks(buf)
        return run
    def execute(jobs, sink, **k):
        import ray
        seen = set()
        for j in jobs:
            j.blocks = watched(j.blocks, seen)
        out = orig(jobs, sink, **k)
        node = ray.get_runtime_context().get_node_id()
        threads = ",".join(sorted(str(t) for t in seen))
        name = f"{node}.{os.getpid()}.{time.time_ns()}.{threads}.{len(jobs)}"
        open(os.path.join(os.environ["LC_NOTES"], name), "w").close()
        time.sleep(float(os.environ.get("LC_SLOW", "0")))
        return out
    p.execute = execute
"""

CHILD = r"""
import json, os, subprocess, sys, time
from pathlib import Path

import torch

work, tuned, base = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
os.chdir(work)
import lora_convert as lc
from lora_convert.routes import factoring

# One factorisation at a time on every core, here and (through the threads the driver hands them) in the tasks: the
# tasks must then factor with the driver's 2 threads, not the 1 Ray gives a one-CPU task.
factoring.MAX_WORKERS = 1
rep = {"threads": factoring.plan_threads()[1]}
cli = [sys.executable, "-m", "lora_convert.cli", "extract", tuned, "--base", base, "--rank", "4", "--json"]
# the local references, before Ray: the CLI, the API (randomized SVD too), the MoE's experts
(work / "cli-local").mkdir(), (work / "cli-ray").mkdir()  # the card quotes the command line: the same -o
run = subprocess.run(cli + ["-o", "adapter"], capture_output=True, text=True, timeout=300, cwd=work / "cli-local")
assert run.returncode == 0, run.stderr
lc.extract(tuned, base=base, output="api-local", energy=0.99, max_rank=6, svd="randomized")
lc.extract("moe/tuned", base="moe/base", output="moe-local", rank=2)
def error(**kw):
    try:
        lc.extract("nan", base=base, output="nan-out", rank=2, **kw)
    except lc.LoraConvertError as e:
        return [type(e).__name__, str(e)]
rep["nan_local"] = error()

import ray
from ray.cluster_utils import Cluster

os.environ.update(LC_SLOW="0.5", LC_NOTES=str(work / "notes"),
                  PYTHONPATH=os.pathsep.join([str(work / "site"), os.environ.get("PYTHONPATH", "")]))
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
node2 = cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, log_to_driver=False)
cluster.wait_for_nodes()
t0 = time.monotonic()
while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() - t0 < 60:  # both nodes' CPUs seen
    time.sleep(0.1)
rep["addresses"] = sorted(n["NodeManagerAddress"] for n in ray.nodes())
if not all(a.startswith("127.") for a in rep["addresses"]):
    print(json.dumps(rep)); sys.exit(3)  # never run anything on another address
rep["address"], rep["nodes"] = cluster.address, sorted(n["NodeID"] for n in ray.nodes())

def notes():
    got = sorted(os.listdir(work / "notes"))
    for n in got:
        os.unlink(work / "notes" / n)
    return got

res = lc.extract(tuned, base=base, output="api-ray", energy=0.99, max_rank=6, svd="randomized", ray=cluster.address)
rep["api"] = {"notes": notes(), "modules": len(res.report.modules), "files": res.files}
res = lc.extract("moe/tuned", base="moe/base", output="moe-ray", rank=2, ray=cluster.address)
rep["moe"] = {"notes": notes(), "experts": sum(m.kind == "experts" for m in res.report.modules)}
rep["nan_ray"] = error(ray=cluster.address)
rep["nan_out"] = sorted(os.listdir(work))
notes()
run = subprocess.run(cli + ["-o", "adapter", "--ray", cluster.address], capture_output=True, text=True, timeout=300,
                     cwd=work / "cli-ray")
rep["cli"] = {"rc": run.returncode, "stderr": run.stderr[-3000:], "notes": notes()}
ray.shutdown()
cluster.shutdown()
print(json.dumps(rep))
"""


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory):
    why = loopback_namespace_unavailable()
    if why:
        pytest.skip(f"Ray runs only inside a loopback-only network namespace here: {why}")
    work = tmp_path_factory.mktemp("ray-extract")
    for sub in ("notes", "site", "moe"):
        (work / sub).mkdir()
    (work / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    m = model("qwen3_moe")  # a tiny MoE whose experts (and attention) a LoRA changed, merged in
    save_base(m, work / "moe" / "base")
    pm = peft_experts(m, r=2)
    logits(pm)
    pm.merge_and_unload().save_pretrained(str(work / "moe" / "tuned"))
    (work / "nan").mkdir()  # the tuned model with a NaN in one matrix: the task that meets it fails
    shutil.copy(FIXTURES / "tiny-llama-merged" / "config.json", work / "nan" / "config.json")
    tensors = load_file(FIXTURES / "tiny-llama-merged" / "model.safetensors")
    tensors["model.layers.1.self_attn.v_proj.weight"][3, 5] = float("nan")
    save_file(tensors, work / "nan" / "model.safetensors", metadata={"format": "pt"})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run(
        ["unshare", "-n", "bash", "-c", 'ip link set lo up && exec "$0" -c "$@"', sys.executable, CHILD]
        + [str(work), TUNED, BASE],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert child.stdout.strip(), child.stderr[-3000:]
    rep = json.loads(child.stdout.strip().splitlines()[-1])
    assert child.returncode == 0, (rep, child.stderr[-3000:])
    return work, rep


def test_a_task_error_is_the_local_error_and_nothing_is_written(ray_run):
    """A NaN in one matrix: the group that meets it fails; the driver raises the error it raised (file, tensor),
    the file named by the absolute path the tasks were given."""
    work, rep = ray_run
    assert rep["nan_local"][0] == "CheckpointError" and "v_proj.weight" in rep["nan_local"][1]
    assert "NaN or Inf" in rep["nan_local"][1]
    assert rep["nan_ray"] == ["CheckpointError", f"{work.resolve()}/{rep['nan_local'][1]}"]  # the path made absolute
    assert "nan-out" not in rep["nan_out"] and not [n for n in rep["nan_out"] if TMP_MARK in n]


def _groups(notes: list[str]) -> list[tuple[str, str, int]]:
    """(node, threads, jobs) of each group run."""
    return [(n.split(".")[0], n.split(".")[3], int(n.split(".")[4])) for n in notes]


def test_extraction_split_over_two_nodes_is_the_local_adapter(ray_run):
    """The API: energy criterion, randomized SVD (seeded per matrix); groups on both nodes, each factoring with
    the driver's torch threads (Ray would give a one-CPU task one)."""
    work, rep = ray_run
    assert len(rep["addresses"]) == 2 and all(a.startswith("127.") for a in rep["addresses"])
    assert rep["address"].startswith("127.")
    groups = _groups(rep["api"]["notes"])
    assert {g[0] for g in groups} == set(rep["nodes"])  # tasks seen on both nodes
    assert len(groups) == 4  # 2 CPUs, one per task: 2 slots × 2 groups each
    assert {g[1] for g in groups} == {str(rep["threads"])}
    assert rep["threads"] == 2  # (so the check above is not the 1 Ray sets: all 2 cores for one factorisation)
    assert sum(g[2] for g in groups) == 2 * 9 + 3  # 2 layers × (7 linears + 2 norms); embeddings, final norm, head
    local, ray = tree_digest(work / "api-local"), tree_digest(work / "api-ray")
    assert "adapter_model.safetensors" in ray and "adapter_config.json" in ray and "README.md" in ray
    assert local == ray
    assert not [p for p in work.iterdir() if TMP_MARK in p.name]  # no temporary folder left


def test_moe_experts_split_over_two_nodes_are_the_local_adapter(ray_run):
    work, rep = ray_run
    groups = _groups(rep["moe"]["notes"])
    assert {g[0] for g in groups} == set(rep["nodes"])
    assert rep["moe"]["experts"] > 0
    assert tree_digest(work / "moe-local") == tree_digest(work / "moe-ray")


def test_cli_extract_ray_is_the_local_output(ray_run):
    """``extract --ray ADDRESS`` on the command line: the same files, the card's command line without --ray."""
    work, rep = ray_run
    assert rep["cli"]["rc"] == 0, rep["cli"]["stderr"]
    assert {g[0] for g in _groups(rep["cli"]["notes"])} == set(rep["nodes"])
    ray = tree_digest(work / "cli-ray")
    assert "adapter/README.md" in ray and ray == tree_digest(work / "cli-local")
    assert "--ray" not in (work / "cli-ray" / "adapter" / "README.md").read_text()


NO_RAY = """
import sys, runpy
sys.argv = ["lora-convert", *sys.argv[1:]]
if sys.argv[-1] == "--ray=local":
    sys.modules["ray"] = None  # as if not installed: importing it raises ImportError
try:
    runpy.run_module("lora_convert.cli", run_name="__main__")
except SystemExit as e:
    print(f"EXIT {e.code}", file=sys.stderr)
print("RAY_IMPORTED" if sys.modules.get("ray") is not None else "NO_RAY", file=sys.stderr)
"""


def test_extract_without_ray_never_imports_it_and_ray_uninstalled_is_one_error(tmp_path):
    def extract(out: str, *more: str) -> subprocess.CompletedProcess:
        args = ["extract", TUNED, "--base", BASE, "--rank", "2", "-o", str(tmp_path / out), *more]
        return subprocess.run([sys.executable, "-c", NO_RAY, *args], capture_output=True, text=True, cwd=ROOT)

    plain = extract("plain")
    assert plain.stderr.splitlines()[-2:] == ["EXIT 0", "NO_RAY"], plain.stderr
    assert (tmp_path / "plain" / "adapter_model.safetensors").is_file()
    missing = extract("ray", "--ray=local")
    lines = missing.stderr.splitlines()
    assert lines[-2:] == ["EXIT 2", "NO_RAY"], missing.stderr
    assert [ln for ln in lines[:-2] if ln.strip()] == ["error: --ray needs Ray: pip install 'lora-convert[ray]'"]
    assert not (tmp_path / "ray").exists() and [p.name for p in tmp_path.iterdir()] == ["plain"]
