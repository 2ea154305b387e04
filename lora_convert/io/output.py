"""Outputs (a folder, or one file) that appear whole or not at all, and never in place of someone else's.

Work happens in ``.<name>.tmp-lora-convert-<pid>-<token>`` beside the target; only a complete
folder (or, for a one-file output, the finished file inside it) is moved into place, by a rename
that never replaces anything (``renameat2`` with ``RENAME_NOREPLACE`` on Linux,
``renamex_np(RENAME_EXCL)`` on macOS; elsewhere a check just before a plain rename, which can then
only ever replace an *empty* folder, or a hard link for a file).  Without ``--force``
a folder that appears at the target while we work is therefore never replaced; with ``--force``
only the folder that was at the target when the run started is, so of several concurrent runs
to one target at most one reports success.  The final step of concurrent runs in one folder is
serialised by an advisory lock on that folder.

Every temp folder this tool makes holds a marker file (:data:`MARKER`) that names the target
and stays locked (``flock``) for as long as the run lives.  A run killed with SIGKILL leaves its
temp folder behind; the next run for the same target recognises it (its marker names the target
and is no longer locked) and removes it.  Names are compared exactly, never as glob patterns,
and nothing without our marker is deleted.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import stat
import sys
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import Any, Self

from ..errors import LoraConvertError, OutputError, option

TMP_MARK = ".tmp-lora-convert-"
MARKER = ".lora-convert-temp"  # inside every temp folder we make: {"target": name, ...}, flock'ed while alive
PREVIOUS = "previous"  # inside a "-old" temp folder: the output that --force is replacing
NAME_MAX = 255
_SUFFIX_ROOM = 10 + 1 + 16 + 4  # "<pid>-<token>-old"
_REST = re.compile(r"(\d{1,10})(?:-([0-9a-f]{1,16}))?(-old)?")  # "<pid>-old": earlier versions


# -- renames that never replace ----------------------------------------------------------------


def _libc_rename_noreplace() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: fn(-100, a, -100, b, 1)  # AT_FDCWD, RENAME_NOREPLACE
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):  # pragma: no cover - macOS
        fn = libc.renamex_np
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: fn(a, b, 0x4)  # RENAME_EXCL
    return None  # pragma: no cover


_NOREPLACE = _libc_rename_noreplace()


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; ``FileExistsError`` if anything (even a dangling link) is at ``dst``."""
    if _NOREPLACE is not None:
        if _NOREPLACE(os.fsencode(src), os.fsencode(dst)) == 0:
            return
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # else: the fs lacks the flag
            raise OSError(e, os.strerror(e), str(dst))
    # Fallback: a folder renamed onto a file, a link or a non-empty folder fails; only an empty
    # folder created in the instant between this check and the rename could be replaced.  A file
    # goes in by a hard link, which never replaces anything, where the file system has them.
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    if not os.path.isdir(src):
        try:
            os.link(src, dst)
        except FileExistsError:
            raise
        except OSError:  # no hard links here: the check above is all there is
            pass
        else:
            os.unlink(src)
            return
    os.rename(src, dst)


def sync_tree(path: Path) -> None:
    """``fsync`` every file under ``path`` (or the one file) and every folder, deepest first: the output is on
    the disk before it is renamed into place, so a crash after the rename never leaves a folder of empty or
    short files under the final name.  Files the safetensors writer wrote are synced already (cheap again)."""
    if not path.is_dir():
        _fsync_path(path, os.O_RDONLY)
        return
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            _fsync_path(Path(root) / name, os.O_RDONLY | os.O_NOFOLLOW)
        _fsync_path(Path(root), os.O_RDONLY | os.O_DIRECTORY)


def _fsync_path(path: Path, flags: int) -> None:
    try:
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.ENOENT):  # a link, a socket, gone: nothing of ours
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EROFS):  # a file system without fsync for this kind of file
            raise
    finally:
        os.close(fd)


