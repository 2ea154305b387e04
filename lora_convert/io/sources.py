"""Tensor sources: one file of one format, listed from its header and read a byte range at a time.

A :class:`~lora_convert.io.reader.Checkpoint` is a set of sources (one per shard).  Everything above
it asks for rows or flat element ranges of a named tensor; the checkpoint turns that into a byte
range of the tensor (``span``) and the tensor's source turns the byte range into bytes.  A new file
format is one subclass here: list its tensors in :meth:`TensorSource.infos`, fill a buffer in
:meth:`TensorSource.read_into`.

Why ``preadv`` rather than mmap (for safetensors and for zip-format ``.bin`` alike): pages touched through
an mmap count in the process's RSS until the kernel reclaims them, so streaming a 10 GB checkpoint
through mmap shows 10 GB of RSS, and a file truncated under an mmap kills the process with SIGBUS instead
of raising.  ``preadv`` leaves the bytes in the page cache (not ours) and our RSS bounded by the buffers
we hold, and a file that ends early is a :class:`CheckpointError` naming the file and tensor.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import struct
import threading
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, UnsafeInputError
from . import direct as direct_io
from .safetensors_format import MAX_TENSORS, TensorInfo, check_name, dtype_name, read_header, too_many

if TYPE_CHECKING:
    import torch

DIRECT_MIN = 256 << 10  # reads at least this large go around the page cache (io/direct.py); smaller ones through it


class TensorSource:
    """One file's tensors.  Subclasses list them and read byte ranges of one tensor's data."""

    path: Path
    metadata: dict[str, str]

    def infos(self) -> dict[str, TensorInfo]:
        raise NotImplementedError

    def read_into(self, info: TensorInfo, start: int, nbytes: int, buf: torch.Tensor | None) -> torch.Tensor:
        """Bytes ``start:start+nbytes`` of ``info``'s data into ``buf`` (uint8, exactly ``nbytes``; a
        fresh buffer when None); returns the filled uint8 tensor."""
        raise NotImplementedError

    def prefetch(self, info: TensorInfo, start: int, nbytes: int) -> None:
        """A hint that those bytes will be read soon.  The default does nothing."""

    def close(self) -> None:
        """Release file handles and anything held in memory."""


def _empty_bytes(nbytes: int) -> torch.Tensor:
    import torch

    return torch.empty(nbytes, dtype=torch.uint8)


def _pread_exact(fd: int, offset: int, nbytes: int, buf: torch.Tensor | None, path: Path, name: str) -> torch.Tensor:
    """``nbytes`` bytes of the file at ``offset`` into ``buf`` (a fresh one when None); a file that ends
    first (truncated since it was opened) is a CheckpointError naming the file and the tensor."""
    if buf is None:
        buf = _empty_bytes(nbytes)
    if nbytes:
        view = buf.numpy().data
        got = 0
        while got < nbytes:
            try:
                n = os.preadv(fd, [view[got:nbytes]], offset + got)
            except OSError as exc:
                raise CheckpointError(f"cannot read: {exc.strerror}", path=path, tensor=name) from None
            if n == 0:
                raise CheckpointError(
                    "file ended while reading this tensor (truncated after opening?)", path=path, tensor=name
                )
            got += n
    return buf


class _LazyFile:
    """One file opened on first read and kept open until close(): the pipeline's reader and worker threads
    may ask for it at once, so the open is guarded; a failure names the file and the tensor asked for."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: Any = None
        self._lock = threading.Lock()
        self._direct: direct_io.DirectReader | None = None  # opened on the first large read
        self._refused = False  # the file system refuses O_DIRECT: plain reads only

    def fileno(self, tensor: str) -> int:
        if self._fh is None:
            with self._lock:
                if self._fh is None:
                    try:
                        self._fh = open(self.path, "rb", buffering=0)  # noqa: SIM115 - kept open until close()
                    except OSError as exc:
                        raise CheckpointError(f"cannot open: {exc.strerror}", path=self.path, tensor=tensor) from None
        return self._fh.fileno()

    def direct(self, tensor: str) -> direct_io.DirectReader | None:
        """A reader that bypasses the page cache (io/direct.py), or None where the file system refuses it."""
        if self._direct is None and not self._refused:
            plain = self.fileno(tensor)
            with self._lock:
                if self._direct is None and not self._refused:
                    try:
                        if not direct_io.O_DIRECT or direct_io.DISABLED:
                            raise OSError(errno.EINVAL, "no O_DIRECT")
                        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | direct_io.O_DIRECT)
                    except OSError:  # EINVAL: no O_DIRECT on this file system
                        self._refused = True
                    else:
                        self._direct = direct_io.DirectReader(plain, fd)
        return self._direct

    def no_direct(self) -> None:
        """The file system took the direct open but refused a direct read: plain reads from now on."""
        with self._lock:
            self._refused = True
            self._close_direct()

    def _close_direct(self) -> None:
        if self._direct is not None:
            self._direct.close()
            os.close(self._direct.direct)
            self._direct = None

    def close(self) -> None:
        with self._lock:
            self._close_direct()
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _read_direct(file: _LazyFile, offset: int, nbytes: int, buf: torch.Tensor | None, name: str) -> torch.Tensor | None:
    """A large read through :class:`~lora_convert.io.direct.DirectReader`; None where direct reads are
    refused (the caller reads plainly)."""
    reader = file.direct(name) if nbytes >= DIRECT_MIN else None
    if reader is None:
        return None
    if buf is None:
        buf = _empty_bytes(nbytes)
    try:
        got = reader.read_into(buf.numpy().data[:nbytes], offset)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            file.no_direct()
            return None
        raise CheckpointError(f"cannot read: {exc.strerror}", path=file.path, tensor=name) from None
    if got != nbytes:
        raise CheckpointError(
            "file ended while reading this tensor (truncated after opening?)", path=file.path, tensor=name
        )
    return buf


