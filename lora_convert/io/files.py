"""Opening files from a checkpoint folder: regular files only, and JSON within bounds.

Every file we parse comes from a stranger.  A folder, a FIFO or a device where a file should
be gets its own message (a FIFO would otherwise block the read forever), and a JSON file is
read only up to a size cap and refused when nested deeper than any real config.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import IO, Any

from ..errors import CheckpointError, LoraConvertError

MAX_CONFIG_BYTES = 16 * 2**20  # adapter_config.json, config.json: real ones are a few KB (id2label maps ~1 MB)
MAX_INDEX_BYTES = 64 * 2**20  # *.index.json: ~9 MB for DeepSeek-V3's ~90k tensors
MAX_JSON_DEPTH = 64  # real configs nest 4-6 levels


def _kind(mode: int) -> str | None:
    """What a non-regular file is, for a message; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO), not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a file"
    return "is not a regular file"


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as a regular file ("is missing", "is a folder, not a file", ...), or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "is missing"
    except NotADirectoryError:
        return "is missing (a file stands where a folder of its path should be)"
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    return _kind(st.st_mode)


def open_regular(path: Path, error: type[LoraConvertError] = CheckpointError) -> IO[bytes]:
    """Open ``path`` for binary reading, refusing anything but a regular file without blocking on it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error("file not found", path=path) from None
    except PermissionError:
        raise error("permission denied", path=path) from None
    except IsADirectoryError:
        raise error("is a folder, not a file", path=path) from None
    except OSError as exc:
        raise error(f"cannot open: {exc.strerror}", path=path) from None
    try:
        problem = _kind(os.fstat(fd).st_mode)
        if problem:
            raise error(problem, path=path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _depth_ok(obj: Any, limit: int) -> bool:
    """Whether ``obj`` nests at most ``limit`` containers deep (iteratively: no recursion to blow)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            children: Any = o.values()
        elif isinstance(o, list):  # a list, or an object kept as (key, value) pairs
            children = (x[1] if isinstance(x, tuple) else x for x in o)
        else:
            continue
        if d > limit:
            return False
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return True


def load_json(
    path: Path,
    *,
    what: str = "a JSON file",
    max_bytes: int = MAX_CONFIG_BYTES,
    error: type[LoraConvertError] = CheckpointError,
    object_pairs_hook: Any = None,
) -> Any:
    """Parse a JSON file of at most ``max_bytes``, nested at most :data:`MAX_JSON_DEPTH` deep.

    Every failure is ``error`` naming the file: missing, not a regular file, too large, not
    UTF-8, not JSON, too deep."""
    with open_regular(path, error) as fh:
        size = os.fstat(fh.fileno()).st_size
        raw = fh.read(size + 1) if size <= max_bytes else b""  # (read(n) allocates n bytes up front)
    if size > max_bytes or len(raw) > max_bytes:
        cap = f"{max_bytes // 2**20} MiB" if max_bytes % 2**20 == 0 else f"{max_bytes} bytes"
        raise error(
            f"{max(size, len(raw))} bytes, more than the {cap} {what} may have",
            path=path,
            hint="a real one is far smaller: this file is corrupted or not what its name says",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error("not UTF-8 text", path=path) from None
    try:
        data = json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as exc:
        raise error(f"not valid JSON ({exc.msg} at line {exc.lineno})", path=path) from None
    except RecursionError:
        raise error(f"not valid JSON (nested more than {MAX_JSON_DEPTH} levels deep)", path=path) from None
    except ValueError as exc:  # e.g. an integer over Python's digit limit
        raise error(f"not valid JSON ({' '.join(str(exc).split())[:120]})", path=path) from None
    if not _depth_ok(data, MAX_JSON_DEPTH):
        raise error(f"not valid JSON (nested more than {MAX_JSON_DEPTH} levels deep)", path=path)
    return data