# -- identities, markers, locks ---------------------------------------------------------------------


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class _DirLock:
    """An advisory lock on a folder (``flock`` on the folder itself), held by our final steps."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.fd = folder, -1

    def __enter__(self) -> Self:
        try:
            self.fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError:  # a file system without flock: the no-replace rename still protects the target
            self._close()
        return self

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __exit__(self, *exc: object) -> None:
        self._close()


def _write_marker(folder: Path, info: dict[str, Any]) -> int:
    """Create ``folder/MARKER`` holding ``info`` and return its fd, locked for as long as it is open.

    The marker is locked and written under another name and renamed into place, so that a
    cleanup never sees it unlocked or half written (a probe could otherwise win the lock first)."""
    staged = folder / (MARKER + ".new")
    fd = os.open(staged, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # no flock on this file system: liveness then falls back to the pid in the name
        os.write(fd, json.dumps(info).encode())
        os.rename(staged, folder / MARKER)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_marker(folder: Path) -> tuple[dict[str, Any] | None, bool]:
    """(the marker's content or None, whether its run is still alive)."""
    path = folder / MARKER
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None, False
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None, False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return {}, True
        except OSError:
            pass
        raw = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    try:
        info = json.loads(raw)
    except ValueError:
        return None, False
    return (info if isinstance(info, dict) else None), False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def tmp_prefix(name: str) -> str:
    """``.<name>.tmp-lora-convert-`` — with a long name shortened and hashed so the temp names fit."""
    prefix = f".{name}{TMP_MARK}"
    raw = os.fsencode(name)
    if len(os.fsencode(prefix)) + _SUFFIX_ROOM <= NAME_MAX:
        return prefix
    digest = hashlib.sha256(raw).hexdigest()[:12]
    keep = NAME_MAX - _SUFFIX_ROOM - len(TMP_MARK) - 2 - len(digest)
    return f".{os.fsdecode(raw[:keep])}~{digest}{TMP_MARK}"


def _ours(parent: Path, target: Path) -> Iterable[tuple[Path, re.Match[str]]]:
    """Entries of ``parent`` spelled exactly like our temp folders for ``target`` (no globbing)."""
    prefix = tmp_prefix(target.name)
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for n in sorted(names):
        if n.startswith(prefix):
            m = _REST.fullmatch(n[len(prefix) :])
            if m:
                yield parent / n, m


def clean_stale(target: Path) -> list[Path]:
    """Remove the temp folders that dead runs left while writing ``target``.

    Only folders spelled exactly as ours for this target are looked at, and only those whose
    marker names this target and is no longer locked by a live run are removed (an empty one,
    from a run killed before it wrote its marker, when its pid is gone).  A ``-old`` folder holds
    the output that an interrupted ``--force`` run was replacing: when the target is missing it
    is put back in place; when the target is the new output that run finished, it is removed;
    otherwise it is left alone.
    """
    removed: list[Path] = []
    parent = target.parent
    if not parent.is_dir():
        return removed
    with _DirLock(parent):
        for p, m in _ours(parent, target):
            try:
                if not stat.S_ISDIR(os.lstat(p).st_mode):
                    continue
            except OSError:  # gone meanwhile: a live run finished
                continue
            info, alive = _read_marker(p)
            old = bool(m.group(3))
            if alive or (info is not None and info.get("target") != target.name):
                continue
            if info is None:
                if _pid_alive(int(m.group(1))):
                    continue
                if old:  # an unmarked "-old" of an earlier version: the user's output, put back if missing
                    try:
                        rename_noreplace(p, target)
                    except OSError:
                        pass
                    continue
                try:
                    os.rmdir(p)  # killed between mkdir and marker: only ever an empty folder
                    removed.append(p)
                except OSError:
                    pass
                continue
            if old:
                prev = p / PREVIOUS
                if os.path.lexists(prev):
                    if not os.path.lexists(target):
                        try:
                            rename_noreplace(prev, target)
                        except OSError:
                            continue
                    elif list(_identity(target) or ()) != info.get("new"):
                        continue  # the target is neither missing nor that run's output: keep it all
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


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return NAME_MAX


class AtomicOutput:
    """``with AtomicOutput(target, force=..., inputs=[...]) as tmp: write into tmp``.

    With ``file=True`` the target is one file (a GGUF adapter): it is written as ``tmp / Path(target).name``
    in the temp folder, and only that file is moved into place, with the same guarantees as a folder."""

    def __init__(
        self, target: str | Path, *, force: bool = False, inputs: Iterable[str | Path] = (), file: bool = False
    ) -> None:
        self.target = Path(target)
        self.force = force
        self.file = file
        self.file_name = self.target.name  # the one file's name inside the temp folder (even behind a link)
        self.inputs = [Path(p) for p in inputs]
        self.link: Path | None = None  # -o as given, when it is a symbolic link
        self.tmp: Path | None = None
        self._old_term: Any = None  # the SIGTERM handler to restore (whatever signal.signal gave back)
        self.stale_removed: list[Path] = []  # temp folders of dead runs, cleaned up on entry
        self._start_id: tuple[int, int] | None = None  # the folder --force may replace: the one there at the start
        self._made_parents: list[Path] = []  # created for -o, deepest first; removed again on failure
        self._marker_fd = -1
        self._trash_fd = -1  # the marker of the folder holding the output --force replaces: locked till it goes

    # -- before any work ----------------------------------------------------------------------
    def _check_name(self) -> None:
        t = self.target
        if t.name in ("", ".", ".."):
            what = "file" if self.file else "folder"
            raise OutputError(f"is not a {what} name", path=t, hint=f"name the output {what}, e.g. -o merged")
        anchor = next((a for a in (t.parent, *t.parent.parents) if os.path.isdir(a)), Path("."))
        limit = _name_max(anchor)
        for part in t.parts:
            n = len(os.fsencode(part))
            if n > limit:
                raise OutputError(
                    f"a name in this path is {n} bytes long, more than the file system allows ({limit})",
                    path=part[:60] + "...",
                    hint="choose a shorter output path",
                )

    def _follow_link(self) -> None:
        """A dangling link is refused now, not after the work; ``--force`` on a link to a folder (to a file,
        for a one-file output) replaces what it points to (the link stays, pointing at the new output) —
        unless that is an input or lies inside one, which :meth:`check` refuses."""
        t = self.target
        if not t.is_symlink():
            return
        self.link = t
        if not t.exists():
            raise OutputError(
                f"is a symbolic link to {os.readlink(t)}, which does not exist",
                path=t,
                hint="remove the link, or create the folder it points to",
            )
        if self.force and (t.is_file() if self.file else t.is_dir()):
            self.target = t.resolve()

    def check(self) -> None:
        """Refuse before any work: existing target without --force, output inside an input, input inside output."""
        t = self.target
        if self.file and os.path.lexists(t):
            self._check_not_an_input(t)
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
        if os.path.lexists(t) and not self.force:
            raise OutputError(
                "already exists", path=t, hint=f"choose another path or pass {option('force')} to replace it"
            )
        if self.file and t.is_dir():
            raise OutputError("is a folder; this output is one file", path=t, hint="give -o a file path")
        if self.file and t.exists() and not t.is_file():
            raise OutputError("exists and is not a regular file", path=t)
        if not self.file and t.exists() and not t.is_dir():
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
            missing = []
            d = parent
            while not d.exists() and d != d.parent:
                missing.append(d)
                d = d.parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                self._made_parents = [m for m in missing if m.is_dir()]
                raise OutputError(f"cannot create parent folder: {exc.strerror}", path=parent) from None
            self._made_parents = missing
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError("folder is not writable", path=parent, hint="choose a writable location for -o")
        self._start_id = _identity(t) if self.force else None

    def _check_not_an_input(self, t: Path) -> None:
        """A one-file output that is already there is never an input file (compared by resolved path, so
        that a link into a Hugging Face cache's blobs is caught too), and one reached through a link (the
        file itself or a folder on its path) never lies inside an input folder: writing it would replace
        an input.  A file named plainly beside or inside the inputs (an earlier ``.gguf`` in the adapter's
        folder) is the user's own choice, replaced with ``--force`` as before; a new one is harmless."""
        real = t.resolve()
        shown = self.link or t
        linked = Path(os.path.abspath(shown)) != real
        here = [p for p in self.inputs if os.path.lexists(p)]
        hit = next((f"is the input {p}" for p in here if not p.is_dir() and p.resolve() == real), None)
        if hit is None and linked:
            hit = next(
                (f"lies inside the input folder {p}" for p in here if p.is_dir() and real.is_relative_to(p.resolve())),
                None,
            )
        if hit is None:
            return
        raise OutputError(
            (f"leads to {real}, which {hit}" if linked else hit) + "; writing the output there would replace it",
            path=shown,
            hint="choose another output path: an output never replaces an input",
        )

    def _remove_made_parents(self) -> None:
        for d in self._made_parents:  # deepest first; stops at the first one that is not empty
            try:
                os.rmdir(d)
            except OSError:
                break
        self._made_parents = []

    def _release_marker(self) -> None:
        if self._marker_fd >= 0:
            os.close(self._marker_fd)
            self._marker_fd = -1

    def _release_trash(self) -> None:
        if self._trash_fd >= 0:
            os.close(self._trash_fd)
            self._trash_fd = -1

    def _discard(self) -> None:
        """Failure: our temp folder and the parent folders we made go; nothing else is touched."""
        self._release_marker()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._remove_made_parents()

    def __enter__(self) -> Path:
        self._check_name()
        self._follow_link()
        self.stale_removed = clean_stale(self.target)  # first: it may put a previous output back
        try:
            self.check()
        except BaseException:
            self._remove_made_parents()
            raise
        name = f"{tmp_prefix(self.target.name)}{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp = self.target.parent / name
        try:  # before mkdir, so that no SIGTERM can land between the folder and its cleanup
            self._old_term = signal.signal(signal.SIGTERM, self._on_term)
        except ValueError:  # not the main thread
            self._old_term = None
        try:
            self.tmp.mkdir()
            self._marker_fd = _write_marker(self.tmp, {"target": self.target.name, "pid": os.getpid()})
        except BaseException as exc:
            if self._old_term is not None:
                signal.signal(signal.SIGTERM, self._old_term)
            self._discard()
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
            rel = p.relative_to(self.tmp)
        except ValueError:
            return str(p)
        return str(self.target) if self.file and rel == Path(self.file_name) else str(self.target / rel)

    def _done(self) -> Path:
        """What goes into place: the temp folder, or the one file in it."""
        assert self.tmp is not None
        return self.tmp / self.file_name if self.file else self.tmp

    @staticmethod
    def _on_term(signum: int, frame: FrameType | None) -> None:
        raise _Terminated()

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
        assert self.tmp is not None
        if exc_type is not None:
            self._discard()
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
        try:
            trash = self._finish()
        except BaseException:
            self._release_trash()
            self._discard()
            raise
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        self._release_trash()
        self._made_parents = []
        if self.file:  # the file is in place: its emptied temp folder goes (marker released last)
            self._discard()

    # -- the final step -------------------------------------------------------------------------
    def _finish(self) -> Path | None:
        """Move the finished folder (or file) into place; returns the temp folder holding the replaced output."""
        assert self.tmp is not None
        t = self.target
        trash: Path | None = None
        try:
            sync_tree(self._done())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutputError("disk full while writing; nothing was written", path=t) from None
            raise OutputError(f"write failed: {exc.strerror or exc}; nothing was written", path=t) from None
        with _DirLock(t.parent):  # concurrent runs in this folder take turns from here
            now = _identity(t)
            if now is not None and now != self._start_id:
                if self._start_id is None:
                    raise OutputError(
                        "appeared while this run was writing (made by another run or program); it "
                        "was left as it is and nothing was written",
                        path=t,
                        hint=f"choose another path, or run again with {option('force')} to replace it",
                    )
                raise OutputError(
                    "was replaced while this run was writing (by another run or program); the new "
                    "one was left as it is and nothing was written",
                    path=t,
                    hint="run again to replace it",
                )
            if now is not None:
                trash = self._move_aside(t)
            if not self.file:  # the folder becomes the output: its marker goes first (a file's stays behind)
                self._release_marker()
                os.unlink(self.tmp / MARKER)
            try:
                rename_noreplace(self._done(), t)
            except OSError as exc:
                kept = self._put_back(trash, t)
                if isinstance(exc, FileExistsError):
                    raise OutputError(
                        "appeared while this run was finishing (made by another program); it was "
                        "left as it is and nothing was written" + kept,
                        path=t,
                    ) from None
                what = "file" if self.file else "folder"
                raise OutputError(
                    f"cannot move the finished {what} into place: {exc.strerror}" + kept, path=t
                ) from None
            try:  # the rename itself reaches the disk (best effort: the output is in place either way)
                _fsync_path(t.parent if str(t.parent) else Path("."), os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                pass
        return trash

    def _move_aside(self, t: Path) -> Path:
        """Move the output that ``--force`` replaces into a marked temp folder of ours."""
        assert self.tmp is not None
        trash = t.parent / f"{tmp_prefix(t.name)}{os.getpid()}-{secrets.token_hex(4)}-old"
        trash.mkdir()
        try:
            # "new": after a kill, tells a later cleanup whether this run got its output in place
            self._trash_fd = _write_marker(
                trash, {"target": t.name, "pid": os.getpid(), "new": list(_identity(self._done()) or ())}
            )
            os.rename(t, trash / PREVIOUS)
        except BaseException:
            self._release_trash()
            shutil.rmtree(trash, ignore_errors=True)
            raise
        if _identity(trash / PREVIOUS) != self._start_id:  # swapped in the instant between the check and here
            self._put_back(trash, t)
            raise OutputError(
                "was replaced while this run was finishing (by another program); left as it is and nothing was written",
                path=t,
            )
        return trash

    @staticmethod
    def _put_back(trash: Path | None, t: Path) -> str:
        """Undo :meth:`_move_aside`; a note on where the old output is when it cannot go back."""
        if trash is None:
            return ""
        try:
            rename_noreplace(trash / PREVIOUS, t)
        except OSError:
            return f"; the output that was there is kept in {trash / PREVIOUS}"
        shutil.rmtree(trash, ignore_errors=True)
        return ""
