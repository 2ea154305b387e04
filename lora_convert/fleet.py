"""``lora-convert batch JOBS``: a fleet of our commands, run through the Python API, each job on its own.

A job file (YAML, or JSON Lines) lists command lines of ``merge``, ``convert``, ``extract``, ``verify``,
``combine`` and ``push``; the CLI parses each with the command's own options into the keywords of its
:mod:`.api` function (a :class:`Job`), and :func:`run_batch` runs them:

* in a local pool of worker processes sized to the cores and to the memory the jobs' footprints need
  (:func:`footprint`), or as Ray tasks (:mod:`.cluster`, only with ``ray=``: nothing else imports ray);
* one job's failure is its one ``error:`` line (:func:`~lora_convert.errors.error_line`) and stops no other;
  a job whose input is another job's output waits for it, and is not run when that one failed;
* each job's output is atomic as with the single command (the same API call writes it), and its
  byte-identical: the model card quotes the job's own command line, as the single command quotes its own;
* a finished job leaves a record in the state folder (``<JOBS>.state/``, one JSON file per job, named by a
  hash of its command line): what identified its inputs and what it wrote.  A rerun skips a job whose record
  still matches.  What it identifies, honestly: every input file's relative path, size and mtime, the hash
  of each safetensors header (names, dtypes, shapes, offsets) and of every other file up to 1 MiB (configs);
  the output's files with their sizes and mtimes; the command line.  Tensor bytes rewritten in place with the
  same size, header and mtime would go unnoticed; a Hub id or an adapter name inside a source is
  identified by its text alone (no network).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import LoraConvertError, OptionError, error_line

#: The commands a job may run (each an :mod:`.api` function of the same name).
JOB_COMMANDS = ("merge", "convert", "extract", "verify", "combine", "push")
MAX_JOB_FILE = 16 << 20  # a job file is a list of command lines: 16 MiB is ~100k jobs
MAX_JOBS = 100_000
HASHED_WHOLE = 1 << 20  # other input files (configs, tokenizers) up to this size are hashed whole
HEADER_MAX = 100 << 20  # safetensors' own limit on a header
# A worker process: the interpreter with torch imported (~400 MB resident), plus the pipeline's pools, scratch
# tiles and queues (~60 MB: pipeline.py).  What a route needs beyond that is in footprint().
PROCESS_BYTES = 512 << 20
STATE_VERSION = 1


@dataclass(frozen=True)
class JobLine:
    """A job as the file gives it: its place (1-based), its name and its command line (after ``lora-convert``)."""

    index: int
    name: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class Job:
    """A job ready to run: the :mod:`.api` function ``command`` and its keywords (the CLI's parse of ``argv``)."""

    index: int
    name: str
    command: str
    argv: tuple[str, ...]
    kwargs: dict[str, Any]

    @property
    def output(self) -> str | None:
        out = self.kwargs.get("output")
        return None if out is None or self.kwargs.get("dry_run") else str(out)

    def inputs(self) -> list[str]:
        """What the job reads, as given: paths, Hub ids or adapter names (``REF[:WEIGHT]`` without the weight
        when REF alone is a path)."""
        found: list[str] = []
        for key in ("source", "tuned", "merged", "folder", "base", "adapter", "adapters"):
            value = self.kwargs.get(key)
            for v in value if isinstance(value, list | tuple) else [value]:
                if isinstance(v, list | tuple):  # (REF, WEIGHT)
                    v = v[0] if v else None
                if isinstance(v, str | os.PathLike):
                    found.append(_ref_path(str(v)))
        return found

    def key(self) -> str:
        """The job's name in the state folder: a hash of its command line (the same line, the same record)."""
        return hashlib.sha256(json.dumps(list(self.argv)).encode()).hexdigest()[:24]


def _ref_path(ref: str) -> str:
    """``REF[:WEIGHT]``: REF where ``ref`` itself is no path but REF is."""
    if not os.path.exists(ref) and ":" in ref:
        head, _, tail = ref.rpartition(":")
        try:
            float(tail)
        except ValueError:
            return ref
        return head
    return ref


# -- the job file --------------------------------------------------------------------------------------------
def read_job_file(path: str | Path) -> list[JobLine]:
    """The jobs of ``path``: YAML (``.yaml``/``.yml``: a list, or a mapping with ``jobs:``) or JSON Lines (one job a
    line).  A job is a command line (a string, split as a shell would), a list of arguments, or a mapping with
    ``run`` (either) and an optional ``name``.  Anything else is an :class:`OptionError` naming the job."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_JOB_FILE + 1)
    except OSError as e:
        raise OptionError(f"cannot read the job file: {e.strerror or e}", path=p) from None
    if len(data) > MAX_JOB_FILE:
        raise OptionError(f"the job file is larger than {MAX_JOB_FILE >> 20} MiB", path=p)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise OptionError("the job file is not UTF-8 text", path=p) from None
    entries = _jsonl(text, p) if p.suffix.lower() in (".jsonl", ".ndjson") else _yaml(text, p)
    if not entries:
        raise OptionError("the job file lists no jobs", path=p)
    if len(entries) > MAX_JOBS:
        raise OptionError(f"the job file lists {len(entries)} jobs; at most {MAX_JOBS}", path=p)
    lines = [_job_line(i + 1, e, p) for i, e in enumerate(entries)]
    seen: dict[str, int] = {}
    for j in lines:
        if j.name in seen:
            raise OptionError(f"job {j.index}: the name {j.name!r} is job {seen[j.name]}'s too", path=p)
        seen[j.name] = j.index
    return lines


def _jsonl(text: str, p: Path) -> list[Any]:
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except ValueError as e:
            raise OptionError(f"line {n} is not JSON: {e}", path=p) from None
    return entries


def _yaml(text: str, p: Path) -> list[Any]:
    import yaml  # type: ignore[import-untyped]  # huggingface_hub's dependency too (pyproject names it)

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise OptionError(f"not valid YAML: {' '.join(str(e).split())}", path=p) from None
    if isinstance(doc, dict) and set(doc) == {"jobs"}:
        doc = doc["jobs"]
    if not isinstance(doc, list):
        raise OptionError("the job file must be a list of jobs (or a mapping with jobs:)", path=p)
    return doc


def _job_line(index: int, entry: Any, p: Path) -> JobLine:
    name = None
    if isinstance(entry, dict):
        unknown = set(entry) - {"run", "name"}
        if unknown or "run" not in entry:
            raise OptionError(f"job {index}: a job mapping has run: and an optional name:, not {sorted(entry)}", path=p)
        name, entry = entry.get("name"), entry["run"]
        if not isinstance(name, str | type(None)) or name == "":
            raise OptionError(f"job {index}: name must be a non-empty string", path=p)
    if isinstance(entry, str):
        try:
            argv = shlex.split(entry)
        except ValueError as e:
            raise OptionError(f"job {index}: {e}", path=p) from None
    elif isinstance(entry, list) and all(isinstance(a, str | int | float) and not isinstance(a, bool) for a in entry):
        argv = [str(a) for a in entry]
    else:
        raise OptionError(f"job {index}: a job is a command line, a list of arguments or a mapping with run:", path=p)
    if argv and argv[0] == "lora-convert":
        argv = argv[1:]
    if not argv or argv[0] not in JOB_COMMANDS:
        got = repr(argv[0]) if argv else "nothing"
        raise OptionError(f"job {index}: the command is {got}; one of {', '.join(JOB_COMMANDS)}", path=p)
    return JobLine(index, name or f"{index}:{argv[0]}", tuple(argv))


# -- what a job costs ----------------------------------------------------------------------------------------
def footprint(job: Job) -> int:
    """The peak memory a job is expected to need, in bytes, from the inputs' headers: a worker process and the
    pipeline's pools; extraction holds a changed matrix in fp32 once per factorising thread and once more where the
    next is formed (routes/factoring.py: as many threads as cores, at most 4), combine's svd methods three times
    (ΔW, and the factorisation's workspace); verify --logits two fp32 copies of the model."""
    need = PROCESS_BYTES
    if job.command == "extract" or (job.command == "convert" and job.kwargs.get("to") == "adapter"):
        need += (min(os.cpu_count() or 1, 4) + 1) * 4 * _largest_matrix(job.kwargs.get("base"))
    elif job.command == "combine" and str(job.kwargs.get("method", "")).endswith("svd"):
        need += 3 * 4 * _largest_matrix(None, adapters=job.inputs())
    elif job.command == "verify" and job.kwargs.get("logits"):
        need += 2 * 2 * _tensor_bytes(job.kwargs.get("base"))  # bf16 on disk -> fp32, twice
    return need


def _headers(path: Any) -> list[dict[str, Any]]:
    """The safetensors headers of a local checkpoint (a folder's files, or a file); [] for anything else."""
    if not isinstance(path, str | os.PathLike):
        return []
    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p] if p.suffix == ".safetensors" else []
    heads = []
    for f in files:
        raw = _header_bytes(f)
        if raw is None:
            continue
        try:
            heads.append(json.loads(raw[8:]))
        except ValueError:
            continue
    return heads


def _largest_matrix(path: Any, adapters: Iterable[str] = ()) -> int:
    """Elements of the largest changed matrix an SVD may see: of the base's 2-D tensors, or of an adapter's
    ΔW (B's rows × A's columns of its largest factors)."""
    best = 0
    for h in _headers(path):
        for k, v in h.items():
            shape = v.get("shape") if isinstance(v, dict) and k != "__metadata__" else None
            if isinstance(shape, list) and len(shape) == 2:
                best = max(best, int(shape[0]) * int(shape[1]))
    for a in adapters:
        rows = cols = 0
        for h in _headers(a):
            for k, v in h.items():
                shape = v.get("shape") if isinstance(v, dict) else None
                if isinstance(shape, list) and len(shape) == 2:
                    rows = max(rows, int(shape[0])) if "lora_B" in k else rows
                    cols = max(cols, int(shape[1])) if "lora_A" in k else cols
        best = max(best, rows * cols)
    return best


def _tensor_bytes(path: Any) -> int:
    total = 0
    for h in _headers(path):
        for k, v in h.items():
            offs = v.get("data_offsets") if isinstance(v, dict) and k != "__metadata__" else None
            if isinstance(offs, list) and len(offs) == 2:
                total += int(offs[1]) - int(offs[0])
    return total


def _header_bytes(f: Path) -> bytes | None:
    """The 8-byte length and the JSON header of a safetensors file (None where it is not one)."""
    try:
        with f.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return None
            n = int.from_bytes(head, "little")
            if n > HEADER_MAX:
                return None
            body = fh.read(n)
            return head + body if len(body) == n else None
    except OSError:
        return None


def available_memory() -> int:
    """Bytes of memory this machine can give new work (Linux: MemAvailable; otherwise the physical memory)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 8 << 30


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# -- what identifies a job's inputs and output ------------------------------------------------------------------
def fingerprint(path: str) -> dict[str, Any]:
    """What identifies one input: for a local file or folder, each file's size and mtime and the hash of its
    safetensors header (or of the whole file up to 1 MiB); otherwise (a Hub id, an adapter name) its text."""
    p = Path(path)
    if not p.exists():
        return {"ref": path}
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not _hidden(f, p))
    out: dict[str, Any] = {}
    for f in files:
        st = f.stat()
        rel = "." if f == p else f.relative_to(p).as_posix()
        entry: dict[str, Any] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        raw = _header_bytes(f) if f.suffix == ".safetensors" else None
        if raw is not None:
            entry["header_sha256"] = hashlib.sha256(raw).hexdigest()
        elif st.st_size <= HASHED_WHOLE:
            entry["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
        out[rel] = entry
    return {"path": str(p.resolve()), "files": out}


def _hidden(f: Path, root: Path) -> bool:
    """Our temporary folders and dot-files (a cache) are not part of a checkpoint."""
    return any(part.startswith(".") for part in f.relative_to(root).parts)


def listing(output: str | None) -> dict[str, Any] | None:
    """The files of a finished output (name: size, mtime): what a rerun checks is still there."""
    if output is None:
        return None
    p = Path(output)
    if p.is_file():
        st = p.stat()
        return {".": [st.st_size, st.st_mtime_ns]}
    if not p.is_dir():
        return {}
    return {
        f.relative_to(p).as_posix(): [f.stat().st_size, f.stat().st_mtime_ns]
        for f in sorted(p.rglob("*"))
        if f.is_file()
    }


def identity(job: Job) -> dict[str, Any]:
    """The job's command line and its inputs' fingerprints: a record of a finished job holds it."""
    return {"argv": list(job.argv), "inputs": {i: fingerprint(i) for i in job.inputs()}}


class State:
    """The state folder: one record per finished job (``KEY.json``, written atomically by the driver)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, job: Job) -> Path:
        return self.folder / f"{job.key()}.json"

    def _pending_path(self, job: Job) -> Path:
        return self.folder / f"{job.key()}.pending.json"

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) and rec.get("version") == STATE_VERSION else None

    def finished(self, job: Job) -> bool:
        """Whether ``job`` ran to the end with the inputs it has now, and its output is still what it wrote; or
        whether it published its output and the batch was stopped before recording it (:meth:`started`)."""
        rec = self._read(self.path(job))
        if rec is not None:
            return rec.get("identity") == identity(job) and rec.get("output") == listing(job.output)
        pending = self._read(self._pending_path(job))
        if pending is None or pending.get("output_existed") is not False or job.output is None:
            return False
        ident = identity(job)
        if pending.get("identity") != ident or not os.path.lexists(job.output):
            return False
        # the output appeared after this job started with these inputs, and outputs appear only whole (the
        # atomic rename): the job's own, published before a kill took the batch down, so it is recorded now
        self.record(job, ident)
        return True

    def started(self, job: Job) -> None:
        """Before ``job`` runs: its inputs' identity and whether its output was already there, so that a batch
        killed between the output's rename and its record still knows the output for this job's (see
        :meth:`finished`)."""
        self.forget(job)
        ident = identity(job)
        existed = job.output is not None and os.path.lexists(job.output)
        self._write(self._pending_path(job), {"version": STATE_VERSION, "identity": ident, "output_existed": existed})

    def record(self, job: Job, ident: dict[str, Any]) -> None:
        """``job`` finished with the inputs ``ident`` identified (taken before it ran)."""
        rec = {"version": STATE_VERSION, "job": job.name, "identity": ident, "output": listing(job.output)}
        self._write(self.path(job), rec)
        self._pending_path(job).unlink(missing_ok=True)

    def _write(self, path: Path, rec: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(rec, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)

    def forget(self, job: Job) -> None:
        self.path(job).unlink(missing_ok=True)
        self._pending_path(job).unlink(missing_ok=True)


def state_folder(jobs_file: str | Path) -> Path:
    p = Path(jobs_file)
    return p.with_name(p.name + ".state")


# -- running one job -------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What became of a job: ``done``, ``skipped`` (finished before, same inputs), ``failed`` (its one error
    line), ``blocked`` (an input is the output of a job that failed); where it ran and how long it took."""

    index: int
    name: str
    command: str
    status: str = "waiting"  # waiting, running, done, skipped, failed, blocked
    error: str | None = None
    output: str | None = None
    seconds: float | None = None
    node: str | None = None
    identity: dict[str, Any] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("identity")
        return d


def run_job(job: Job) -> Outcome:
    """Run one job through the API, in whatever process it lands in (a pool worker, a Ray task): never raises for
    the job's own failure, which becomes its one error line, as the single command would print it."""
    start = time.monotonic()
    res = Outcome(job.index, job.name, job.command, status="running", output=job.output, node=_where())
    try:
        res.identity = identity(job)
        threads_as_alone()
        from . import api

        result = getattr(api, job.command)(**job.kwargs)
        if job.command == "verify" and not result.ok:
            res.status, res.error = "failed", "not ok: " + result.summary()
        else:
            res.status = "done"
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure of a job is its one line, as the CLI prints it
        res.status, res.error = "failed", error_line(exc)
    res.seconds = time.monotonic() - start
    return res


