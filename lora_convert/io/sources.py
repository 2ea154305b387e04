"""Tensor sources: one file of one format, listed from its header and read a byte range at a time.

A :class:`~lora_convert.io.reader.Checkpoint` is a set of sources (one per shard).  Everything above
it asks for rows or flat element ranges of a named tensor; the checkpoint turns that into a byte
range of the tensor (``span``) and the tensor's source turns the byte range into bytes.  A new file
format is one subclass here: list its tensors in :meth:`TensorSource.infos`, fill a buffer in
:meth:`TensorSource.read_into`.

Why ``preadv`` rather than mmap for safetensors: pages touched through an mmap count in the process's
RSS until the kernel reclaims them, so streaming a 10 GB checkpoint through mmap shows 10 GB of RSS,
and a file truncated under an mmap kills the process with SIGBUS instead of raising.  ``preadv`` leaves
the bytes in the page cache (not ours) and our RSS bounded by the buffers we hold.
"""

from __future__ import annotations

import os
import pickle
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, UnsafeInputError
from .safetensors_format import MAX_TENSORS, TensorInfo, check_name, dtype_name, read_header, too_many

if TYPE_CHECKING:
    import torch


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


class SafetensorsSource(TensorSource):
    """A ``.safetensors`` file: header parsed and validated on open, data read with ``preadv``."""

    def __init__(self, path: Path, *, max_tensors: int = MAX_TENSORS) -> None:
        self.path = path
        header = read_header(path, max_tensors=max_tensors)
        self.metadata = header.metadata
        self._infos = {n: _with_source(i, self) for n, i in header.tensors.items()}
        self._fh: Any = None
        self._lock = threading.Lock()  # the pipeline's reader and worker may open the file at once

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def _fileno(self, info: TensorInfo) -> int:
        if self._fh is None:
            with self._lock:
                if self._fh is None:
                    try:
                        self._fh = open(self.path, "rb", buffering=0)  # noqa: SIM115 - kept open until close()
                    except OSError as exc:
                        raise CheckpointError(
                            f"cannot open: {exc.strerror}", path=self.path, tensor=info.name
                        ) from None
        return self._fh.fileno()

    def read_into(self, info: TensorInfo, start: int, nbytes: int, buf: torch.Tensor | None) -> torch.Tensor:
        fd = self._fileno(info)
        if buf is None:
            buf = _empty_bytes(nbytes)
        if nbytes:
            view = buf.numpy().data
            got, offset = 0, info.offset + start
            while got < nbytes:
                n = os.preadv(fd, [view[got:nbytes]], offset + got)
                if n == 0:
                    raise CheckpointError(
                        "file ended while reading this tensor (truncated after opening?)",
                        path=self.path,
                        tensor=info.name,
                    )
                got += n
        return buf

    def prefetch(self, info: TensorInfo, start: int, nbytes: int) -> None:
        """``POSIX_FADV_WILLNEED``: the disk starts reading while we compute on the previous block."""
        if not nbytes or not hasattr(os, "posix_fadvise"):
            return
        try:
            os.posix_fadvise(self._fileno(info), info.offset + start, nbytes, os.POSIX_FADV_WILLNEED)
        except (OSError, CheckpointError):
            pass  # a hint: the read itself reports real errors

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class BinSource(TensorSource):
    """A PyTorch ``.bin``/``.pt`` state dict, unpickled with ``weights_only`` (no code runs).

    The tensors are memory-mapped where the file allows (zip format) and copied out a byte range at a
    time.  A tensor stored non-contiguously is made contiguous once and kept while it is being read,
    so reading it in blocks costs one copy, not one per block."""

    def __init__(self, path: Path, *, max_tensors: int = MAX_TENSORS) -> None:
        self.path = path
        self.metadata: dict[str, str] = {}
        self._tensors = _load_bin(path)
        if len(self._tensors) > max_tensors:
            raise too_many(max_tensors, path)
        self._infos: dict[str, TensorInfo] = {}
        for name, t in self._tensors.items():
            dname = _bin_dtype(check_name(name, path), t, path)
            self._infos[name] = TensorInfo(name, dname, tuple(t.shape), path, 0, t.numel() * t.element_size(), self)
        self._flat: tuple[str, torch.Tensor] | None = None  # (name, contiguous bytes) of the tensor being read

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def _bytes_of(self, name: str) -> torch.Tensor:
        import torch

        flat = self._flat
        if flat is None or flat[0] != name:
            t = self._tensors[name]
            flat = (
                name,
                t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8),
            )
            self._flat = flat
        return flat[1]

    def read_into(self, info: TensorInfo, start: int, nbytes: int, buf: torch.Tensor | None) -> torch.Tensor:
        piece = self._bytes_of(info.name)[start : start + nbytes]
        return piece.clone() if buf is None else buf.copy_(piece)

    def close(self) -> None:
        self._tensors = {}
        self._flat = None


def _bin_dtype(name: str, t: torch.Tensor, path: Path) -> str:
    """The safetensors dtype of a tensor from a state dict, which must be what a safetensors file can
    hold: a plain dense CPU tensor of a dtype safetensors stores (not complex, not float8 *fnuz)."""
    import torch

    if t.layout != torch.strided or t.device.type != "cpu" or t.is_quantized:
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


def _load_bin(path: Path) -> dict[str, Any]:
    import torch

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise
            # the legacy (pre-1.6, non-zip) format cannot be mmapped; still weights_only
            obj = torch.load(path, map_location="cpu", weights_only=True)
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
    return obj


def open_source(path: Path, *, max_tensors: int = MAX_TENSORS) -> TensorSource:
    """The source for one weights file, chosen by its suffix; it may hold at most ``max_tensors``
    (what is left of the checkpoint's bound once the other shards are listed)."""
    if path.suffix == ".safetensors":
        return SafetensorsSource(path, max_tensors=max_tensors)
    return BinSource(path, max_tensors=max_tensors)
