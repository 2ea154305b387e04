"""Files written and read around the page cache (``O_DIRECT``), with a plain fallback.

Why: a merge moves every byte of the model in and out.  Through the page cache the kernel copies each
byte twice (into the cache on read, out of our buffer into the cache on write), and at 8B — more
than this machine's memory — it also spends its time evicting the input to make room for the output:
most of a merge's CPU was system time (issue 26, bench/README.md).  ``O_DIRECT`` moves the bytes
between the disk and our own page-aligned buffer, so the kernel neither copies nor caches them.

``O_DIRECT`` needs the buffer, the file offset and the length aligned to the device's block size; we
align to :data:`ALIGN` (4096, a multiple of every logical block size Linux uses).  A file system that
refuses it (tmpfs on older kernels, some network and FUSE file systems: ``EINVAL`` at open or at the
first transfer), or a platform without it, falls back to plain reads and writes — same bytes, through
the cache.  Buffers come from anonymous ``mmap`` (always page-aligned).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import mmap
import os
import sys
import threading

ALIGN = 4096
O_DIRECT = getattr(os, "O_DIRECT", 0)  # 0: the platform has none (macOS): always the plain path
DISABLED = os.environ.get("LORA_CONVERT_NO_DIRECT_IO", "") not in ("", "0")  # a switch to compare both paths
_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)
STRAIGHT_MIN = 64 << 10  # blocks at least this large are written from where they lie (StagedFile.write_at)


def set_direct(fd: int, on: bool) -> bool:
    """Turn ``O_DIRECT`` on or off for ``fd``; False where the file system or platform refuses it."""
    if not O_DIRECT or (on and DISABLED):
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | O_DIRECT) if on else (flags & ~O_DIRECT))
    except OSError:
        return False
    return on


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """``nbytes`` (rounded up to :data:`ALIGN`) of page-aligned anonymous memory."""
    return mmap.mmap(-1, max(ALIGN, -(-nbytes // ALIGN) * ALIGN))


class StagedFile:
    """A file written front to back through one aligned staging buffer: full buffers go to the disk with
    ``O_DIRECT``; the unaligned tail is written padded and the file cut back to its size.  ``sync`` ends
    with ``fsync`` (the data and the size are on the disk before the output is renamed into place).

    OSError propagates (the caller names the file); a file system that refuses ``O_DIRECT`` is written
    through the page cache instead, silently."""

    def __init__(self, path: os.PathLike[str] | str, stage_bytes: int = 8 << 20) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self.direct = set_direct(self.fd, True)
        self._buf = aligned_buffer(stage_bytes)
        self._view = memoryview(self._buf)
        self._cap = len(self._buf)
        self._fill = 0  # bytes staged, not yet written
        self.size = 0  # bytes written to the file so far

    def write(self, data: memoryview | bytes) -> None:
        src = memoryview(data).cast("B")
        i, n = 0, len(src)
        while i < n:
            k = min(n - i, self._cap - self._fill)
            self._view[self._fill : self._fill + k] = src[i : i + k]
            self._fill += k
            i += k
            if self._fill == self._cap:
                self._flush(self._cap)

    def write_at(self, data: memoryview, addr: int) -> None:
        """:meth:`write` for bytes that lie at address ``addr``: where that address has the file position's
        alignment (``Buffers.out`` places a merge's output blocks so), the aligned middle goes to the disk
        straight from there and only the partial pages at either end pass through the staging buffer.

        Why: the copy into the staging buffer was the writer's main CPU cost (~0.2 s/GB, bench/README.md)."""
        src = memoryview(data).cast("B")
        pos = self.size + self._fill
        head = -pos % ALIGN
        if not self.direct or (addr - pos) % ALIGN or len(src) < head + STRAIGHT_MIN:
            self.write(src)
            return
        self.write(src[:head])  # completes the staged page: the staged bytes end aligned
        if self._fill:
            self._flush(self._fill)
        mid = (len(src) - head) // ALIGN * ALIGN
        if self.direct:  # (a refused direct write just above turned it off: then all of it is staged)
            self._flush(mid, src[head : head + mid])
        else:
            self.write(src[head : head + mid])
        self.write(src[head + mid :])

    def _flush(self, length: int, view: memoryview | None = None) -> None:
        """Write ``_view[:length]`` (``length`` aligned, or the padded tail) — or ``view`` itself, aligned in
        memory and length — at the file's end."""
        done = 0
        view = self._view if view is None else view
        while done < length:
            try:
                done += os.write(self.fd, view[done:length])
            except OSError as exc:
                if self.direct and exc.errno in _REFUSED:  # refused here rather than at open: plain writes
                    self.direct = set_direct(self.fd, False)
                    os.lseek(self.fd, self.size + done, os.SEEK_SET)
                    continue
                raise
            if self.direct and done % ALIGN:  # a short direct write off the alignment: finish it plainly
                self.direct = set_direct(self.fd, False)
        self.size += length
        if view is self._view:
            self._fill = 0

    def flush(self) -> None:
        """Everything staged reaches the file now (its size shows the progress); the rest of this file
        then goes through the page cache, since what follows is no longer aligned.  Only for callers
        that watch a file grow (the test harness that interrupts a run midway)."""
        if self._fill:
            self.direct = set_direct(self.fd, False)
            self._flush(self._fill)

    def sync(self) -> None:
        """Write what is staged, fix the size, ``fsync``."""
        tail = self._fill
        if tail:
            if self.direct:
                padded = -(-tail // ALIGN) * ALIGN
                self._view[tail:padded] = bytes(padded - tail)
                self._flush(padded)
                self.size -= padded - tail
                os.ftruncate(self.fd, self.size)
            else:
                self._flush(tail)
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            self._view.release()
            self._buf.close()
            os.close(fd)


def write_synced(path: os.PathLike[str] | str, data: bytes) -> None:
    """A small file written and ``fsync``ed (an index, a header-only file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


class _CacheStat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


_SYS_CACHESTAT = 451  # the same number on every Linux architecture (6.5+)
_libc: ctypes.CDLL | None = None


def cached_pages(fd: int, offset: int, nbytes: int) -> int | None:
    """How many pages of that range are in the page cache (``cachestat``, Linux 6.5+); None where unknown."""
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        rng, out = _Range(offset, nbytes), _CacheStat()
        if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(out), 0) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return int(out.cache)


_window = threading.local()  # per thread: [buffer, its view, owner token, start, bytes held]
_tokens = itertools.count(1)
WINDOW = 8 << 20


def _state() -> list:  # type: ignore[type-arg]
    st = getattr(_window, "st", None)
    if st is None:
        buf = aligned_buffer(WINDOW)
        st = _window.st = [buf, memoryview(buf), 0, 0, 0]
    return st


class DirectReader:
    """Reads of one file that bypass the page cache where they would have to go to the disk.

    Each thread keeps one aligned window of :data:`WINDOW` bytes (shared by every file it reads, so
    memory does not grow with the shard count): a read inside it is a copy out of it; otherwise the
    window moves to the aligned range that starts at the read and is filled by one ``O_DIRECT`` read,
    so the pipeline's sequential block reads cost one large disk read per window.  A window whose pages
    are all in the page cache already (a model read a moment ago) is read from there instead
    (``cachestat``): a warm model is not read from the disk again.
    """

    def __init__(self, plain_fd: int, direct_fd: int) -> None:
        self.plain, self.direct = plain_fd, direct_fd
        self.token = next(_tokens)

    def read_into(self, view: memoryview, offset: int) -> int:
        """Fill ``view`` (a writable byte view) from ``offset``; returns the bytes read (short at the
        end of the file).  OSError propagates (``EINVAL``: the file system refuses direct reads)."""
        n = len(view)
        st = _state()
        done = 0
        while done < n:
            pos = offset + done
            start, have = st[3], st[4]
            if st[2] != self.token or not (start <= pos < start + have):
                start = pos - pos % ALIGN
                want = len(st[0])
                cached = cached_pages(self.plain, start, want)
                fd = self.plain if cached is not None and cached * mmap.PAGESIZE >= want else self.direct
                st[2] = 0
                have = os.preadv(fd, [st[1]], start)
                st[2], st[3], st[4] = self.token, start, have
                if pos >= start + have:  # end of file
                    return done
            k = min(n - done, start + have - pos)
            view[done : done + k] = st[1][pos - start : pos - start + k]
            done += k
        return done

    def read_spare(self, buf: memoryview, addr: int, offset: int, n: int) -> int | None:
        """Bytes ``offset:offset+n`` of the file into ``buf`` (writable bytes at address ``addr``, all of them
        scratch), with no copy: one ``O_DIRECT`` read of the aligned range around them lands at the first
        aligned address in ``buf``.  Returns where in ``buf`` the bytes start, or None when ``buf`` has no room
        for the aligned range.  Pages all in the page cache are read from there (a plain read, straight to
        the place the direct read would have put them).  A file that ends first gives ``-1``.  OSError
        propagates (``EINVAL``: the file system refuses direct reads).

        Why: the window (:meth:`read_into`) reads the disk once per 8 MB but copies every block out of it; a
        block of a few MB read in place costs the kernel the same and the CPU no copy."""
        head = offset % ALIGN
        first = -addr % ALIGN  # buf[first] is aligned; it takes the file's byte offset - head
        length = -(-(head + n) // ALIGN) * ALIGN
        if first + length > len(buf):
            return None
        at = first + head
        cached = cached_pages(self.plain, offset - head, length)
        if cached is not None and cached * mmap.PAGESIZE >= length:
            fd, pos, want, stop = self.plain, offset, at, at + n
        else:
            fd, pos, want, stop = self.direct, offset - head, first, first + length
        done = want
        while done < at + n:
            got = os.preadv(fd, [buf[done:stop]], pos + done - want)
            if got == 0:
                return -1
            done += got
            if fd == self.direct and done % ALIGN and done < at + n:  # short, off the alignment: plain from here
                fd = self.plain
                stop = at + n
        return at

    def close(self) -> None:
        """The calling thread's window forgets this file (other threads' windows hold a token never reused)."""
        st = getattr(_window, "st", None)
        if st is not None and st[2] == self.token:
            st[2] = 0