def read_spare(file: _LazyFile, offset: int, nbytes: int, slot: torch.Tensor, name: str) -> torch.Tensor | None:
    """``nbytes`` at ``offset`` read straight into ``slot`` (uint8, contiguous, every byte of it scratch) with one
    direct read (:meth:`~lora_convert.io.direct.DirectReader.read_spare`): the uint8 view of ``slot`` that holds
    them, or None where that cannot be done (a small read, no room, no ``O_DIRECT``: the caller reads plainly)."""
    reader = file.direct(name) if nbytes >= DIRECT_MIN else None
    if reader is None:
        return None
    try:
        at = reader.read_spare(slot.numpy().data, slot.data_ptr(), offset, nbytes)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            file.no_direct()
            return None
        raise CheckpointError(f"cannot read: {exc.strerror}", path=file.path, tensor=name) from None
    if at is None:
        return None
    if at < 0:
        raise CheckpointError(
            "file ended while reading this tensor (truncated after opening?)", path=file.path, tensor=name
        )
    return slot[at : at + nbytes]


class SafetensorsSource(TensorSource):
    """A ``.safetensors`` file: header parsed and validated on open, data read with ``preadv``."""

    def __init__(self, path: Path, *, max_tensors: int = MAX_TENSORS) -> None:
        self.path = path
        header = read_header(path, max_tensors=max_tensors)
        self.metadata = header.metadata
        self._infos = {n: _with_source(i, self) for n, i in header.tensors.items()}
        self._file = _LazyFile(path)

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def _fileno(self, info: TensorInfo) -> int:
        return self._file.fileno(info.name)

    def read_into(self, info: TensorInfo, start: int, nbytes: int, buf: torch.Tensor | None) -> torch.Tensor:
        got = _read_direct(self._file, info.offset + start, nbytes, buf, info.name)
        if got is not None:
            return got
        return _pread_exact(self._fileno(info), info.offset + start, nbytes, buf, self.path, info.name)

    def read_spare(self, info: TensorInfo, start: int, nbytes: int, slot: torch.Tensor) -> torch.Tensor | None:
        """Bytes ``start:start+nbytes`` of ``info``'s data somewhere inside ``slot`` (every byte of it scratch), with
        no copy; None where only :meth:`read_into` can read them (see :func:`read_spare`)."""
        return read_spare(self._file, info.offset + start, nbytes, slot, info.name)

    def prefetch(self, info: TensorInfo, start: int, nbytes: int) -> None:
        """``POSIX_FADV_WILLNEED``: the disk starts reading while we compute on the previous block.  Not
        for reads that go around the page cache (they would read the same bytes twice)."""
        if not nbytes or not hasattr(os, "posix_fadvise"):
            return
        if nbytes >= DIRECT_MIN and self._file.direct(info.name) is not None:
            return
        try:
            os.posix_fadvise(self._fileno(info), info.offset + start, nbytes, os.POSIX_FADV_WILLNEED)
        except (OSError, CheckpointError):
            pass  # a hint: the read itself reports real errors

    def close(self) -> None:
        self._file.close()


