"""``batch --ray``: jobs as Ray tasks, on a local Ray (the CLI's ``--ray local``) and on a two-node cluster
(``ray.cluster_utils.Cluster``) that loses a node mid-run.  Outputs byte for byte the local pool's.

Every Ray address must be on the loopback (127.0.0.1): this workplace flags traffic to any other address, and Ray
advertises the machine's interface address by default (``node_ip_address="127.0.0.1"`` alone does not keep the
head off it).  So all of Ray runs in a child inside a network namespace that holds only loopback
(``unshare -n``), where Ray falls back to 127.0.0.1; the child asserts every node's NodeManagerAddress is
``127.*`` before it runs anything, and reports back as JSON.  Without the right to make a namespace (not root),
the tests skip and say so.  One child for the whole module: Ray's start-up is the slow part.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import FIXTURES, ROOT, loopback_namespace_unavailable, tree_digest

from lora_convert.io.output import TMP_MARK

BASE, LORA = str(FIXTURES / "tiny-llama-base"), str(FIXTURES / "tiny-llama-lora")
JOBS = [
    f"merge {LORA} --base {BASE} -o out/m-{dtype}-{w} --dtype {dtype} --adapter {LORA}:{w}"
    for dtype in ("bf16", "fp32", "fp16")
    for w in ("0.5", "2")
] + [f"merge {LORA} --base {FIXTURES}/no-such-base -o out/bad"]

# Loaded by every Python of the cluster (PYTHONPATH): in a Ray worker with LC_SLOW set, each tensor written waits
# LC_SLOW seconds, and each output started leaves a note NODE_ID.PID.NS in LC_NOTES: a job is seen mid-run, on
# its node, long enough to lose that node under it.
SITECUSTOMIZE = r"""
import os, sys
if os.environ.get("LC_SLOW") and "default_worker" in (sys.argv[0] if sys.argv else ""):
    import time
    import lora_convert.io.writer as w
    orig_write, orig_init = w.SafetensorsWriter.write, w.SafetensorsWriter.__init__
    def init(self, *a, **k):
        orig_init(self, *a, **k)
        import ray
        node = ray.get_runtime_context().get_node_id()
        open(os.path.join(os.environ["LC_NOTES"], f"{node}.{os.getpid()}.{time.time_ns()}"), "w").close()
    def write(self, name, data):
        orig_write(self, name, data)
        time.sleep(float(os.environ["LC_SLOW"]))
    w.SafetensorsWriter.__init__, w.SafetensorsWriter.write = init, write
"""

CHILD = r"""
import json, os, subprocess, sys, threading, time
from pathlib import Path

work = Path(sys.argv[1])
os.chdir(work / "ray-local")
rep = {}
# 1. the CLI with --ray local: it starts its own Ray here (on 127.0.0.1: nothing else exists in this namespace)
run = subprocess.run([sys.executable, "-m", "lora_convert.cli", "batch", "jobs.yaml", "--ray", "local", "--json"],
                     capture_output=True, text=True, timeout=400)
rep["local"] = {"rc": run.returncode, "doc": json.loads(run.stdout) if run.stdout.strip() else None,
                "stderr": run.stderr[-3000:]}

# 2. a two-node cluster (one CPU each) that loses its second node while a job runs there
import ray
from ray.cluster_utils import Cluster

os.chdir(work / "ray-cluster")
os.environ.update(LC_SLOW="0.25", LC_NOTES=str(work / "notes"),
                  PYTHONPATH=os.pathsep.join([str(work / "site"), os.environ.get("PYTHONPATH", "")]))
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
node2 = cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, log_to_driver=False)
cluster.wait_for_nodes()
rep["addresses"] = sorted(n["NodeManagerAddress"] for n in ray.nodes())
if not all(a.startswith("127.") for a in rep["addresses"]):
    print(json.dumps(rep)); sys.exit(3)  # never run anything on another address
rep["address"] = cluster.address
rep["node2"] = node2.node_id

import lora_convert as lc
from lora_convert.cli_args import parse_job as _job

# 3. one merge split by output shard over both nodes (before the node is lost): the local run's bytes
lc.merge(sys.argv[2], base=sys.argv[3], output="shards-local", max_shard_size="40KB")
res = lc.merge(sys.argv[2], base=sys.argv[3], output="shards-ray", max_shard_size="40KB", ray=cluster.address)
rep["shards"] = {"files": res.files, "notes": sorted(os.listdir(work / "notes"))}
for n in os.listdir(work / "notes"):
    os.unlink(work / "notes" / n)

jobs = [_job(line, "jobs.yaml") for line in lc.read_jobs("jobs.yaml")]
done = {}
t = threading.Thread(target=lambda: done.update(res=lc.batch(jobs, state="jobs.yaml.state", ray=cluster.address)))
t.start()
notes, t0 = work / "notes", time.monotonic()
while time.monotonic() - t0 < 300:  # node 2's second job has begun writing: remove node 2 under it
    if len([n for n in os.listdir(notes) if n.startswith(node2.node_id)]) >= 2:
        break
    time.sleep(0.02)
