"""Run one command as a child process and measure it.

* wall time: ``time.perf_counter`` around the child's whole life;
* CPU time: user + sys from the rusage that ``os.wait4`` returns for the child, which on
  Linux includes every descendant the child waited for (the child's process tree);
* peak RSS: ``ru_maxrss`` of the same rusage: the largest peak of any *single* process
  of the tree (not the sum of the tree), in MB (10**6 bytes).  Linux keeps in
  ``ru_maxrss`` the resident size of the image that called ``exec``, so a child forked
  straight from this (torch-importing, ~250 MB) process would report at least that much.
  The command is therefore started by a tiny launcher (``python -S -I``) that forks,
  execs and ``wait4``s it and hands back the rusage: its forked image puts a floor of
  ~8 MB under every peak (``cp`` really peaks at ~2 MB); ``launcher_floor_mb()`` measures
  it;
* the page cache: before each run it is either dropped (``sync; echo 3 >
  /proc/sys/vm/drop_caches``, needs root), so every tool starts cold and reads its
  inputs from disk, or -- where that is not allowed -- warmed by reading the inputs once,
  so every tool starts hot.  ``Measurement.cache`` says which happened;
* ``load_before``/``load_after``: the 1-minute load average just before and after the
  run (the latter includes the run's own threads): with more runnable processes than
  cores, other work on the machine skews the numbers (OpenMP threads that spin while
  starved even inflate CPU time);
* ``sync_s``: how long a ``sync`` right after the child took, i.e. the dirty output the
  child left in the page cache to flush.  It is not part of ``wall_s``.

    from measure import measure
    m = measure(["cp", "-r", "a", "b"], cache="drop", inputs=["a"])
    print(m.wall_s, m.cpu_s, m.peak_rss_mb, m.cache)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


@dataclass
class Measurement:
    argv: list[str]
    returncode: int
    wall_s: float
    user_s: float
    sys_s: float
    peak_rss_mb: float
    cache: str  # "dropped", "warm", "as-is", or "drop failed: ..., warm"
    sync_s: float = 0.0
    load_before: float = 0.0  # 1-minute load average just before the run (other work on the box)
    load_after: float = 0.0  # and just after it (includes the run's own threads)
    timed_out: bool = False
    stdout_tail: str = ""
    stderr_tail: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def failure(self, limit: int = 300) -> str:
        """One line saying why the run failed (the last meaningful stderr line)."""
        if self.timed_out:
            return f"timed out after {self.wall_s:.0f} s"
        lines = [ln.strip() for ln in (self.stderr_tail or self.stdout_tail).splitlines() if ln.strip()]
        last = lines[-1] if lines else ""
        return f"exit {self.returncode}: {last}"[:limit]


def drop_page_cache() -> tuple[bool, str]:
    """``sync`` then drop the page cache, dentries and inodes.  (ok, reason)."""
    os.sync()
    try:
        with open(DROP_CACHES, "w") as f:
            f.write("3\n")
        return True, "dropped"
    except OSError as e:
        return False, f"drop failed: {e.strerror or e}"


def warm_page_cache(paths: Iterable[str | os.PathLike]) -> int:
    """Read every file under ``paths`` once so it sits in the page cache.  Bytes read."""
    total = 0
    buf = bytearray(16 << 20)
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            with open(p, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
    return total


def can_drop_caches() -> bool:
    return os.access(DROP_CACHES, os.W_OK)


def prepare_cache(mode: str, inputs: Sequence[str | os.PathLike] = ()) -> str:
    """mode: "drop" (cold; falls back to warming), "warm" (hot), "none" (leave as is)."""
    if mode == "none":
        return "as-is"
    if mode == "drop":
        ok, why = drop_page_cache()
        if ok:
            return "dropped"
        warm_page_cache(inputs)
        return f"{why}; warmed instead"
    if mode == "warm":
        os.sync()
        warm_page_cache(inputs)
        return "warm"
    raise ValueError(f"unknown cache mode {mode!r}")


# Forks, execs argv[2:], wait4s it; writes [wall, user, sys, maxrss KiB] of the command
# to argv[1] and exits with its status (a shell-style 127 when it cannot be started).
_LAUNCHER = r"""
import json, os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        os.write(2, f"cannot start {argv[0]}: {e}\n".encode())
    os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(out, "w") as f:
    json.dump([wall, ru.ru_utime, ru.ru_stime, ru.ru_maxrss], f)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


def measure(
    argv: Sequence[str],
    *,
    cache: str = "drop",
    inputs: Sequence[str | os.PathLike] = (),
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: float | None = None,
    sync_after: bool = True,
    echo: bool = False,
) -> Measurement:
    """Run ``argv`` and measure it (see the module docstring).

    ``inputs``: files/folders the command reads, warmed when the cache cannot be dropped.
    ``echo``: stream the child's stderr to ours as well (progress bars etc.)."""
    argv = [str(a) for a in argv]
    cache_state = prepare_cache(cache, inputs)
    load_before = os.getloadavg()[0]
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with tempfile.TemporaryDirectory(prefix="bench-measure-") as tmp:
        out_p, err_p, ru_p = Path(tmp) / "stdout", Path(tmp) / "stderr", Path(tmp) / "rusage.json"
        launcher = [sys.executable, "-S", "-I", "-c", _LAUNCHER, str(ru_p)]
        with open(out_p, "wb") as out_f, open(err_p, "wb") as err_f:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                launcher + argv,
                stdout=out_f,
                stderr=None if echo else err_f,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
            )
            timed_out = threading.Event()

            def _kill() -> None:
                timed_out.set()
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

            timer = threading.Timer(timeout, _kill) if timeout else None
            if timer:
                timer.daemon = True
                timer.start()
            _, status, ru = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            if timer:
                timer.cancel()
            proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
        # The launcher's report of the command itself; without it (killed) fall back to
        # the launcher's own rusage, which then includes the launcher.
        user, system, maxrss_kib = ru.ru_utime, ru.ru_stime, ru.ru_maxrss
        try:
            wall, user, system, maxrss_kib = json.loads(ru_p.read_text())
        except (OSError, ValueError):
            pass
        load_after = os.getloadavg()[0]
        sync_s = 0.0
        if sync_after:
            t1 = time.perf_counter()
            os.sync()
            sync_s = time.perf_counter() - t1
        return Measurement(
            argv=argv,
            returncode=proc.returncode,
            wall_s=wall,
            user_s=user,
            sys_s=system,
            peak_rss_mb=maxrss_kib * 1024 / 1e6,  # Linux reports KiB
            cache=cache_state,
            sync_s=sync_s,
            load_before=load_before,
            load_after=load_after,
            timed_out=timed_out.is_set(),
            stdout_tail=_tail(out_p),
            stderr_tail=_tail(err_p),
        )


def launcher_floor_mb() -> float:
    """Peak RSS that measure() reports for ``true``: the floor under every number."""
    return measure(["true"], cache="none", sync_after=False).peak_rss_mb


if __name__ == "__main__":  # python bench/measure.py CMD ARGS...
    if len(sys.argv) < 2:
        sys.exit("usage: python bench/measure.py CMD [ARGS...]")
    m = measure(sys.argv[1:], echo=True)
    print(
        f"rc={m.returncode} wall={m.wall_s:.2f}s cpu={m.cpu_s:.2f}s (user {m.user_s:.2f} sys {m.sys_s:.2f})"
        f" peak_rss={m.peak_rss_mb:.0f}MB cache={m.cache} sync_after={m.sync_s:.2f}s"
    )