class BinSource(TensorSource):
    """A PyTorch ``.bin``/``.pt`` state dict, unpickled with ``weights_only`` (no code runs).

    A zip-format file (every ``torch.save`` since 1.6) is unpickled onto the meta device: that gives each
    tensor's shape, strides and the file offset of its storage (``_checkpoint_offset``) without reading
    data, which is then read with ``preadv`` like safetensors — a file truncated meanwhile is an error
    line, not SIGBUS (as an mmap would give).  A tensor stored non-contiguously is read (its storage
    span), made contiguous once and kept while it is being read, so reading it in blocks costs one copy.
    The legacy (pre-1.6) format and big-endian files are loaded whole into memory: no mmap either."""

    def __init__(self, path: Path, *, max_tensors: int = MAX_TENSORS) -> None:
        self.path = path
        self.metadata: dict[str, str] = {}
        self._tensors, self._offsets = _load_bin(path)  # offsets: name -> file offset of its storage (meta)
        if len(self._tensors) > max_tensors:
            raise too_many(max_tensors, path)
        self._infos: dict[str, TensorInfo] = {}
        for name, t in self._tensors.items():
            dname = _bin_dtype(check_name(name, path), t, path)
            self._infos[name] = TensorInfo(name, dname, tuple(t.shape), path, 0, t.numel() * t.element_size(), self)
        self._flat: tuple[str, torch.Tensor] | None = None  # (name, contiguous bytes) of the tensor being read
        self._file = _LazyFile(path)

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def _fileno(self, name: str) -> int:
        return self._file.fileno(name)

    def _span(self, name: str) -> tuple[int, int]:
        """(file offset, bytes) of the storage bytes the tensor covers, from its first element to its last."""
        t = self._tensors[name]
        size = t.element_size()
        lo = t.storage_offset()
        hi = lo + 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) if t.numel() else lo
        return self._offsets[name] + lo * size, (hi - lo) * size

    def _bytes_of(self, name: str) -> torch.Tensor:
        import torch

        flat = self._flat
        if flat is None or flat[0] != name:
            t = self._tensors[name]
            if not t.numel():
                data = torch.empty(0, dtype=torch.uint8)
            elif name in self._offsets:  # read the storage span, then lay it out as the tensor
                offset, nbytes = self._span(name)
                raw = _pread_exact(self._fileno(name), offset, nbytes, None, self.path, name)
                span = raw.view(t.dtype)
                data = span.as_strided(t.shape, t.stride(), 0).contiguous().reshape(-1).view(torch.uint8)
            else:
                data = t.contiguous().reshape(-1).view(torch.uint8)
            flat = (name, data)
            self._flat = flat
        return flat[1]

    def read_into(self, info: TensorInfo, start: int, nbytes: int, buf: torch.Tensor | None) -> torch.Tensor:
        if info.name in self._offsets and self._tensors[info.name].is_contiguous():
            offset = self._span(info.name)[0]
            got = _read_direct(self._file, offset + start, nbytes, buf, info.name)
            if got is not None:
                return got
            return _pread_exact(self._fileno(info.name), offset + start, nbytes, buf, self.path, info.name)
        piece = self._bytes_of(info.name)[start : start + nbytes]
        return piece.clone() if buf is None else buf.copy_(piece)

    def prefetch(self, info: TensorInfo, start: int, nbytes: int) -> None:
        if not nbytes or info.name not in self._offsets or not hasattr(os, "posix_fadvise"):
            return
        try:
            offset = self._span(info.name)[0]
            os.posix_fadvise(self._fileno(info.name), offset + start, nbytes, os.POSIX_FADV_WILLNEED)
        except (OSError, CheckpointError):
            pass  # a hint: the read itself reports real errors

    def close(self) -> None:
        self._tensors = {}
        self._flat = None
        self._file.close()


