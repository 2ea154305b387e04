"""Jobs as Ray tasks (``batch --ray ADDRESS``): the only module that imports ray, and only when asked to.

Each job is one task running :func:`.fleet.run_job` (the same function a local pool worker runs), with one CPU and
the memory its footprint needs requested (:func:`.fleet.footprint`, capped at the largest node's), and retried by
Ray when its worker or node dies (``max_retries``): the API writes outputs atomically, so a task killed half-way
leaves a marked temporary folder that the retry's own run cleans up, and nothing published.  A job's own failure
is not retried: it is its error line, returned like any outcome.  The driver gathers every outcome as it comes.

Every node must see the jobs' inputs and outputs at the same paths (a shared filesystem), and run the same
lora-convert (installed on each node, or the driver's environment on a cluster started here).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .errors import OptionError
from .fleet import Job, Outcome, Runner, lost, run_job

#: Ray retries a task this many times when its worker process or node dies (not when the job itself fails).
TASK_RETRIES = 3


def connect(address: str) -> bool:
    """Connect this process to Ray at ``address`` (``auto``, ``local``: start one here, or a cluster's address),
    unless it already is; True when this call connected (and the caller shuts it down)."""
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")  # not Ray's C++ warnings on our terminal
    try:
        import ray
    except ImportError:
        raise OptionError("--ray needs Ray: pip install 'lora-convert[ray]'") from None
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, ValueError, RuntimeError) as e:
        msg = " ".join(str(e).split())[:300]
        raise OptionError(f"--ray {address}: cannot start or reach a Ray cluster: {msg}") from None
    return True


class RayRunner(Runner):
    """Jobs submitted to Ray as they become ready (Ray queues what its nodes cannot take yet)."""

    def __init__(self, address: str, workers: int | None) -> None:
        import ray

        self._owned = connect(address)
        self.name = f"ray {address}"
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = min(cpus, workers) if workers else cpus
        self._largest = max(
            (int(n.get("Resources", {}).get("memory", 0)) for n in ray.nodes() if n.get("Alive")), default=0
        )
        self._held: dict[Any, Job] = {}
        self._task = ray.remote(run_job)

    def fits(self, need: int, running: int) -> bool:
        return running < self.workers

    def submit(self, job: Job, need: int) -> None:
        memory = min(need, self._largest) if self._largest else need
        ref = self._task.options(num_cpus=1, memory=memory, max_retries=TASK_RETRIES, name=f"job {job.name}").remote(
            job
        )
        self._held[ref] = job

    def wait(self, timeout: float) -> list[Outcome]:
        import ray

        if not self._held:
            return []
        ready, _ = ray.wait(list(self._held), num_returns=1, timeout=timeout)
        got = []
        for ref in ready:
            job = self._held.pop(ref)
            try:
                got.append(ray.get(ref))
            except ray.exceptions.RayError as e:  # retries spent: the node or worker kept dying
                got.append(lost(job, f"its Ray task failed ({type(e).__name__}) after {TASK_RETRIES} retries"))
        return got

    def close(self) -> None:
        import ray

        for ref in self._held:
            ray.cancel(ref, force=True)
        if self._owned:
            ray.shutdown()


# -- one merge across the cluster: a task per output shard --------------------------------------------------------
def shard_run(address: str, reopen: dict[str, Any]) -> Any:
    """``merge --ray``: the function :func:`.assemble.write_output` calls instead of writing the tensors itself.  Each
    output shard is one task that opens the inputs again from ``reopen`` (the paths and options: every node reads
    them from storage it sees), plans the same merge, and writes that shard's file into the run's temporary folder
    (the same bytes as the local writer: the same plan, the same header, the same order).  The driver then writes
    the index; the assembly adds config, card, and publishes with its atomic rename."""
    from pathlib import Path

    from .io.writer import SafetensorsSink, SafetensorsWriter
    from .routes.plan import Plan

    def run(plan: Plan, tmp: Path, sink: SafetensorsSink) -> list[str]:
        import ray

        owned = connect(address)
        try:
            planned = [j.planned for j in plan.jobs if j.writes]
            shape: dict[str, Any] = {
                "max_shard_size": sink.max_shard_size,
                "stem": sink.stem,
                "metadata": sink.metadata,
            }
            writer = SafetensorsWriter(tmp, planned, **shape)
            task = ray.remote(_write_shard).options(num_cpus=1, max_retries=TASK_RETRIES)
            refs = [task.remote(dict(reopen), str(Path(tmp).resolve()), si, shape) for si in range(len(writer.shards))]
            try:
                ray.get(refs)
            except ray.exceptions.RayTaskError as e:  # the shard's own failure: the error it raised
                for ref in refs:
                    ray.cancel(ref, force=True)
                cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else None
                raise (cause or e) from None
            except ray.exceptions.RayError as e:
                raise OptionError(
                    f"--ray {address}: a shard's task failed ({type(e).__name__}) after retries"
                ) from None
            writer.write_index()
            return list(writer.files)
        finally:
            if owned:
                ray.shutdown()

    return run


def _write_shard(reopen: dict[str, Any], tmp: str, si: int, shape: dict[str, Any]) -> str:
    """One output shard of a merge, in a Ray task: the plan made again from the inputs, its shard's jobs run."""
    from pathlib import Path

    from .fleet import threads_as_alone
    from .io.writer import SafetensorsWriter
    from .pipeline import execute
    from .requests import open_request
    from .routes import planner

    threads_as_alone()
    to = reopen.pop("to")
    source = reopen.pop("source")
    with open_request(source, to, **reopen) as (req, _):
        plan = planner(req.inventory.form, to, path=req.source.root)(req)
        planned = [j.planned for j in plan.jobs if j.writes]
        writer = SafetensorsWriter(Path(tmp), planned, only=si, **shape)
        names = {e.name for e in writer.shards[si]}
        jobs = [j for j in plan.jobs if j.writes and j.planned.name in names]
        execute(jobs, _Only(writer))
    return writer.files[si]


class _Only:
    """A sink around a one-shard writer (the jobs given to it are that shard's)."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def open(self, plan: list[Any]) -> None:
        pass

    def write(self, name: str, data: Any) -> None:
        self.writer.write(name, data)

    def close(self) -> list[str]:
        return list(self.writer.close())

    def abort(self) -> None:
        self.writer.abort()


# -- one extraction across the cluster: a task per group of modules ------------------------------------------------
#: ``extract --ray`` splits the pass into this many groups per task the cluster can run at once (uneven SVD times
#: even out; each group opens the inputs again, a few headers).
GROUPS_PER_SLOT = 2


def prepass_run(address: str, reopen: dict[str, Any]) -> Any:
    """``extract --ray``: the function :func:`.assemble.write_output` calls instead of running the extraction's
    pre-pass here.  Its jobs (one per changed tensor or expert: ΔW formed, factored) are split into groups of about
    equal matrix size, each a Ray task that opens the inputs again from ``reopen`` (paths every node sees), plans
    the same extraction and runs its group's jobs with the driver's torch thread count (the SVD's bits depend on
    it), returning the factors and report numbers; the driver gathers them into the pass, and the assembly writes
    the adapter as ever (the local run's bytes)."""
    from .progress import progress_bar

    try:
        import ray  # noqa: F401  (refused before the output is begun)
    except ImportError:
        raise OptionError("--ray needs Ray: pip install 'lora-convert[ray]'") from None

    def run(pre: Any, progress: bool) -> None:
        import ray

        owned = connect(address)
        try:
            threads = pre.threads() or 1
            cpus = int(ray.cluster_resources().get("CPU", 1))
            widest = max((int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1)
            per_task = max(1, min(threads, widest))  # a node's cores for the SVD's threads, as the local run has
            with progress_bar(progress, pre.size(), pre.label, unit=pre.unit) as advance:
                jobs = pre.jobs(advance)  # (not run here: their names and sizes; shape changes are counted now)
                groups = _groups(pre.weights(jobs), max(1, cpus // per_task) * GROUPS_PER_SLOT)
                task = ray.remote(_extract_group).options(
                    num_cpus=per_task, max_retries=TASK_RETRIES, scheduling_strategy="SPREAD"
                )
                held = {task.remote(dict(reopen), g, [jobs[i].name for i in g], threads): len(g) for g in groups if g}
                try:
                    while held:
                        ready, _ = ray.wait(list(held), num_returns=1)
                        for ref in ready:
                            pre.absorb(ray.get(ref))
                            advance(held.pop(ref))
                except ray.exceptions.RayTaskError as e:  # the group's own failure: the error it raised
                    cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else None
                    raise (cause or e) from None
                except ray.exceptions.RayError as e:
                    raise OptionError(
                        f"--ray {address}: an extraction task failed ({type(e).__name__}) after retries"
                    ) from None
                finally:
                    for ref in held:
                        ray.cancel(ref, force=True)
        finally:
            if owned:
                ray.shutdown()

    return run


def _groups(weights: list[int], n: int) -> list[list[int]]:
    """Job indices in ``n`` groups of about equal total weight (the largest first, each to the lightest group),
    each in job order; deterministic."""
    n = max(1, min(n, len(weights)))
    load: list[int] = [0] * n
    out: list[list[int]] = [[] for _ in range(n)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        g = min(range(n), key=lambda g: (load[g], g))
        load[g] += weights[i]
        out[g].append(i)
    return [sorted(g) for g in out]


def _extract_group(reopen: dict[str, Any], indices: list[int], names: list[str], threads: int) -> dict[str, Any]:
    """One group of an extraction's jobs, in a Ray task: the pass planned again from the inputs, its jobs run with
    the driver's torch threads (Ray sets a task's OpenMP threads to its CPUs; the SVD rounds by the count)."""
    from .errors import RouteError
    from .pipeline import execute
    from .requests import open_request
    from .routes import planner

    to = reopen.pop("to")
    source = reopen.pop("source")
    with open_request(source, to, **reopen) as (req, _):
        pre: Any = planner(req.inventory.form, to, path=req.source.root)(req).prepass
        jobs = pre.jobs(lambda n: None)
        if [jobs[i].name for i in indices if i < len(jobs)] != names:
            raise RouteError("the inputs changed while the extraction ran on the cluster", path=req.source.root)
        execute([jobs[i] for i in indices], None, threads=threads, finish=getattr(pre, "finish", None))
        return dict(pre.outcome())
