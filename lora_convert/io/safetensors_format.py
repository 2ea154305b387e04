"""The safetensors file format, parsed and checked by us.

We parse headers ourselves (rather than only through ``safe_open``) for two reasons:
listing a multi-GB checkpoint must cost one small read per file, and a file from a
stranger must be checked *before* we trust any number in it — every offset, shape and
dtype is validated, and an error names the file and the tensor.

Torch-free on purpose: ``detect``, ``report`` and ``--help`` list checkpoints from headers
alone and must not pay for importing torch.  Dtypes are safetensors' own names ("BF16");
:func:`torch_dtype` maps one to torch when a tensor is actually read or written.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ..errors import CheckpointError
from .files import open_regular

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces
# Tensors in one checkpoint, all shards together: bookkeeping costs ~1 KB a tensor to list (detect)
# and ~2.5 KB through a merge, so this bounds a merge near 1 GB.  Real checkpoints hold <= ~1.5x10^5.
MAX_TENSORS = 300_000
_INT64 = 2**63
_METADATA_COMMAS = 100_000
MAX_METADATA_BYTES = 16 * 2**20  # __metadata__ kept for a checkpoint, all shards together

#: safetensors dtype name -> (bytes per element, torch attribute name)
DTYPE_TABLE: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U64": (8, "uint64"),
    "U32": (4, "uint32"),
    "U16": (2, "uint16"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E8M0": (1, "float8_e8m0fnu"),
}
FLOAT_NAMES = frozenset({"F64", "F32", "F16", "BF16"})  # what a merge computes in and writes back


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (imports torch: only for tensors actually touched)."""
    import torch

    return getattr(torch, DTYPE_TABLE[name][1])


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype; ValueError for one safetensors cannot store."""
    attr = str(dtype).removeprefix("torch.")
    for name, (_, a) in DTYPE_TABLE.items():
        if a == attr:
            return name
    raise ValueError(f"dtype {attr} cannot be stored in safetensors")


def dtype_size(dtype: Any) -> int:
    """Bytes per element of a torch dtype or a safetensors dtype name."""
    if isinstance(dtype, str):
        return DTYPE_TABLE[dtype][0]
    return dtype.itemsize


def check_name(name: object, path: Path) -> str:
    """A tensor name must be a string that UTF-8 can encode: one with a lone surrogate (valid
    JSON escapes, or a .bin key) would be written into a header no safetensors reader accepts."""
    if not isinstance(name, str):
        raise CheckpointError(f"tensor name {_brief(name)} is not a string", path=path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(
            "tensor name is not valid Unicode (it holds a lone surrogate); safetensors cannot store it",
            path=path,
            tensor=name,
        ) from None
    return name


def check_shape_fits(shape: tuple[int, ...] | list[int], itemsize: int, path: Path, name: str) -> None:
    """torch multiplies the dimensions in order, so a zero-size shape whose *other* dimensions
    multiply past int64 cannot be made a tensor: refuse it here, by name."""
    size = itemsize
    for d in shape:
        size *= d or 1
        if size >= _INT64:
            raise CheckpointError(
                f"shape {_brief(list(shape))} is too large for any tensor (its dimensions multiply past 2^63)",
                path=path,
                tensor=name,
                hint="the header is corrupted",
            )


def too_many(max_tensors: int, path: Path) -> CheckpointError:
    """The error for a file that holds more tensors than the checkpoint has room left for."""
    return CheckpointError(
        f"holds more than {max_tensors} tensors (at most {MAX_TENSORS} in one checkpoint)",
        path=path,
        hint="not a real model, or a corrupted header",
    )


def add_metadata(into: dict[str, str], new: dict[str, str], path: Path) -> dict[str, str]:
    """``into`` updated with one file's ``__metadata__``; what a checkpoint keeps is bounded, or a
    thousand shards of 99 MB metadata strings would all stay in memory."""
    into.update(new)
    if sum(len(k) + len(v) for k, v in into.items()) > MAX_METADATA_BYTES:
        raise CheckpointError(
            f"__metadata__ of the checkpoint's files adds up to more than {MAX_METADATA_BYTES // 2**20} MiB",
            path=path,
            hint="not a real model's metadata",
        )
    return into


def _brief(value: object) -> str:
    """A value from a header, for a message: its repr, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _TooMany(Exception):
    pass


