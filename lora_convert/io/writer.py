"""Tensor sinks — where a conversion's output tensors go — and the streaming safetensors one.

A sink is told the whole plan first (names, dtypes, shapes: every job knows them before any data is
read), then receives each tensor's data in plan order, whole or as consecutive row blocks.  A new
output format is one sink.  The safetensors sink computes each file's header from the plan, so it
writes each file front to back in one pass and never holds more than the block being written and
one 8 MB staging buffer, which goes to the disk around the page cache (``O_DIRECT``, io/direct.py);
each file is fsynced when done.  Sharding follows huggingface_hub (an index when there are several files).
"""

from __future__ import annotations

import errno
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import OutputError
from .direct import StagedFile, write_synced
from .safetensors_format import build_header, dtype_size

if TYPE_CHECKING:
    import torch

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units, as huggingface_hub; ``GiB`` is binary)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)


def assign_shards(entries: list[PlannedTensor], max_shard_size: int) -> list[list[PlannedTensor]]:
    """Greedy in plan order, like transformers' ``shard_checkpoint``: a tensor larger than the
    limit gets a shard of its own."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def shard_names(n: int, stem: str = "model") -> list[str]:
    if n == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _as_bytes(t: torch.Tensor) -> tuple[memoryview, int]:
    """The tensor's bytes and their address (a contiguous copy's, for a strided tensor)."""
    import torch

    t = t.detach().contiguous().reshape(-1)
    return (memoryview(t.view(torch.uint8).numpy().data), t.data_ptr()) if t.numel() else (memoryview(b""), 0)


class TensorSink(Protocol):
    """Where planned tensors are written."""

    def open(self, plan: list[PlannedTensor]) -> None:
        """Every tensor that will be written, in order, before any data."""

    def write(self, name: str, data: torch.Tensor) -> None:
        """The whole tensor ``name``, or its next block of rows, in plan order."""

    def close(self) -> list[str]:
        """Finish writing; returns the names of the files written."""

    def abort(self) -> None:
        """Release what is open after a failure (the caller removes the files)."""


class SafetensorsWriter:
    """Writes planned tensors into ``folder`` as one file or shards plus an index."""

    def __init__(
        self,
        folder: Path,
        entries: list[PlannedTensor],
        *,
        max_shard_size: int | str = "5GB",
        stem: str = "model",
        metadata: dict[str, str] | None = None,
        only: int | None = None,
    ) -> None:
        """``only``: write that shard alone (its tensors, in plan order) and no index: one task of a merge split by
        output shard (``merge --ray``); :meth:`write_index` writes the index once every shard is there."""
        self.folder = Path(folder)
        self.entries = list(entries)
        self.only = only
        names = [e.name for e in self.entries]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"tensor planned twice: {dup}")
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = assign_shards(self.entries, parse_size(max_shard_size))
        self.files = shard_names(len(self.shards), stem)
        self.stem = stem
        self._order = [(si, e) for si, shard in enumerate(self.shards) for e in shard if only in (None, si)]
        self._pos = 0  # index into _order of the tensor being written
        self._written = 0  # bytes of that tensor written so far
        self._fh: StagedFile | None = None
        self._shard = -1
        self._starts: dict[str, int] | None = None  # file offsets of the tensors' data (file_offset)

    def file_offset(self, name: str) -> int | None:
        """Where tensor ``name``'s data starts in its file (None for a tensor this writer does not write):
        ``Buffers.out`` places output blocks at that alignment, so the disk takes them from where they lie."""
        if self._starts is None:
            self._starts = {}
            for si, shard in enumerate(self.shards):
                if self.only in (None, si):
                    header, starts = build_header([(e.name, e.dtype, e.shape) for e in shard], self.metadata)
                    self._starts.update({e.name: len(header) + at for e, at in zip(shard, starts, strict=True)})
        return self._starts.get(name)

    @property
    def total_size(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def _open_shard(self, si: int) -> None:
        self._finish_shard()
        header, _ = build_header([(e.name, e.dtype, e.shape) for e in self.shards[si]], self.metadata)
        path = self.folder / self.files[si]
        self._fh = StagedFile(path)
        self._shard = si
        self._guard(self._fh.write, header, path)

    def _finish_shard(self) -> None:
        """The shard being written goes to the disk whole (``fsync``: an output is durable before it is
        renamed into place) and is closed."""
        if self._fh is None:
            return
        fh, path = self._fh, self.folder / self.files[self._shard]
        try:
            self._guard(lambda _: fh.sync(), None, path)
        finally:
            self._fh = None
            fh.close()

    def _guard(self, fn, data, path) -> None:  # type: ignore[no-untyped-def]
        try:
            fn(data)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise OutputError("disk full while writing", path=path, hint="free space or write elsewhere") from None
            raise OutputError(f"write failed: {exc.strerror}", path=path) from None

    def write(self, name: str, data: torch.Tensor) -> None:
        """Write ``data`` — the whole tensor ``name`` or its next block of rows — in plan order."""
        if self._pos >= len(self._order):
            raise ValueError(f"{name}: all planned tensors are already written")
        si, entry = self._order[self._pos]
        if entry.name != name:
            raise ValueError(f"{name}: written out of plan order (expected {entry.name})")
        if data.dtype != entry.dtype:
            raise ValueError(f"{name}: dtype {data.dtype}, planned {entry.dtype}")
        if self._shard != si:
            self._open_shard(si)
        raw, addr = _as_bytes(data)
        if self._written + len(raw) > entry.nbytes:
            raise ValueError(f"{name}: more bytes than its planned shape {entry.shape}")
        fh = self._fh
        assert fh is not None
        self._guard(lambda r: fh.write_at(r, addr), raw, self.folder / self.files[si])
        self._written += len(raw)
        if self._written == entry.nbytes:
            self._pos += 1
            self._written = 0

    def close(self) -> list[str]:
        """Finish the last file and write the index; returns the file names written."""
        while self._pos < len(self._order) and self._order[self._pos][1].nbytes == 0:
            si, entry = self._order[self._pos]
            if self._shard != si:
                self._open_shard(si)
            self._pos += 1
        if self._pos != len(self._order):
            raise ValueError(f"{self._order[self._pos][1].name}: planned but not written")
        self._finish_shard()
        if not self.entries:
            header, _ = build_header([], self.metadata)
            path = self.folder / self.files[0]
            self._guard(lambda h: write_synced(path, h), header, path)
        if self.only is not None:
            return [self.files[self.only]]
        self.write_index()
        return list(self.files)

    def write_index(self) -> None:
        """The index of a sharded output (nothing for one file)."""
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {e.name: self.files[si] for si, shard in enumerate(self.shards) for e in shard},
            }
            path = self.folder / f"{self.stem}.safetensors.index.json"
            text = json.dumps(index, indent=2, sort_keys=True) + "\n"
            self._guard(lambda t: write_synced(path, t.encode()), text, path)

    def abort(self) -> None:
        """Close whatever is open after a failure, without writing what is staged (the caller removes
        the files).  An error while closing says nothing new and must not hide the first: dropped."""
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError:
                pass


class SafetensorsSink:
    """The :class:`TensorSink` of safetensors files (``{stem}.safetensors``, or shards and an index)."""

    def __init__(
        self,
        folder: Path,
        *,
        max_shard_size: int | str = "5GB",
        stem: str = "model",
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.folder, self.max_shard_size, self.stem, self.metadata = Path(folder), max_shard_size, stem, metadata
        self._writer: SafetensorsWriter | None = None

    def open(self, plan: list[PlannedTensor]) -> None:
        self._writer = SafetensorsWriter(
            self.folder, plan, max_shard_size=self.max_shard_size, stem=self.stem, metadata=self.metadata
        )

    def write(self, name: str, data: torch.Tensor) -> None:
        assert self._writer is not None, "open() first"
        self._writer.write(name, data)

    def file_offset(self, name: str) -> int | None:
        """See :meth:`SafetensorsWriter.file_offset`."""
        return self._writer.file_offset(name) if self._writer is not None else None

    def close(self) -> list[str]:
        assert self._writer is not None, "open() first"
        return self._writer.close()

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
