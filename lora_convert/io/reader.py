"""Lazy checkpoints: list every tensor from headers, read one tensor (or a block of rows) at a time.

Data is read with ``preadv`` into a buffer (the caller's, when streaming) rather than through
an mmap: pages touched through an mmap count in the process's RSS until the kernel reclaims
them, so streaming a 10 GB checkpoint through mmap shows 10 GB of RSS, and a file truncated
under an mmap kills the process with SIGBUS instead of raising.  ``preadv`` leaves the bytes in
the page cache (not ours) and our RSS bounded by the buffers we hold.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import CheckpointError, UnsafeInputError
from .safetensors_format import TensorInfo, dtype_size, read_header

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
MODEL_SINGLES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class Checkpoint:
    """A checkpoint on disk.  Holds headers and open file handles, never tensor data."""

    root: Path  # the folder (or the file's folder)
    files: list[Path]
    layout: str  # "safetensors", "sharded-safetensors", "bin", "sharded-bin"
    kind: str  # "adapter" (adapter_model.*) or "model"
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None  # config.json
    adapter_config_path: Path | None = None
    adapter_name: str | None = None  # from a named-adapter subfolder
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)
    _bin: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- listing ---------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def dtypes(self) -> dict[str, int]:
        """Bytes per dtype name."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.dtype_name] = out.get(t.dtype_name, 0) + t.nbytes
        return out

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError("no such tensor", path=self.root, tensor=name) from None

    # -- reading -----------------------------------------------------------------------
    def read(self, name: str) -> torch.Tensor:
        """One whole tensor, in its stored dtype, owned by the caller."""
        info = self.info(name)
        if info.offset < 0:
            return self._bin_tensor(info).clone()
        return self._read_bytes(info, info.offset, info.nbytes).view(info.dtype).reshape(info.shape)

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (along dim 0) — a contiguous byte range on disk.

        With ``out`` (a contiguous tensor of the stored dtype and at least that many elements) the
        bytes land there and a view of it is returned: the streaming routes reuse a few buffers
        instead of faulting in fresh pages for every block, which measured ~40% of a merge's CPU.
        """
        info = self.info(name)
        if info.offset < 0:
            rows = self._bin_tensor(info)[start:stop]
            if out is None:
                return rows.clone()
            dst = out.reshape(-1)[:rows.numel()].view(rows.shape)
            return dst.copy_(rows)
        if not info.shape:
            return self.read(name)
        offset, nbytes = self.span(name, start, stop)
        rows = max(0, min(stop, info.shape[0]) - start)
        data = self._read_bytes(info, offset, nbytes, _byte_view(out, info, nbytes, f"rows {start}:{stop}"))
        return data.view(info.dtype).reshape((rows, *info.shape[1:]))

    def read_flat(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements ``start:stop`` of the flattened tensor (1-D): a contiguous byte range whatever the
        shape, so a copy can move a tensor whose single rows are huge (fused MoE experts) in
        bounded pieces."""
        info = self.info(name)
        if info.offset < 0:
            piece = self._bin_tensor(info).reshape(-1)[start:stop]
            return piece.clone() if out is None else out.reshape(-1)[:piece.numel()].copy_(piece)
        offset, nbytes = self.span(name, start, stop, flat=True)
        return self._read_bytes(info, offset, nbytes,
                                _byte_view(out, info, nbytes, f"elements {start}:{stop}")).view(info.dtype)

    def span(self, name: str, start: int, stop: int, *, flat: bool = False) -> tuple[int, int]:
        """(offset in its file, byte count) of rows ``start:stop`` — or, with ``flat``, of elements of
        the flattened tensor — clamped to the tensor's end.  The one place that turns a block into
        bytes: reads, prefetches and the pipeline's read-ahead window all go through it."""
        info = self.info(name)
        if flat:
            unit, count = info.dtype.itemsize, info.nbytes // info.dtype.itemsize
        else:
            count = info.shape[0] if info.shape else 1
            unit = info.nbytes // count if count else 0
        start = min(start, count)
        return info.offset + start * unit, (max(start, min(stop, count)) - start) * unit

    def prefetch(self, name: str, start: int, stop: int, *, flat: bool = False) -> None:
        """Ask the kernel to start reading rows ``start:stop`` now (``POSIX_FADV_WILLNEED``), so the
        disk works while we compute on the previous block.  A hint: errors are ignored."""
        info = self.tensors.get(name)
        if info is None or info.offset < 0 or not info.shape or not hasattr(os, "posix_fadvise"):
            return
        try:
            fh = self._handle(info)
        except CheckpointError:
            return
        offset, nbytes = self.span(name, start, stop, flat=flat)
        if nbytes:
            try:
                os.posix_fadvise(fh.fileno(), offset, nbytes, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass

    def _handle(self, info: TensorInfo) -> Any:
        fh = self._handles.get(info.file)
        if fh is None:
            with self._lock:  # the pipeline's reader and worker may open the same file at once
                fh = self._handles.get(info.file)
                if fh is None:
                    try:
                        fh = self._handles[info.file] = open(info.file, "rb", buffering=0)
                    except OSError as exc:
                        raise CheckpointError(f"cannot open: {exc.strerror}", path=info.file,
                                              tensor=info.name) from None
        return fh

    def _read_bytes(self, info: TensorInfo, offset: int, nbytes: int, buf: torch.Tensor | None = None) -> torch.Tensor:
        fh = self._handle(info)
        if buf is None:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            view = memoryview(buf.numpy())
            got = 0
            while got < nbytes:
                n = os.preadv(fh.fileno(), [view[got:]], offset + got)
                if n == 0:
                    raise CheckpointError("file ended while reading this tensor (truncated after opening?)",
                                          path=info.file, tensor=info.name)
                got += n
        return buf

    def _bin_tensor(self, info: TensorInfo) -> torch.Tensor:
        return self._bin[info.file][info.name]

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()
        self._bin.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _byte_view(out: torch.Tensor | None, info: TensorInfo, nbytes: int, what: str) -> torch.Tensor | None:
    """The first ``nbytes`` of the caller's buffer as uint8, after checking it can hold them."""
    if out is None:
        return None
    if out.dtype != info.dtype or not out.is_contiguous() or out.numel() * out.element_size() < nbytes:
        raise ValueError(f"{info.name}: buffer of {out.dtype} x {out.numel()} cannot hold {what}")
    return out.reshape(-1).view(torch.uint8)[:nbytes]


class _Pairs(list):  # type: ignore[type-arg]
    """A JSON object kept as its (key, value) pairs, so that repeated keys stay visible."""


def _load_json(path: Path, *, keep_pairs: bool = False) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text, object_pairs_hook=_Pairs if keep_pairs else None)
    except FileNotFoundError:
        raise CheckpointError("file not found", path=path) from None
    except IsADirectoryError:
        raise CheckpointError("is a directory, expected a JSON file", path=path) from None
    except PermissionError:
        raise CheckpointError("permission denied", path=path) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"not valid JSON ({str(exc)[:200]})", path=path) from None