def _counting_hook(limit: int):  # type: ignore[no-untyped-def]
    """object_pairs_hook that stops the parse once more than ``limit`` objects were built, so that a
    header of a million empty tensors is refused before it costs gigabytes."""
    seen = [0]

    def hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        seen[0] += 1
        if seen[0] > limit:
            raise _TooMany()
        return dict(pairs)

    return hook


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: enough to read it, or a slice of its rows, without the rest.

    ``source`` is the :class:`~lora_convert.io.sources.TensorSource` that reads its bytes."""

    name: str
    dtype_name: str  # safetensors' name: "BF16", "F32", ...
    shape: tuple[int, ...]
    file: Path
    offset: int  # byte offset of the data within what ``source`` reads (the file, for safetensors)
    nbytes: int
    source: Any = field(default=None, compare=False, repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPE_TABLE[self.dtype_name][0]

    @property
    def is_float(self) -> bool:
        return self.dtype_name in FLOAT_NAMES

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype_name)


_STRUCT = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U8": "<B"}


def decode_scalar(data: bytes, name: str) -> float:
    """One stored element as a Python float, without torch (bf16 is the top half of an f32)."""
    if name == "BF16":
        return struct.unpack("<f", b"\x00\x00" + data[:2])[0]
    if name == "BOOL":
        return float(data[0] != 0)
    if name not in _STRUCT:
        raise CheckpointError(f"cannot read a {name} value as a number")
    return float(struct.unpack(_STRUCT[name], data[: struct.calcsize(_STRUCT[name])])[0])


@dataclass
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def read_header(path: Path, fh: IO[bytes] | None = None, *, max_tensors: int = MAX_TENSORS) -> Header:
    """Read and fully validate the header of one .safetensors file."""
    own = fh is None
    try:
        if own:
            fh = open_regular(path)  # a folder, FIFO or device is refused by name, without blocking
        assert fh is not None
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(0)
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(
                f"truncated: {size} bytes, too short for a safetensors header",
                path=path,
                hint="the download or copy was probably cut off",
            )
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"header claims {n} bytes (limit {MAX_HEADER_BYTES})",
                path=path,
                hint="not a safetensors file, or a corrupted one",
            )
        if 8 + n > size:
            raise CheckpointError(
                f"truncated: header claims {n} bytes but the file has {size}",
                path=path,
                hint="the download or copy was probably cut off",
            )
        raw = fh.read(n)
    finally:
        if own and fh is not None:
            fh.close()
    return parse_header(path, raw, size, max_tensors=max_tensors)


def _parse_json(path: Path, raw: bytes, max_tensors: int) -> Any:
    """The header's JSON, parsed within the tensor bound: refused before the parse when it holds
    more values than that many tensors could, and as soon as it has built more objects."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError("header is not UTF-8", path=path, hint="not a safetensors file") from None
    # Arrays cost memory too and no hook sees them: a real entry has at most ~20 commas (16 dims)
    if raw.count(b",") > 20 * max(0, max_tensors) + _METADATA_COMMAS:
        raise CheckpointError(
            f"header holds more JSON values than {max_tensors} tensors could",
            path=path,
            hint="not a real model, or a corrupted header",
        )
    try:  # objects: one per tensor, the header, __metadata__
        return json.loads(text, object_pairs_hook=_counting_hook(max(0, max_tensors) + 2))
    except _TooMany:
        raise too_many(max_tensors, path) from None
    except (ValueError, RecursionError):  # JSONDecodeError, or an integer over Python's digit limit
        raise CheckpointError("header is not valid JSON", path=path, hint="not a safetensors file") from None


def parse_header(path: Path, raw: bytes, file_size: int, *, max_tensors: int = MAX_TENSORS) -> Header:
    obj = _parse_json(path, raw, max_tensors)
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
    if len(obj) > max_tensors:
        raise too_many(max_tensors, path)
    for key in metadata:
        check_name(key, path)
    for name, info in obj.items():
        check_name(name, path)
        if not isinstance(info, dict):
            raise CheckpointError("header entry is not an object", path=path, tensor=name)
        dtype_name = info.get("dtype")
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if not isinstance(dtype_name, str) or dtype_name not in DTYPE_TABLE:
            raise CheckpointError(f"unknown dtype {_brief(dtype_name)}", path=path, tensor=name)
        if (
            not isinstance(shape, list)
            or len(shape) > 16
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**53 for d in shape)
        ):
            raise CheckpointError(f"bad shape {_brief(shape)}", path=path, tensor=name)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise CheckpointError(f"bad data_offsets {_brief(offsets)}", path=path, tensor=name)
        begin, end = offsets
        if not 0 <= begin <= end:
            raise CheckpointError(f"bad data_offsets {_brief(offsets)}", path=path, tensor=name)
        if end > data_len:
            raise CheckpointError(
                f"data_offsets end {end} is past the end of the data ({data_len} bytes)",
                path=path,
                tensor=name,
                hint="the file is truncated or its header lies",
            )
        check_shape_fits(shape, DTYPE_TABLE[dtype_name][0], path, name)
        expected = math.prod(shape) * DTYPE_TABLE[dtype_name][0]
        if expected != end - begin:
            raise CheckpointError(
                f"shape {shape} x {dtype_name} needs {expected} bytes but data_offsets span {end - begin}",
                path=path,
                tensor=name,
            )
        spans.append((begin, end, name))
        tensors[name] = TensorInfo(name, dtype_name, tuple(shape), path, data_start + begin, end - begin)
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin < pos:
            raise CheckpointError("data overlaps the previous tensor's", path=path, tensor=name)
        if begin > pos:
            raise CheckpointError(f"gap of {begin - pos} bytes before this tensor's data", path=path, tensor=name)
        pos = end
    if pos != data_len:
        raise CheckpointError(
            f"{data_len - pos} trailing bytes after the last tensor",
            path=path,
            hint="the file is corrupted or was written by a broken tool",
        )
    return Header(tensors, metadata, data_start, file_size)


def build_header(
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, list[int]]:
    """Header bytes (padded to 8) and the data offsets for tensors written in the given order."""
    obj: dict[str, object] = {}
    if metadata is not None:
        obj["__metadata__"] = metadata
    pos = 0
    starts: list[int] = []
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype_size(dtype)
        obj[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        starts.append(pos)
        pos += nbytes
    raw = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, starts
