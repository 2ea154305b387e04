"""Run tensor jobs through three overlapping stages: a reader thread that fetches the blocks every
job declared it will read, a worker thread that transforms them, and the calling thread that
writes the results.

Why stages: reading (``preadv``, and waiting for the disk), the tensor kernels and ``write`` all run
outside the GIL; one thread doing read + merge + write does them one after the other, as stages they
overlap (the profile that showed it is in bench/README.md).

Why buffer pools: a fresh tensor per block means the kernel maps and zeroes new pages for every
block (for a 2 GB merge, several times the checkpoint in page faults across reads, fp32 tiles and
outputs).  Reusing pooled buffers is faster on the compute side and keeps memory flat: the pools (a byte
budget each: ~50 MB of reads ahead, ~40 MB of output), the scratch tiles and the queues are all a
conversion ever holds.  Copies move flat byte ranges, so that bound holds whatever the shape; a merge block
is at least one row of a 2-D weight.

Why a side thread (2-core machines, where the kernels get one thread): the reader and the writer mostly
wait on the disk, and a merge is bound by its worker's kernels; the merge job hands every other row block to
the side thread (``Buffers.side``), which runs the same single-threaded kernels, so the bytes do not change
(issue 26, bench/README.md).

Jobs that write nothing (``Job.writes`` false: extraction's factorisations) run through the same
stages, so their reads are fetched ahead too; they hand their results back through their own state.

The reader follows the plan the jobs declare (``Job.reads``); reading past it, or leaving part of it
unread, is an error rather than a hang.  Read slots and output
slots are separate pools, so a reader that runs ahead can never starve the worker of output slots.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .io.direct import ALIGN
from .io.reader import Checkpoint
from .io.writer import PlannedTensor, TensorSink

QUEUE_DEPTH = 3  # blocks waiting for the writer
READ_SLOTS = 6  # largest blocks the reader may hold (two in the worker's hands; more of smaller ones: a byte budget)
READAHEAD = 64 << 20  # input bytes asked of the disk ahead of the reader (page cache, not RSS)
TILE_BYTES = 8 << 20  # largest pooled block (a merge's row block: lora_math.block_rows); larger ones are fresh
IN_PLACE = 2 << 20  # blocks this large are read straight into their slot; smaller ones through the 8 MB window
POOL_GRAIN = 256 << 10  # pooled buffers are made in multiples of this, so blocks of one tensor share them


class _Stopped(Exception):
    """The consumer went away: the other stages unwind quietly."""


class _Pool:
    """Reusable byte buffers, ``budget`` bytes of them at most: a request takes the smallest free buffer that
    holds it, or a new one while the budget allows, or drops free buffers that are too small to make room,
    or waits for one to come back.  So 1 MB blocks get several times as many buffers as 8 MB ones in the
    same memory.  A request larger than ``largest`` gets a fresh tensor."""

    def __init__(self, budget: int, largest: int, closed: threading.Event) -> None:
        self.budget, self.largest, self.closed = budget, largest, closed
        self._free: list[torch.Tensor] = []
        self._held = 0  # bytes of the buffers made and not dropped
        self._cond = threading.Condition()
        self.owns: dict[int, torch.Tensor] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = _nbytes(shape, dtype)
        if nbytes > self.largest:
            return torch.empty(shape, dtype=dtype)
        grain = min(POOL_GRAIN, self.largest)
        size = min(self.largest, max(grain, -(-nbytes // grain) * grain))
        with self._cond:
            while True:
                fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
                if fits:
                    raw = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
                    break
                if self._held + size <= self.budget or not self.owns:
                    raw = torch.empty(size, dtype=torch.uint8)
                    self._held += size
                    self.owns[raw.data_ptr()] = raw
                    break
                if self._free:  # free buffers too small for this block: dropped to make room
                    small = self._free.pop()
                    del self.owns[small.data_ptr()]
                    self._held -= small.numel()
                    continue
                if self.closed.is_set():
                    raise _Stopped()
                self._cond.wait(0.1)
        return raw[:nbytes].view(dtype).view(shape)

    def put(self, raw: torch.Tensor) -> None:
        with self._cond:
            self._free.append(raw)
            self._cond.notify()


def _get(q: queue.Queue[Any], closed: threading.Event) -> Any:
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            if closed.is_set():
                raise _Stopped() from None


def _put(q: queue.Queue[Any], item: Any, closed: threading.Event) -> None:
    while True:
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            if closed.is_set():
                raise _Stopped() from None


@dataclass(frozen=True)
class Read:
    """Rows ``start:stop`` of tensor ``key`` in ``ck``: one block a job will ask for, declared up front
    so that the reader stage can fetch it before the worker gets there."""

    ck: Checkpoint
    key: str
    start: int
    stop: int
    flat: bool = False  # start/stop count elements of the flattened tensor, not rows


class Buffers:
    """Where a job's blocks come from and go to.

    * ``read`` returns the next declared block, fetched by the reader stage (or read on the spot
      when no reader runs); the caller gives it back when done, or yields it to the writer;
    * ``out`` hands out an output block, which belongs to the writer until it is written;
    * ``scratch`` is private to the worker and reused from block to block (the fp32 tile);
    * ``give_back`` returns any pooled block to its pool (fresh tensors are simply dropped).
    """

    def __init__(
        self, out_slots: int | None = None, read_slots: int | None = None, slot_bytes: int | None = None
    ) -> None:
        self.closed = threading.Event()
        size = slot_bytes or TILE_BYTES
        self._out = _Pool((out_slots or QUEUE_DEPTH + 2) * (size + ALIGN), size + ALIGN, self.closed)  # (see out)
        self._read = _Pool((read_slots or READ_SLOTS) * (size + 2 * ALIGN), size + 2 * ALIGN, self.closed)
        self._scratch: dict[tuple[str, str], torch.Tensor] = {}
        self._fetched: queue.Queue[Any] | None = None  # the reader stage's output, when it runs
        self.side: ThreadPoolExecutor | None = None  # a second compute thread for the worker (see execute)
        self.file_offset: Callable[[str], int | None] | None = None  # the sink's, where it has one (see out)

    def out(self, shape: tuple[int, ...], dtype: torch.dtype, at: tuple[str, int] | None = None) -> torch.Tensor:
        """An output block of ``shape``/``dtype``; waits while the writer holds every slot.  ``at`` (the output
        tensor's name, the block's byte offset in it): the block is placed in its slot at the alignment of its
        place in the output file, so the writer can hand it to the disk from there (``StagedFile.write_at``)."""
        start = self.file_offset(at[0]) if at is not None and self.file_offset is not None else None
        if start is None:
            return self._out.take(shape, dtype)
        nbytes = _nbytes(shape, dtype)
        slot = self._out.take((nbytes + ALIGN,), torch.uint8)
        k = (start + at[1] - slot.data_ptr()) % ALIGN  # type: ignore[index]
        if k % dtype.itemsize:
            k = 0
        return slot[k : k + nbytes].view(dtype).view(shape)

    def read(self, r: Read) -> torch.Tensor:
        """The block ``r`` (which must be the next one declared), as a pooled tensor."""
        if self._fetched is None:
            return self.fetch(r)
        item = _get(self._fetched, self.closed)
        if isinstance(item, BaseException):
            raise item
        if item is _DONE:
            raise RuntimeError(f"read beyond the declared plan: {r.key}[{r.start}:{r.stop}]")
        got, block = item
        if got != r:
            raise RuntimeError(
                f"read out of declared order: asked {r.key}[{r.start}:{r.stop}], "
                f"the reader fetched {got.key}[{got.start}:{got.stop}]"
            )
        return block

    def finish(self) -> None:
        """After the last job: every declared read must have been consumed (a job that read fewer
        blocks than it declared would otherwise pass unnoticed, or leave the reader waiting)."""
        if self._fetched is None:
            return
        item = _get(self._fetched, self.closed)
        if isinstance(item, BaseException):
            raise item
        if item is not _DONE:
            got = item[0]
            raise RuntimeError(f"declared read never consumed: {got.key}[{got.start}:{got.stop}]")

    def fetch(self, r: Read) -> torch.Tensor:
        """The block ``r``, read into a pooled slot: straight from the disk into it where the file allows
        (``Checkpoint.read_block``: the slot's spare bytes around the block take the direct read's alignment)."""
        nbytes = r.ck.span(r.key, r.start, r.stop, flat=r.flat)[1]
        if nbytes >= IN_PLACE:
            slot = self._read.take((nbytes + 2 * ALIGN,), torch.uint8)
            return r.ck.read_block(r.key, r.start, r.stop, slot, flat=r.flat)
        info = r.ck.info(r.key)
        slot = self._read.take((nbytes,), torch.uint8).view(info.dtype)
        return (r.ck.read_flat if r.flat else r.ck.read_rows)(r.key, r.start, r.stop, out=slot)

    def give_back(self, block: torch.Tensor) -> None:
        ptr = block.untyped_storage().data_ptr()
        for pool in (self._out, self._read):
            raw = pool.owns.get(ptr)
            if raw is not None:
                pool.put(raw)
                return

    def scratch(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
        """A worker-private tensor for ``role`` on ``device``, grown when too small."""
        nbytes = _nbytes(shape, dtype)
        have = self._scratch.get((role, device))
        if have is None or have.numel() < nbytes:
            have = self._scratch[(role, device)] = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
        return have[:nbytes].view(dtype).view(shape)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * dtype.itemsize


@dataclass
class Job:
    """One output tensor: its plan (name, dtype, shape) and a generator of its row blocks.

    ``blocks(buffers)`` yields the tensor's data in order, as whole tensors or blocks of rows.  It
    takes its input blocks with ``buffers.read`` — exactly the ones ``reads()`` declares, in that
    order — and its output blocks from ``buffers.out``; anything else it reads directly (small
    tensors: LoRA factors, biases).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    blocks: Callable[[Buffers], Iterator[torch.Tensor]]
    op: str = "copy"
    reads: Callable[[], list[Read]] = lambda: []
    writes: bool = True  # False: a job that only computes (it yields no blocks and is not planned)

    @property
    def planned(self) -> PlannedTensor:
        return PlannedTensor(self.name, self.dtype, self.shape)