def _safe_member(root: Path, rel: Any, index: Path) -> Path:
    """A shard named in an index must be a plain file inside the checkpoint folder."""
    # Checked on the spelling, not on the resolved path: a Hub cache snapshot is a folder of
    # symlinks into ../../blobs, which is fine; an index that *names* a path outside is not.
    if not isinstance(rel, str) or not rel:
        raise UnsafeInputError(f"shard path {rel!r} is not a file name", path=index)
    if (rel.startswith(("/", "\\")) or ".." in rel.replace("\\", "/").split("/") or ":" in rel
            or "\0" in rel or Path(rel).is_absolute()):
        raise UnsafeInputError(f"shard path {rel!r} escapes the checkpoint folder", path=index,
                               hint="an index may only name files inside its own folder")
    return root / rel


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
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
            f"refused to unpickle: {what}, which a file of plain tensors never does", path=path,
            hint="the file holds more than plain tensors; convert it to safetensors from a trusted source") from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/zipfile errors for broken files
        raise CheckpointError(f"cannot read PyTorch file: {type(exc).__name__}: {str(exc)[:200]}", path=path) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("not a state dict of tensors", path=path)
    return obj


def _add_file(tensors: dict[str, TensorInfo], bins: dict[Path, dict[str, torch.Tensor]], path: Path,
              only: set[str] | None = None) -> dict[str, str]:
    if path.suffix == ".bin":
        sd = _load_bin(path)
        bins[path] = sd
        items = sd.items()
        for name, t in items:
            if only is not None and name not in only:
                continue
            if name in tensors:
                raise CheckpointError("tensor appears in two files", path=path, tensor=name)
            tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), path, -1, t.numel() * dtype_size(t.dtype))
        return {}
    header = read_header(path)
    for name, info in header.tensors.items():
        if only is not None and name not in only:
            continue
        if name in tensors:
            raise CheckpointError(f"tensor appears in two shards ({tensors[name].file.name} and {path.name})",
                                  path=path, tensor=name)
        tensors[name] = info
    return header.metadata