rep["removed_after_notes"] = sorted(os.listdir(notes))
cluster.remove_node(node2)
rep["removed_at"] = time.monotonic() - t0
t.join(400)
rep["cluster"] = done["res"].to_dict() if "res" in done else None
rep["notes"] = sorted(os.listdir(notes))
ray.shutdown()
cluster.shutdown()
print(json.dumps(rep))
"""


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory):
    why = loopback_namespace_unavailable()
    if why:
        pytest.skip(f"Ray runs only inside a loopback-only network namespace here: {why}")
    work = tmp_path_factory.mktemp("ray")
    jobs_yaml = "".join(f"- {json.dumps(j)}\n" for j in JOBS)
    for sub in ("pool", "ray-local", "ray-cluster", "notes", "site"):
        (work / sub).mkdir()
        (work / sub / "jobs.yaml").write_text(jobs_yaml, encoding="utf-8")
    (work / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    (work / "notes" / "jobs.yaml").unlink()
    pool = subprocess.run(  # the reference: the same jobs in the local pool
        [sys.executable, "-m", "lora_convert.cli", "batch", "jobs.yaml", "--json"],
        cwd=work / "pool",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pool.returncode == 1, pool.stderr  # the bad job
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run(
        [
            "unshare",
            "-n",
            "bash",
            "-c",
            'ip link set lo up && exec "$0" -c "$@"',
            sys.executable,
            CHILD,
            work,
            LORA,
            BASE,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=ROOT,
    )
    assert child.stdout.strip(), child.stderr[-3000:]
    rep = json.loads(child.stdout.strip().splitlines()[-1])
    assert child.returncode == 0, (rep, child.stderr[-3000:])
    return work, rep


def _statuses(doc: dict) -> list[str]:
    return [j["status"] for j in doc["jobs"]]


def test_ray_local_runs_every_job_on_loopback_as_the_pool_does(ray_run):
    work, rep = ray_run
    local = rep["local"]
    assert local["rc"] == 1, local["stderr"]  # the bad job fails, alone
    doc = local["doc"]
    assert doc["runner"] == "ray local"
    assert _statuses(doc) == ["done"] * 6 + ["failed"]
    assert doc["jobs"][-1]["error"].endswith("no-such-base: no such file or folder")
    assert all(j["node"].startswith("127.") for j in doc["jobs"])  # NodeManagerAddress/NODE_ID of each task
    assert tree_digest(work / "ray-local" / "out") == tree_digest(work / "pool" / "out")


def test_two_node_cluster_survives_losing_a_node_mid_run(ray_run):
    work, rep = ray_run
    assert len(rep["addresses"]) == 2 and all(a.startswith("127.") for a in rep["addresses"])
    assert rep["address"].startswith("127.")
    doc = rep["cluster"]
    assert doc is not None, rep
    assert _statuses(doc) == ["done"] * 6 + ["failed"], doc
    # tasks ran on both nodes: node 2 began two outputs (the second killed under it), the head the others
    began = [n.split(".")[0] for n in rep["notes"]]
    assert began.count(rep["node2"]) == 2 and len(set(began)) == 2
    assert len(began) == 7  # six outputs, the one lost begun twice; the bad job writes nothing
    on = [j["node"].split("/")[1] for j in doc["jobs"][:6]]
    assert on.count(rep["node2"]) == 1  # its first job finished there; the lost one was rerun on the head
    assert tree_digest(work / "ray-cluster" / "out") == tree_digest(work / "pool" / "out")
    assert not [p for p in (work / "ray-cluster" / "out").iterdir() if TMP_MARK in p.name]  # no temp folder left


def test_one_merge_split_by_shard_over_two_nodes_is_the_local_output(ray_run):
    """``merge --ray``: a task per output shard (3 here), on both nodes; driver writes index, config, card."""
    work, rep = ray_run
    shards = rep["shards"]
    assert [f for f in shards["files"] if f.endswith(".safetensors")] == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    assert len(shards["notes"]) == 3  # one writer per shard, each in a Ray worker
    assert len({n.split(".")[0] for n in shards["notes"]}) == 2  # on both nodes
    local, ray = tree_digest(work / "ray-cluster" / "shards-local"), tree_digest(work / "ray-cluster" / "shards-ray")
    assert "model.safetensors.index.json" in ray and "README.md" in ray
    assert local == ray


def test_merge_ray_is_left_out_of_the_model_card(tmp_path):
    """Where a merge ran is not what it is: ``--ray ADDRESS`` is not quoted in the card (no Ray started here: the
    command line alone, as the card gets it)."""
    from lora_convert.cli_args import command_line as _command_line

    line = _command_line(["merge", "a", "--ray", "127.0.0.1:6379", "-o", "b", "--ray=auto", "--token", "t"])
    assert line == "lora-convert merge a -o b --token '***'"