def execute(
    jobs: list[Job],
    sink: TensorSink | None,
    *,
    progress: Callable[[int], None] | None = None,
    threads: int | None = None,
    finish: Callable[[], None] | None = None,
) -> list[str]:
    """Stream every job's blocks into ``sink``; returns the names of the files it wrote.

    ``progress`` is called with the bytes of each block written.  ``threads`` is torch's thread count
    for the jobs' kernels; by default one core is left to the reader and the writer, whose copies into
    and out of the page cache need a CPU of their own (oversubscribed OpenMP workers spin against
    the writer: same wall time, far more CPU time).  Jobs whose kernels dominate (an SVD) take all.  ``finish`` is
    called once every job ran, while ``threads`` still holds (jobs that hand work to threads of their own wait
    for it there: extraction's factorisations)."""
    planned = [j.planned for j in jobs if j.writes]
    if planned and sink is None:
        raise ValueError("jobs that write need a sink")
    if sink is not None:
        sink.open(planned)
    buffers = Buffers()
    buffers.file_offset = getattr(sink, "file_offset", None)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or max(1, min(before, (os.cpu_count() or 2) - 1)))
    if torch.get_num_threads() == 1 and (os.cpu_count() or 1) > 1:
        # The kernels run on one thread (a 2-core machine: one core left to the reader and the writer), yet
        # those two mostly wait on the disk: a job may hand every other block to this thread (merge_engine).
        buffers.side = ThreadPoolExecutor(1, thread_name_prefix="lora-convert-side")
    try:
        for name, block in _stages(jobs, buffers):
            assert sink is not None
            sink.write(name, block)
            if progress is not None:
                progress(block.numel() * block.element_size())
            buffers.give_back(block)
        if finish is not None:
            finish()
        return sink.close() if sink is not None else []
    finally:
        if buffers.side is not None:
            buffers.side.shutdown(wait=True)  # a block it still computes ends before its buffers go
        torch.set_num_threads(before)
        if sink is not None:
            sink.abort()