def _pick_adapter_dir(root: Path, adapter_name: str | None) -> tuple[Path, str | None]:
    """An adapter folder may hold named adapters in subfolders (PEFT's save of non-default names)."""
    if adapter_name and (root / adapter_name / "adapter_config.json").is_file():
        return root / adapter_name, adapter_name
    if any((root / f).is_file() for f in ADAPTER_WEIGHTS):
        return root, None
    subs = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "adapter_config.json").is_file()
                  and any((p / f).is_file() for f in ADAPTER_WEIGHTS))
    if len(subs) == 1:
        return root / subs[0], subs[0]
    if len(subs) > 1:
        raise CheckpointError(f"holds several named adapters: {', '.join(subs)}", path=root,
                              hint="choose one with --adapter NAME")
    return root, None


def open_checkpoint(path: str | Path, *, adapter_name: str | None = None) -> Checkpoint:
    """Open a folder in Hugging Face layout, or a single weights file, from headers only."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError("no such file or folder", path=path)
    tensors: dict[str, TensorInfo] = {}
    bins: dict[Path, dict[str, torch.Tensor]] = {}
    if path.is_file():
        if path.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            raise CheckpointError("not a .safetensors or .bin file", path=path)
        metadata = _add_file(tensors, bins, path)
        root = path.parent
        kind = "adapter" if path.name.startswith("adapter_model") else "model"
        layout = "bin" if path.suffix != ".safetensors" else "safetensors"
        cfg_path = root / "adapter_config.json"
        ck = Checkpoint(root, [path], layout, kind, tensors, metadata, None,
                        cfg_path if kind == "adapter" and cfg_path.is_file() else None)
        ck._bin = bins
        _attach_config(ck, root)
        return ck
    root, picked = _pick_adapter_dir(path, adapter_name)
    files: list[Path] = []
    metadata: dict[str, str] = {}
    kind = "model"
    layout = ""
    if (root / "adapter_model.safetensors").is_file():
        files, kind, layout = [root / "adapter_model.safetensors"], "adapter", "safetensors"
    elif (root / "adapter_model.bin").is_file():
        files, kind, layout = [root / "adapter_model.bin"], "adapter", "bin"
    else:
        for index_name in MODEL_INDEXES:
            index = root / index_name
            if index.is_file():
                files = _files_from_index(root, index, tensors, bins)
                layout = "sharded-" + ("safetensors" if index_name.startswith("model") else "bin")
                break
        else:
            for single in MODEL_SINGLES:
                if (root / single).is_file():
                    files, layout = [root / single], single.rsplit(".", 1)[1]
                    break
            else:
                loose = sorted(root.glob("*.safetensors"))
                if not loose:
                    raise CheckpointError(
                        "no weights found (expected model.safetensors, an index, pytorch_model.bin or "
                        "adapter_model.safetensors)", path=root)
                files, layout = loose, "safetensors" if len(loose) == 1 else "sharded-safetensors"
    if not tensors:
        for f in files:
            metadata.update(_add_file(tensors, bins, f))
    cfg = root / "adapter_config.json"
    ck = Checkpoint(root, files, layout, kind, tensors, metadata, None,
                    cfg if cfg.is_file() else None, picked)
    ck._bin = bins
    _attach_config(ck, path if picked else root)
    return ck


def _files_from_index(root: Path, index: Path, tensors: dict[str, TensorInfo],
                      bins: dict[Path, dict[str, torch.Tensor]]) -> list[Path]:
    data = _load_json(index, keep_pairs=True)
    top = dict(data) if isinstance(data, _Pairs) else None
    pairs = top.get("weight_map") if top is not None else None
    if not isinstance(pairs, _Pairs) or not pairs:
        raise CheckpointError("index has no weight_map", path=index)
    wm: dict[str, Any] = {}
    for name, rel in pairs:
        if name in wm and wm[name] != rel:
            raise CheckpointError(f"index places this tensor in two shards ({wm[name]} and {rel})", path=index,
                                  tensor=name, hint="the index is corrupted; re-download it")
        wm[name] = rel
    by_file: dict[str, set[str]] = {}
    for name, rel in wm.items():
        _safe_member(root, rel, index)
        by_file.setdefault(rel, set()).add(name)
    files = []
    for rel, names in by_file.items():
        f = _safe_member(root, rel, index)
        if not f.is_file():
            raise CheckpointError(f"index names shard {rel!r}, which is missing", path=index,
                                  hint="download every shard the index lists")
        files.append(f)
        _add_file(tensors, bins, f, only=names)
        missing = names - {n for n, t in tensors.items() if t.file == f}
        if missing:
            first = sorted(missing)[0]
            raise CheckpointError(f"index places this tensor in {rel}, which does not hold it", path=index,
                                  tensor=first)
    return files


def _attach_config(ck: Checkpoint, folder: Path) -> None:
    for candidate in (ck.root / "config.json", folder / "config.json"):
        if candidate.is_file():
            data = _load_json(candidate)
            if isinstance(data, dict):
                ck.config = data
            return