def _where() -> str:
    """Where a job runs: ``ADDRESS/NODE_ID`` as a Ray task, else ``host:pid``."""
    import sys

    if "ray" in sys.modules:
        try:
            import ray

            if ray.is_initialized():  # the address the node advertises, and its id (nodes may share an address)
                return f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()}"
        except Exception:  # noqa: BLE001 - only a label
            pass
    return f"{socket.gethostname()}:{os.getpid()}"


def threads_as_alone() -> None:
    """Under Ray, torch's threads as a command run alone on this node would have them: Ray sets OMP_NUM_THREADS to a
    task's CPUs (1), and extraction's SVDs round differently with another thread count (LAPACK's blocking), so the
    output would not be the single command's byte for byte.  A local pool worker keeps the default as it is."""
    import sys

    if "ray" not in sys.modules:
        return
    try:
        import psutil  # type: ignore[import-untyped]  # Ray's own dependency; torch's default: physical cores

        n = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        n = os.cpu_count() or 1
    import torch

    torch.set_num_threads(n)


# -- the scheduler -------------------------------------------------------------------------------------------------
@dataclass
class BatchResult:
    """Every job's :class:`Outcome`, in the file's order, and where they ran."""

    jobs: list[Outcome]
    workers: int
    runner: str  # "local" or "ray ADDRESS"
    seconds: float = 0.0
    state: str | None = None

    @property
    def ok(self) -> bool:
        return all(j.status in ("done", "skipped") for j in self.jobs)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for j in self.jobs:
            counts[j.status] = counts.get(j.status, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "runner": self.runner,
            "workers": self.workers,
            "seconds": round(self.seconds, 3),
            "state": self.state,
            "counts": self.counts(),
            "jobs": [j.to_dict() for j in self.jobs],
        }