_DONE = object()


def _stages(jobs: list[Job], buffers: Buffers) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, block) for every job in order, read and made by two worker threads.

    An exception in either thread is re-raised here, in the caller's thread, with its original type
    (AdapterError, CheckpointError...).  If the caller stops early (a write failed), both threads are
    told to stop and joined before the exception propagates: no thread outlives the call.
    """
    made: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_DEPTH)
    fetched: queue.Queue[Any] = queue.Queue(maxsize=READ_SLOTS)  # also bounds oversized (fresh) blocks
    buffers._fetched = fetched
    closed = buffers.closed

    def read_all() -> None:
        try:
            plan = [r for j in jobs for r in j.reads()]
            sizes = [r.ck.span(r.key, r.start, r.stop, flat=r.flat)[1] for r in plan]
            asked, window = 0, 0  # plan[:asked] requested from the disk; bytes of those not yet read
            for i, r in enumerate(plan):
                # Keep READAHEAD bytes requested ahead (POSIX_FADV_WILLNEED): the disk keeps working
                # while this thread waits for a free slot; the kernel's own readahead stalls with
                # the reader (bench/README.md).  Blocks read around the page cache (io/direct.py) skip
                # the hint: they are already read one large window at a time.
                while asked < len(plan) and window < READAHEAD:
                    q = plan[asked]
                    q.ck.prefetch(q.key, q.start, q.stop, flat=q.flat)
                    window += sizes[asked]
                    asked += 1
                _put(fetched, (r, buffers.fetch(r)), closed)
                window -= sizes[i]
            _put(fetched, _DONE, closed)
        except _Stopped:
            return
        except BaseException as exc:  # noqa: BLE001 - the worker re-raises it at the read that failed
            try:
                _put(fetched, exc, closed)
            except _Stopped:
                return

    def work() -> None:
        try:
            for j in jobs:
                for block in j.blocks(buffers):
                    if not j.writes:
                        raise RuntimeError(f"{j.name}: a job planned to write nothing yielded a block")
                    _put(made, (j.name, block), closed)
            buffers.finish()
            _put(made, _DONE, closed)
        except _Stopped:
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer and re-raised there
            try:
                _put(made, exc, closed)
            except _Stopped:
                return

    threads = [
        threading.Thread(target=read_all, name="lora-convert-reader", daemon=True),
        threading.Thread(target=work, name="lora-convert-worker", daemon=True),
    ]
    try:
        for t in threads:  # inside the try: if the second cannot start, the first is stopped and joined
            t.start()
        while True:
            item = made.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        closed.set()
        for t in threads:
            if t.ident is not None:
                t.join()