def _bin_dtype(name: str, t: torch.Tensor, path: Path) -> str:
    """The safetensors dtype of a tensor from a state dict, which must be what a safetensors file can
    hold: a plain dense CPU tensor of a dtype safetensors stores (not complex, not float8 *fnuz)."""
    import torch

    if t.layout != torch.strided or t.device.type not in ("cpu", "meta") or t.is_quantized:
        if t.is_quantized:
            what = "quantized"
        elif t.layout != torch.strided:
            what = str(t.layout).removeprefix("torch.")
        else:
            what = f"on the {t.device.type} device"
        raise CheckpointError(f"a {what} tensor: only plain dense tensors can be converted", path=path, tensor=name)
    try:
        return dtype_name(t.dtype)
    except ValueError as exc:
        raise CheckpointError(
            str(exc), path=path, tensor=name, hint="convert this tensor to a supported dtype first"
        ) from None


def _with_source(info: TensorInfo, source: TensorSource) -> TensorInfo:
    return TensorInfo(info.name, info.dtype_name, info.shape, info.file, info.offset, info.nbytes, source)


def _zip_records(path: Path) -> tuple[dict[int, zipfile.ZipInfo], bool] | None:
    """The data records of a zip-format ``.bin`` by the file offset of their bytes, and whether the file
    says it is big-endian; None for the legacy (non-zip) format."""
    if not zipfile.is_zipfile(path):
        return None
    records: dict[int, zipfile.ZipInfo] = {}
    big = False
    with zipfile.ZipFile(path) as z, open(path, "rb") as fh:
        for zi in z.infolist():
            if zi.filename.endswith("/byteorder"):
                big = z.read(zi).strip() == b"big"
            if "/data/" not in zi.filename:
                continue
            fh.seek(zi.header_offset)
            head = fh.read(30)
            if len(head) != 30 or head[:4] != b"PK\x03\x04":
                continue
            n, extra = struct.unpack("<HH", head[26:30])
            records[zi.header_offset + 30 + n + extra] = zi
    return records, big


def _load_bin(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """name -> tensor, and name -> file offset of its storage for tensors left on the meta device (to be
    read with preadv); tensors without an offset were loaded into memory (legacy format, big-endian)."""
    import torch

    try:
        zipped = _zip_records(path)
        lazy = zipped is not None and not zipped[1]
        obj = torch.load(path, map_location="meta" if lazy else "cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        m = re.search(r"[Uu]nsupported (?:GLOBAL|global:?)\s*(?:GLOBAL\s*)?([\w.]+)", text)
        what = f"it asks to import {m.group(1)}" if m else " ".join(text.split())[:200]
        raise UnsafeInputError(
            f"refused to unpickle: {what}, which a file of plain tensors never does",
            path=path,
            hint="the file holds more than plain tensors; convert it to safetensors from a trusted source",
        ) from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/zipfile errors for broken files
        raise CheckpointError(f"cannot read PyTorch file: {type(exc).__name__}: {str(exc)[:200]}", path=path) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("not a state dict of tensors", path=path)
    offsets: dict[str, int] = {}
    if lazy and zipped is not None:
        records, size = zipped[0], os.path.getsize(path)
        for name, t in obj.items():
            if t.layout != torch.strided or t.is_quantized:
                continue  # refused by name when listed
            storage = t.untyped_storage()
            at = getattr(storage, "_checkpoint_offset", None)
            zi = records.get(at) if isinstance(at, int) else None
            if (
                zi is None
                or not isinstance(at, int)
                or zi.compress_type != zipfile.ZIP_STORED
                or zi.file_size < storage.nbytes()
            ):
                raise CheckpointError(
                    "the tensor's data is not stored as plain bytes in the file (a compressed or damaged record)",
                    path=path,
                    tensor=str(name),
                )
            if at + storage.nbytes() > size:
                raise CheckpointError("file ended before this tensor's data (truncated)", path=path, tensor=str(name))
            offsets[name] = at
    return obj, offsets


def open_source(path: Path, *, max_tensors: int = MAX_TENSORS) -> TensorSource:
    """The source for one weights file, chosen by its suffix; it may hold at most ``max_tensors``
    (what is left of the checkpoint's bound once the other shards are listed)."""
    if path.suffix == ".safetensors":
        return SafetensorsSource(path, max_tensors=max_tensors)
    return BinSource(path, max_tensors=max_tensors)
