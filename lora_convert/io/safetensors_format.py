"""The safetensors file format, parsed and checked by us.

We parse headers ourselves (rather than only through ``safe_open``) for two reasons:
listing a multi-GB checkpoint must cost one small read per file, and a file from a
stranger must be checked *before* we trust any number in it — every offset, shape and
dtype is validated, and an error names the file and the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {torch.float64, torch.float32, torch.float16, torch.bfloat16}


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: enough to read it, or a slice of its rows, without the rest."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in ``file`` (-1 for .bin tensors)
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, str(self.dtype).removeprefix("torch."))


@dataclass
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def read_header(path: Path, fh: BinaryIO | None = None) -> Header:
    """Read and fully validate the header of one .safetensors file."""
    own = fh is None
    try:
        if own:
            try:
                fh = open(path, "rb")
            except FileNotFoundError:
                raise CheckpointError("file not found", path=path) from None
            except IsADirectoryError:
                raise CheckpointError("is a directory, expected a .safetensors file", path=path) from None
            except PermissionError:
                raise CheckpointError("permission denied", path=path) from None
        assert fh is not None
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(0)
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"truncated: {size} bytes, too short for a safetensors header", path=path,
                                  hint="the download or copy was probably cut off")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"header claims {n} bytes (limit {MAX_HEADER_BYTES})", path=path,
                                  hint="not a safetensors file, or a corrupted one")
        if 8 + n > size:
            raise CheckpointError(f"truncated: header claims {n} bytes but the file has {size}", path=path,
                                  hint="the download or copy was probably cut off")
        raw = fh.read(n)
    finally:
        if own and fh is not None:
            fh.close()
    return parse_header(path, raw, size)


def parse_header(path: Path, raw: bytes, file_size: int) -> Header:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError("header is not UTF-8", path=path, hint="not a safetensors file") from None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError, or an integer over Python's digit limit
        raise CheckpointError("header is not valid JSON", path=path, hint="not a safetensors file") from None
    if not isinstance(obj, dict):
        raise CheckpointError("header is not a JSON object", path=path)
    data_start = 8 + len(raw)
    data_len = file_size - data_start
    metadata = obj.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError("__metadata__ must map strings to strings", path=path)
    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, TensorInfo] = {}
    for name, info in obj.items():
        if not isinstance(info, dict):
            raise CheckpointError("header entry is not an object", path=path, tensor=name)
        dtype_name = info.get("dtype")
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise CheckpointError(f"unknown dtype {dtype_name!r}", path=path, tensor=name)
        if (not isinstance(shape, list) or len(shape) > 16
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**53 for d in shape)):
            raise CheckpointError(f"bad shape {shape!r}", path=path, tensor=name)
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise CheckpointError(f"bad data_offsets {offsets!r}", path=path, tensor=name)
        begin, end = offsets
        if not 0 <= begin <= end:
            raise CheckpointError(f"bad data_offsets {offsets!r}", path=path, tensor=name)
        if end > data_len:
            raise CheckpointError(
                f"data_offsets end {end} is past the end of the data ({data_len} bytes)", path=path, tensor=name,
                hint="the file is truncated or its header lies")
        dtype = DTYPES[dtype_name]
        expected = math.prod(shape) * dtype_size(dtype)
        if expected != end - begin:
            raise CheckpointError(
                f"shape {shape} x {dtype_name} needs {expected} bytes but data_offsets span {end - begin}",
                path=path, tensor=name)
        spans.append((begin, end, name))
        tensors[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + begin, end - begin)
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin < pos:
            raise CheckpointError("data overlaps the previous tensor's", path=path, tensor=name)
        if begin > pos:
            raise CheckpointError(f"gap of {begin - pos} bytes before this tensor's data", path=path, tensor=name)
        pos = end
    if pos != data_len:
        raise CheckpointError(f"{data_len - pos} trailing bytes after the last tensor", path=path,
                              hint="the file is corrupted or was written by a broken tool")
    return Header(tensors, metadata, data_start, file_size)


def build_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> tuple[bytes, list[int]]:
    """Header bytes (padded to 8) and the data offsets for tensors written in the given order."""
    obj: dict[str, object] = {}
    if metadata is not None:
        obj["__metadata__"] = metadata
    pos = 0
    starts: list[int] = []
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype_size(dtype)
        obj[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        starts.append(pos)
        pos += nbytes
    raw = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, starts
