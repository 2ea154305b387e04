"""Extraction's factorisations, run beside the pipeline's worker thread rather than inside it.

The worker forms each ΔW from read-ahead row blocks of both checkpoints (:mod:`..difference`) and hands it
here; ``workers`` threads factor the ΔWs (:mod:`..svd`) each on the pass's intra-op thread count
(:func:`plan_threads`: on two cores, two factorisations on one thread each rather than one on two).  Why: a
multi-threaded OpenMP kernel waits at each of its barriers for its other threads, and where other processes
share the cores those are often descheduled: the same SVDs then take several times the wall time, and the
waiting threads spin, several times the CPU time (bench/README.md, 2026-12-08: 5× the wall of one thread per
SVD on a machine with ~10 runnable processes on 2 cores).  One thread per factorisation has no barrier to
wait at.  The factors depend on the intra-op thread count only (a kernel's rounding), never on how many
factorisations run at once.

Memory: at most ``workers + 1`` ΔW buffers exist at once — one per factorising thread and the one the worker
is forming — each reused from task to task (a fresh ΔW per task would page-fault its way in every time).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

MAX_WORKERS = 4  # factorisations at once (each a ΔW held in memory; fleet.footprint counts them)


def plan_threads(cpus: int | None = None) -> tuple[int, int]:
    """(factorising threads, torch intra-op threads each) for ``cpus`` cores (default: torch's thread count, the
    cores unless OMP_NUM_THREADS or torch.set_num_threads says fewer): every core busy, at most
    :data:`MAX_WORKERS` ΔW factored at once."""
    cpus = max(1, cpus or torch.get_num_threads())
    workers = min(cpus, MAX_WORKERS)
    return workers, max(1, cpus // workers)


class Factoring:
    """A pool of ``workers`` threads for factorisations, and the ΔW buffers they take in turn.

    :meth:`delta` gives the worker a buffer to form a ΔW in (waiting while all are taken); :meth:`submit` runs
    a factorisation of one (or of a tensor of the caller's own) on the pool and gives its buffer back once done;
    :meth:`finish` waits for every one and raises the first failure, which :meth:`submit` also raises at its next
    call (the pipeline's worker then stops, as when it factored itself)."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self._free: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        for _ in range(self.workers + 1):
            self._free.put(torch.empty(0, dtype=torch.uint8))
        self._owner: dict[int, torch.Tensor] = {}  # storage address of a buffer in use -> the buffer
        self._slots = threading.Semaphore(self.workers)  # factorisations submitted and not finished
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[Future[None]] = []
        self._failed: BaseException | None = None

    def delta(self, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A ΔW buffer of ``shape``, grown when too small; waits while all ``workers + 1`` are in use."""
        self._raise()
        raw = self._free.get()
        n = shape[0] * shape[1] * dtype.itemsize
        if raw.numel() < n:
            raw = torch.empty(max(n, 1), dtype=torch.uint8)
        self._owner[raw.untyped_storage().data_ptr()] = raw
        return raw[:n].view(dtype).view(shape)

    def give_back(self, delta: torch.Tensor) -> None:
        """A buffer of :meth:`delta`'s that is not handed to :meth:`submit` after all."""
        raw = self._owner.pop(delta.untyped_storage().data_ptr(), None)
        if raw is not None:
            self._free.put(raw)

    def submit(self, delta: torch.Tensor, fn: Callable[[], None]) -> None:
        """Run ``fn`` (which factors ``delta``) on the pool; ``delta``'s buffer, if it is one of
        :meth:`delta`'s, is given back when ``fn`` returns or raises."""
        self._raise()
        self._slots.acquire()
        if self._pool is None:  # its threads take the thread count the pipeline set (torch's, and OpenMP's and
            # MKL's in each thread: a thread of its own would otherwise run LAPACK on the process's default count)
            self._pool = ThreadPoolExecutor(
                self.workers,
                thread_name_prefix="lora-convert-factor",
                initializer=torch.set_num_threads,
                initargs=(torch.get_num_threads(),),
            )

        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                if self._failed is None:
                    self._failed = exc
                raise
            finally:
                self.give_back(delta)
                self._slots.release()

        self._futures.append(self._pool.submit(run))

    def finish(self) -> None:
        """Wait for every factorisation submitted; raise the first that failed."""
        try:
            for f in self._futures:
                f.exception()  # waits; the failure itself is kept in _failed, in the order failures happened
        finally:
            self._futures.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        self._raise()

    def _raise(self) -> None:
        if self._failed is not None:
            raise self._failed