def dependencies(jobs: list[Job]) -> dict[int, set[int]]:
    """Job index -> the jobs whose output it reads (an input at or inside their output path)."""
    outs = {j.index: Path(j.output).resolve() for j in jobs if j.output is not None}
    deps: dict[int, set[int]] = {j.index: set() for j in jobs}
    for j in jobs:
        for i in j.inputs():
            p = Path(i).resolve()
            for k, o in outs.items():
                if k != j.index and (p == o or o in p.parents):
                    deps[j.index].add(k)
    return deps


class Runner:
    """Where jobs run: ``submit`` one, ``wait`` for some to finish (at most ``timeout`` seconds)."""

    workers: int
    name: str

    def fits(self, need: int, running: int) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    def submit(self, job: Job, need: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def wait(self, timeout: float) -> list[Outcome]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class LocalPool(Runner):
    """Worker processes on this machine (spawned: a clean interpreter each, reused from job to job).  At most
    ``workers`` jobs at once, and only as many as the memory their footprints add up to allows (one always runs,
    however large).  A worker that dies (killed, out of memory) fails the jobs it held; the pool is rebuilt."""

    def __init__(self, workers: int, memory: int) -> None:
        self.workers, self.memory, self.name = workers, memory, "local"
        self._held: dict[Any, tuple[Job, int]] = {}
        self._pool: Any = None  # started at the first job: a rerun that skips every job starts no process

    def _new_pool(self) -> Any:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # Each worker keeps torch's default threads, as the command alone has them: extraction's SVDs round
        # differently with another count, and the outputs must be the single command's byte for byte.
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def fits(self, need: int, running: int) -> bool:
        used = sum(n for _, n in self._held.values())
        return running == 0 or (running < self.workers and used + need <= self.memory)

    def submit(self, job: Job, need: int) -> None:
        if self._pool is None:
            self._pool = self._new_pool()
        self._held[self._pool.submit(run_job, job)] = (job, need)

    def wait(self, timeout: float) -> list[Outcome]:
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as wait_futures
        from concurrent.futures.process import BrokenProcessPool

        if not self._held:
            return []
        done, _ = wait_futures(list(self._held), timeout=timeout, return_when=FIRST_COMPLETED)
        got, broken = [], False
        for fut in done:
            job, _ = self._held.pop(fut)
            try:
                got.append(fut.result())
            except BrokenProcessPool:
                broken = True
                got.append(lost(job, "its worker process died (killed, or out of memory)"))
        if broken:
            for job, _ in list(self._held.values()):
                got.append(lost(job, "its worker process died (killed, or out of memory)"))
            self._held.clear()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
        return got

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def lost(job: Job, why: str) -> Outcome:
    return Outcome(job.index, job.name, job.command, status="failed", error=f"job {job.name}: {why}", output=job.output)


def run_batch(
    jobs: list[Job],
    *,
    state: str | Path | None,
    workers: int | None = None,
    ray: str | None = None,
    rerun: bool = False,
    on_change: Callable[[list[Outcome]], None] | None = None,
) -> BatchResult:
    """Run ``jobs`` (see the module's docstring); ``on_change`` is called with every job's outcome so far whenever
    one changes (a live table).  ``state``: the state folder (None: no records, nothing skipped); ``rerun``: run
    every job even where its record matches."""
    start = time.monotonic()
    if workers is not None and not 1 <= workers <= 1024:
        raise OptionError(f"--workers must be from 1 to 1024, not {workers}")
    book = State(Path(state)) if state is not None else None
    needs = {j.index: footprint(j) for j in jobs}
    runner: Runner
    if ray is not None:
        from .cluster import RayRunner

        runner = RayRunner(ray, workers)
    else:
        runner = LocalPool(min(workers or cores(), len(jobs)), int(available_memory() * 0.8))
    outcomes = {j.index: Outcome(j.index, j.name, j.command, output=j.output) for j in jobs}
    by_index = {j.index: j for j in jobs}
    deps = dependencies(jobs)
    pending = [j.index for j in jobs]
    running: set[int] = set()

    def changed() -> None:
        if on_change is not None:
            on_change([outcomes[j.index] for j in jobs])

    changed()
    try:
        while pending or running:
            progressed = False
            for i in list(pending):
                if any(outcomes[d].status in ("failed", "blocked") for d in deps[i]):
                    failed = sorted(outcomes[d].name for d in deps[i] if outcomes[d].status in ("failed", "blocked"))
                    outcomes[i].status, outcomes[i].error = "blocked", f"needs the output of {', '.join(failed)}"
                    pending.remove(i)
                    progressed = True
                    continue
                if any(outcomes[d].status not in ("done", "skipped") for d in deps[i]):
                    continue
                job = by_index[i]
                if book is not None and not rerun and book.finished(job):
                    outcomes[i].status = "skipped"
                    pending.remove(i)
                    progressed = True
                    continue
                if not runner.fits(needs[i], len(running)):
                    break  # in the file's order: a large job is not overtaken forever by small ones
                if book is not None:
                    book.started(job)
                runner.submit(job, needs[i])
                outcomes[i].status = "running"
                pending.remove(i)
                running.add(i)
                progressed = True
            if progressed:
                changed()
                continue
            if not running:  # what is left waits on itself: jobs that read each other's outputs
                for i in pending:
                    outcomes[i].status, outcomes[i].error = "blocked", "its inputs are outputs of jobs that wait for it"
                pending.clear()
                changed()
                break
            for res in runner.wait(timeout=0.5):
                running.discard(res.index)
                if res.status == "done" and book is not None and res.identity is not None:
                    book.record(by_index[res.index], res.identity)
                elif book is not None:
                    book.forget(by_index[res.index])  # failed: its output (if any) was there before it
                outcomes[res.index] = res
                changed()
    finally:
        runner.close()
    return BatchResult(
        [outcomes[j.index] for j in jobs],
        runner.workers,
        runner.name,
        time.monotonic() - start,
        str(book.folder) if book is not None else None,
    )


def check_job(job: Job) -> None:
    """A job the batch cannot run as asked (``--dry-run`` writes nothing to record): an OptionError."""
    if job.kwargs.get("dry_run"):
        raise OptionError(f"job {job.name}: --dry-run has no place in a batch (run it on its own)")


__all__ = [
    "JOB_COMMANDS",
    "BatchResult",
    "Job",
    "JobLine",
    "LoraConvertError",
    "Outcome",
    "read_job_file",
    "run_batch",
]
