"""Output folders that appear whole or not at all.

Work happens in ``.<name>.tmp-lora-convert-<pid>-<token>`` beside the target; only a complete
folder is renamed into place.  A run killed with SIGKILL leaves its temp folder behind; the
next run in the same place recognises it (its pid is gone) and removes it.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import signal
from collections.abc import Iterable
from pathlib import Path
from types import FrameType

from ..errors import LoraConvertError, OutputError, option

TMP_MARK = ".tmp-lora-convert-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: Path) -> list[Path]:
    """Remove temp folders of dead runs that were writing ``target``.

    One exception: a run killed between its two renames under ``--force`` leaves the previous
    output as ``…-old`` and no target.  That folder is the user's last complete output, so it is
    put back in place rather than deleted (the unfinished new one is removed like any temp).
    """
    removed = []
    parent = target.parent
    if not parent.is_dir():
        return removed
    for p in sorted(parent.glob(f".{target.name}{TMP_MARK}*")):
        try:
            pid = int(p.name.rsplit(TMP_MARK, 1)[1].split("-")[0])
        except ValueError:
            continue
        if _pid_alive(pid):
            continue
        if p.name.endswith("-old") and not target.exists():
            try:
                os.rename(p, target)
                continue
            except OSError:
                pass
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def stale_note(paths: list[Path]) -> str:
    """The warning that tells the user which leftovers of killed runs were removed."""
    return f"removed {len(paths)} unfinished temp folder(s) left by killed runs: " + ", ".join(p.name for p in paths)


def _inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a.is_relative_to(b)


class _Terminated(BaseException):
    """SIGTERM turned into an exception so that ``finally`` blocks run."""


class AtomicOutput:
    """``with AtomicOutput(target, force=..., inputs=[...]) as tmp: write into tmp``.

    With ``file=True`` the target is one file (a GGUF adapter): it is written as ``tmp / target.name``
    in the temp folder, and only that file is moved into place."""

    def __init__(
        self, target: str | Path, *, force: bool = False, inputs: Iterable[str | Path] = (), file: bool = False
    ) -> None:
        self.target = Path(target)
        self.force = force
        self.file = file
        self.inputs = [Path(p) for p in inputs]
        self.tmp: Path | None = None
        self._old_term = None
        self.stale_removed: list[Path] = []  # temp folders of dead runs, cleaned up on entry

    def check(self) -> None:
        """Refuse before any work: existing target without --force, output inside an input, input inside output."""
        t = self.target
        for inp in self.inputs:
            if not inp.exists():
                continue
            base = inp if inp.is_dir() else inp.parent
            if _inside(t, base) and inp.is_dir() and not self.file:  # a new file beside the inputs is harmless
                raise OutputError("output folder is inside an input folder", path=t, hint=f"write it outside {inp}")
            if t.exists() and _inside(inp, t):
                raise OutputError(
                    f"an input ({inp}) lies inside the output folder, which {option('force')} would delete",
                    path=t,
                    hint="choose another output folder",
                )
        if t.exists() and not self.force:
            raise OutputError(
                "already exists", path=t, hint=f"choose another path or pass {option('force')} to replace it"
            )
        if self.file and t.is_dir():
            raise OutputError("is a folder; this output is one file", path=t, hint="give -o a file path")
        if t.exists() and not t.is_dir() and not self.file:
            raise OutputError("exists and is not a folder", path=t)
        parent = t.parent if str(t.parent) else Path(".")
        for above in (parent, *parent.parents):
            if above.exists():
                if not above.is_dir():
                    raise OutputError(
                        "is a file, so the output folder cannot be created below it",
                        path=above,
                        hint="choose another output path",
                    )
                break
        if not parent.exists():
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot create parent folder: {exc.strerror}", path=parent) from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError("folder is not writable", path=parent, hint="choose a writable location for -o")

    def __enter__(self) -> Path:
        self.stale_removed = clean_stale(self.target)  # first: it may put a previous output back
        self.check()
        name = f".{self.target.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp = self.target.parent / name
        try:  # before mkdir, so that no SIGTERM can land between the folder and its cleanup
            self._old_term = signal.signal(signal.SIGTERM, self._on_term)
        except ValueError:  # not the main thread
            self._old_term = None
        try:
            self.tmp.mkdir()
        except BaseException as exc:
            if self._old_term is not None:
                signal.signal(signal.SIGTERM, self._old_term)
            if isinstance(exc, _Terminated):
                raise OutputError("terminated by SIGTERM; nothing was written", path=self.target) from None
            if isinstance(exc, OSError):
                raise OutputError(f"cannot create temp folder: {exc.strerror}", path=self.tmp) from None
            raise
        return self.tmp

    def _public(self, path: str | os.PathLike[str]) -> str:
        """A path inside the temp folder, spelled as its place in the target."""
        assert self.tmp is not None
        p = Path(path)
        try:
            return str(self.target / p.relative_to(self.tmp))
        except ValueError:
            return str(p)

    @staticmethod
    def _on_term(signum: int, frame: FrameType | None) -> None:
        raise _Terminated()

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if exc_type is _Terminated:
                raise OutputError("terminated by SIGTERM; nothing was written", path=self.target) from None
            if isinstance(exc, KeyboardInterrupt):
                exc.output_target = str(self.target)  # type: ignore[attr-defined]  # for the CLI's one-line message
            if isinstance(exc, OSError) and isinstance(exc.__context__, OutputError) and not exc.filename:
                exc = exc.__context__  # cleanup (closing a file on a full disk) failed again: report the first
            if isinstance(exc, OutputError):
                # name the file as it would have been, not the deleted temp folder
                where = self._public(exc.path) if exc.path else None
                raise OutputError(exc.message, path=where, tensor=exc.tensor, hint=exc.hint) from None
            elif isinstance(exc, OSError) and not isinstance(exc, LoraConvertError):
                where = self._public(exc.filename) if exc.filename else str(self.target)
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise OutputError(
                        "disk full while writing; nothing was written", path=where, hint="free space or write elsewhere"
                    ) from None
                raise OutputError(f"write failed: {exc.strerror or exc}; nothing was written", path=where) from None
            return
        if self.file:
            self._place_file()
            return
        trash = self.target.parent / f".{self.target.name}{TMP_MARK}{os.getpid()}-old"
        try:
            if self.target.exists():
                os.rename(self.target, trash)
                os.rename(self.tmp, self.target)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(self.tmp, self.target)
        except OSError as exc:
            if trash.exists() and not self.target.exists():
                os.rename(trash, self.target)  # put the old output back
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise OutputError(f"cannot move the finished folder into place: {exc.strerror}", path=self.target) from None

    def _place_file(self) -> None:
        """Move the finished file into place and drop the temp folder.  Without --force a hard link
        puts it there, which never replaces a file that appeared meanwhile."""
        assert self.tmp is not None
        done = self.tmp / self.target.name
        try:
            if self.force:
                os.replace(done, self.target)
            else:
                try:
                    os.link(done, self.target)
                except FileExistsError:
                    raise
                except OSError:  # no hard links on this file system
                    if os.path.lexists(self.target):
                        raise FileExistsError(errno.EEXIST, "exists", str(self.target)) from None
                    os.rename(done, self.target)
        except FileExistsError:
            raise OutputError(
                "appeared while this run was writing; it was left alone",
                path=self.target,
                hint=f"pass {option('force')}",
            ) from None
        except OSError as exc:
            raise OutputError(f"cannot move the finished file into place: {exc.strerror}", path=self.target) from None
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
